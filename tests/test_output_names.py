"""Where outputs go and what they are called: the suffix of -o, names that are folders, long
names, files vitembed did not write, stdout on a terminal, and outputs that are no inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_images, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j", "0")
SHAPE = [17, 16]


def test_long_names_fit_and_a_name_that_cannot_is_one_inputs_error(tmp_path):
    folder = tmp_path / "long"
    name = "a" * 251
    make_images(folder, [f"{name}.jpg", f"{name}.png", "z.png"])  # the second would be NAME.png.npy: 259 bytes
    r = run_cli("encode", folder, "--json", *SMALL)
    records = {x["input"][-5:]: x for x in json_lines(r.stdout)}
    assert r.returncode == 1 and len(records) == 3
    assert records["a.jpg"]["status"] == "ok" and records["z.png"]["status"] == "ok"
    assert records["a.png"]["status"] == "error" and "too long" in records["a.png"]["error"]
    resumed = run_cli("encode", folder, "--json", "--skip-existing", *SMALL)
    assert [x["status"] for x in json_lines(resumed.stdout)] == ["skipped", "error", "skipped"]


def test_beside_mode_never_replaces_a_file_it_did_not_write(tmp_path):
    lbl = make_images(tmp_path / "lbl", ["0001.png", "0002.png"])
    np.save(lbl / "0001.npy", np.arange(5))  # a user's labels
    r = run_cli("encode", lbl, "--json", *SMALL)
    records = {Path(x["input"]).name: x for x in json_lines(r.stdout)}
    assert r.returncode == 1 and records["0002.png"]["status"] == "ok"
    assert records["0001.png"]["status"] == "error" and "--overwrite" in records["0001.png"]["error"]
    np.testing.assert_array_equal(np.load(lbl / "0001.npy"), np.arange(5))
    assert run_cli("encode", lbl, "--overwrite", *SMALL).returncode == 0
    assert np.load(lbl / "0001.npy").shape == tuple(SHAPE)


@pytest.mark.parametrize("name", ["cat.npz", "cat.jpg", "cat.safetensors", "tokens.v2"])
def test_output_with_another_suffix_is_refused(sample_paths, tmp_path, name):
    result = run_cli("encode", sample_paths[0], "-o", name, cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"not .{name.rsplit('.', 1)[1]}" in err and f"-o {name}/ for a folder" in err
    assert list(tmp_path.iterdir()) == []


def test_output_pth_is_a_pt_file(sample_paths, tmp_path):
    import torch

    result = run_cli("encode", sample_paths[0], "-o", "cat.pth", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "cat.pth", weights_only=True).shape == (257, 384)
    again = run_cli("encode", sample_paths[0], "-o", "cat.pth", "--skip-existing", "--json", cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "skipped"


@pytest.mark.parametrize("name", ["tokens", "tokens.v2/", "cat.npy/"])
def test_an_output_name_without_a_suffix_or_ending_in_a_slash_is_a_folder(sample_paths, tmp_path, name):
    result = run_cli("encode", sample_paths[0], "-o", name, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / name / f"{sample_paths[0].stem}.npy").is_file()


@pytest.mark.slow
def test_stdout_on_a_terminal_is_refused(sample_paths, tmp_path):
    """`-o -` with stdout on a terminal: refused (as gzip does), nothing binary written to it."""
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(sample_paths[0]), "-o", "-"],
                              stdout=follower, stderr=subprocess.PIPE, timeout=120, cwd=tmp_path)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 2
    assert b"terminal" in proc.stderr and b"> cat.npy" in proc.stderr
    assert shown == b""


def test_outputs_given_by_a_glob_are_passed_over(sample_paths, tmp_path):
    """`encode photos/*` after a run beside the photos: the .npy files are no inputs, and every
    photo keeps its plain output name."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sample_paths:
        shutil.copy(path, photos / path.name)
    assert run_cli("encode", *sorted(photos.iterdir()), "-q").returncode == 0  # beside: photos/*.npy
    globbed = sorted(photos.iterdir())  # what the shell makes of photos/*
    assert len(globbed) == 2 * len(sample_paths)
    result = run_cli("encode", *globbed, "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert [r["status"] for r in records] == ["ok"] * len(sample_paths)
    assert sorted(Path(r["output"]).name for r in records) == sorted(f"{p.stem}.npy" for p in sample_paths)
    notes = [line for line in result.stderr.decode().splitlines() if line.startswith("note: passed over")]
    assert len(notes) == 1 and f"and {len(sample_paths) - 1} more" in notes[0] and "outputs, not images" in notes[0]


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    result = run_cli("encode", "nope/", "-o", "t/", cwd=tmp_path)
    assert result.returncode == 1 and b"nope" in result.stderr
    assert not (tmp_path / "t").exists()
