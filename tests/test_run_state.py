"""Per-run state: a run in a process that ran others behaves as the first run of a fresh process.

`vitembed.encode` twice into one folder, or from two threads at once, writes the bytes that
`vitembed encode` processes write; nothing a run learnt (folders cleaned, folders checked to be
inside -o DIR, Pillow's limit) carries over to the next.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

import vitembed
from tests.conftest import make_image, run_cli

LAYERS = {  # two runs that differ in everything a process-wide setting could leak between them
    "a": dict(image_size=32, patch_size=8, emb_dim=16, seed=0),
    "b": dict(image_size=48, patch_size=16, emb_dim=24, seed=3, max_pixels=200_000_000),
}


def _cli_args(options: dict) -> list[str]:
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def _inputs(folder: Path) -> Path:
    make_image(folder / "a.png")
    make_image(folder / "sub" / "b.jpg", size=(40, 56), seed=1)
    make_image(folder / "c.png", size=(30, 30), mode="L", seed=2)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder (temporaries too) and its bytes, less the lock (it names the
    last run's PID)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".vitembed.lock"}


def _dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_two_encodes_into_one_folder_write_what_two_cli_runs_write(tmp_path, monkeypatch):
    """Between the runs, a killed run's temporary appears in a subfolder: the second run removes
    it, as a second process does."""
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path / "in")
    stale = f"sub/.vitembed-{_dead_pid()}-0123456789abcdef.tmp"
    for run in range(2):
        result = run_cli("encode", "in", "-o", "cli", "-j0", "-q", *_cli_args(LAYERS["a"]), process=True)
        assert result.returncode == 0, result.stderr.decode()
        if run == 0:
            (tmp_path / "cli" / stale).write_bytes(b"half a file")
    for run in range(2):
        summary = vitembed.encode(["in"], "api", workers=0, **LAYERS["a"])
        assert summary.ok == 3 and summary.stopped is None
        if run == 0:
            (tmp_path / "api" / stale).write_bytes(b"half a file")
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")


@pytest.mark.slow
def test_encodes_in_two_threads_write_what_two_cli_runs_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path / "in")
    for name, options in LAYERS.items():
        result = run_cli("encode", "in", "-o", f"cli-{name}", "-j0", "-q", *_cli_args(options), process=True)
        assert result.returncode == 0, result.stderr.decode()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    summaries, errors = {}, []

    def encode(name: str) -> None:
        try:
            summaries[name] = vitembed.encode(["in"], f"api-{name}", workers=0, **LAYERS[name])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(name,)) for name in LAYERS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and all(s.ok == 3 for s in summaries.values()), (errors, summaries)
    for name in LAYERS:
        assert _files(tmp_path / f"api-{name}") == _files(tmp_path / f"cli-{name}")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # raised for the runs only, as a decoder process's


def test_second_encode_into_a_folder_removes_dead_runs_temporaries(tmp_path):
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert vitembed.encode([inputs], out, workers=0, **LAYERS["a"]).ok == 3
    stale = [folder / f".vitembed-{_dead_pid()}-0123456789abcdef.tmp" for folder in (out, out / "sub")]
    for path in stale:
        path.write_bytes(b"half a file")
    assert vitembed.encode([inputs], out, workers=0, **LAYERS["a"]).ok == 3
    assert [p for p in stale if os.path.lexists(p)] == []


def test_link_planted_between_two_encodes_is_not_followed(tmp_path):
    """The first run found out/sub inside out; before the second, out/sub becomes a link that
    leads elsewhere: the second run checks again and writes nothing through it."""
    inputs = _inputs(tmp_path / "in")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert vitembed.encode([inputs], out, workers=0, **LAYERS["a"]).ok == 3
    for path in (out / "sub").iterdir():
        path.unlink()
    (out / "sub").rmdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    seen = []
    summary = vitembed.encode([inputs], out, workers=0, on_result=seen.append, **LAYERS["a"])
    assert summary.ok == 2 and summary.errors == 1
    assert "leads outside" in next(o.error for o in seen if getattr(o, "error", None))
    assert list(elsewhere.iterdir()) == []


def test_an_encode_leaves_pillows_limit_as_it_found_it(tmp_path):
    inputs = _inputs(tmp_path / "in")
    before = Image.MAX_IMAGE_PIXELS
    assert vitembed.encode([inputs], tmp_path / "out", workers=0, **LAYERS["b"]).ok == 3
    assert Image.MAX_IMAGE_PIXELS == before
    result = run_cli("encode", str(inputs), "-o", str(tmp_path / "cli"), "-j0", "-q", *_cli_args(LAYERS["b"]))
    assert result.returncode == 0, result.stderr.decode()
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_picture_write_removes_a_killed_commands_temporary(tmp_path):
    """`vitembed show` writes its PNG as every other file is written: a temporary left by a killed
    command in that folder is removed by the next picture written there."""
    from vitembed.files.pngfile import PNG_SIGNATURE, write_png

    stale = tmp_path / f".vitembed-{_dead_pid()}-0123456789abcdef.tmp"
    stale.write_bytes(b"half a picture")
    assert write_png(PNG_SIGNATURE + b"rest", tmp_path / "filters.png") is False
    assert (tmp_path / "filters.png").read_bytes() == PNG_SIGNATURE + b"rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filters.png"]
