"""Links planted in a dataset or an output folder (at temporaries' names, at outputs, at the
manifest and run.json, as a subfolder) are never written through."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, make_images, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")
SHAPE = [17, 16]


@pytest.mark.slow  # 3,300 links planted, then removed: seconds on a slow disk
def test_planted_temporary_links_are_never_followed(tmp_path):
    """Links planted under the old temporary names (for every nearby PID) and under any name
    are not written through: temporaries are created O_EXCL | O_NOFOLLOW under unpredictable names."""
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA precious\n")
    ds = make_images(tmp_path / "ds", ["cat.png"])
    for pid in range(max(2, os.getpid() - 300), os.getpid() + 3000):
        (ds / f".cat.npy.{pid}.vitembed-tmp").symlink_to(victim)
    r = run_cli("encode", ds, *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "ssh-ed25519 AAAA precious\n"
    assert (ds / "cat.npy").is_file() and not (ds / "cat.npy").is_symlink()
    assert np.load(ds / "cat.npy").shape == tuple(SHAPE)


def test_output_file_that_is_a_link_is_refused_then_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    image = make_image(tmp_path / "a.png")
    (tmp_path / "out.npy").symlink_to(victim)
    r = run_cli("encode", image, "-o", tmp_path / "out.npy", *SMALL)
    assert r.returncode == 1 and b"--overwrite" in r.stderr
    assert victim.read_text() == "keep me"
    r = run_cli("encode", image, "-o", tmp_path / "out.npy", "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me" and not (tmp_path / "out.npy").is_symlink()


def test_manifest_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(victim)
    r = run_cli("encode", make_images(tmp_path / "in", ["a.png"]), "-o", out, *SMALL)
    assert r.returncode == 1 and b"manifest.jsonl" in r.stderr and b"symbolic link" in r.stderr
    assert victim.read_text() == "keep me\n"


@pytest.mark.slow  # 3,300 links planted, then removed: seconds on a slow disk
def test_planted_run_json_temporaries_are_never_followed(tmp_path):
    """`.run.json.<pid>.vitembed-tmp` links planted in -o DIR for every nearby PID (and a link
    as run.json itself) are not written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(max(2, os.getpid() - 300), os.getpid() + 3000):
        (out / f".run.json.{pid}.vitembed-tmp").symlink_to(victim)
    r = run_cli("encode", make_images(tmp_path / "in", ["a.png"]), "-o", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me\n"
    assert not (out / "run.json").is_symlink()
    (out / "run.json").unlink()
    (out / "run.json").symlink_to(victim)
    r = run_cli("encode", tmp_path / "in", "-o", out, "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me\n"
    assert json.loads((out / "run.json").read_text())["config"]["layer"]["emb_dim"] == 16


def test_linked_subfolder_of_the_output_folder_is_refused_for_its_inputs(tmp_path):
    photos = make_images(tmp_path / "photos", ["a.png", "sub/b.png"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    r = run_cli("encode", photos, "-o", out, "--json", *SMALL)
    records = {Path(x["input"]).name: x for x in json_lines(r.stdout)}
    assert r.returncode == 1
    assert records["a.png"]["status"] == "ok"
    assert records["b.png"]["status"] == "error" and "outside" in records["b.png"]["error"]
    assert list(elsewhere.iterdir()) == []
