"""An -o folder: its records (run.json, manifest.jsonl, the lock) are regular files or refused,
folders of two runs never nest, a manifest is read in bounded memory, and -o file:// stays inside
its folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, make_images, npy_outputs, run_cli, slow_but

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j", "0")



# --- records that are not regular files --------------------------------------------------------


@pytest.mark.parametrize("record, overwrite", slow_but([("run.json", False), ("manifest.jsonl", False), ("run.json", True)],
                                                    ("manifest.jsonl", False), several=True))  # a process each
def test_a_fifo_as_a_record_is_refused_without_hanging(tmp_path, record, overwrite):
    photos = make_images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / record)
    start = time.monotonic()
    try:
        r = run_cli("encode", photos, "-o", out, *SMALL, *(["--overwrite"] if overwrite else []),
                    process=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a FIFO as {record} hangs the run")
    assert time.monotonic() - start < 30
    assert b"Traceback" not in r.stderr
    if overwrite:  # --overwrite replaces the folder's records: the FIFO goes
        assert r.returncode == 0, r.stderr
        assert (out / record).is_file() or not (out / record).exists()
    else:
        assert r.returncode in (1, 2) and record.encode() in r.stderr and b"FIFO" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["bad json", "empty", "folder", "link"])
def test_an_unreadable_run_json_is_called_unreadable(tmp_path, kind):
    photos = make_images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos, "-o", out, *SMALL).returncode == 0
    (out / "run.json").unlink()
    if kind == "bad json":
        (out / "run.json").write_text("{not json")
    elif kind == "empty":
        (out / "run.json").write_text("")
    elif kind == "folder":
        (out / "run.json").mkdir()
    else:
        (tmp_path / "real.json").write_text("{}")
        (out / "run.json").symlink_to(tmp_path / "real.json")
    r = run_cli("encode", photos, "-o", out, *SMALL)
    assert r.returncode == 2 and b"run.json" in r.stderr and b"unreadable" in r.stderr, r.stderr
    assert b"another configuration" not in r.stderr


@pytest.mark.slow  # a process
def test_a_fifo_as_the_lock_file_is_named_as_such(tmp_path):
    photos = make_images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".vitembed.lock")
    r = run_cli("encode", photos, "-o", out, *SMALL, process=True, timeout=30)
    assert r.returncode in (1, 2) and b".vitembed.lock" in r.stderr and b"FIFO" in r.stderr, r.stderr
    assert b"Invalid argument" not in r.stderr


# --- nested folders ------------------------------------------------------------------------------


def test_a_folder_inside_another_runs_folder_is_refused(tmp_path):
    photos = make_images(tmp_path / "in", ["x.png", "sub/y.png"])
    outer = tmp_path / "P"
    assert run_cli("encode", photos, "-o", outer, *SMALL).returncode == 0
    before = (outer / "sub" / "y.npy").read_bytes()
    r = run_cli("encode", photos, "-o", outer / "sub", "--seed", "7", *SMALL)
    assert r.returncode == 2 and b"inside" in r.stderr and b"run.json" in r.stderr, r.stderr
    assert (outer / "sub" / "y.npy").read_bytes() == before
    assert not (outer / "sub" / "x.npy").exists()


def test_a_folder_that_holds_another_runs_folder_refuses_the_inputs_that_would_mix(tmp_path):
    photos = make_images(tmp_path / "in", ["x.png", "sub/y.png"])
    outer = tmp_path / "P"
    assert run_cli("encode", photos / "sub", "-o", outer / "sub", "--seed", "7", *SMALL).returncode == 0
    inner = (outer / "sub" / "y.npy").read_bytes()
    r = run_cli("encode", photos, "-o", outer, "--json", *SMALL)
    got = {Path(x["input"]).name: x for x in json_lines(r.stdout)}
    assert r.returncode == 1
    assert got["x.png"]["status"] == "ok"
    assert got["y.png"]["status"] == "error" and "run.json" in got["y.png"]["error"]
    assert (outer / "sub" / "y.npy").read_bytes() == inner
    r = run_cli("encode", photos, "-o", outer, "--json", "--skip-existing", *SMALL)
    assert {Path(x["input"]).name: x["status"] for x in json_lines(r.stdout)}["y.png"] == "error"


def test_a_folder_inside_a_folder_being_written_is_refused(tmp_path):
    """Two runs at once: the inner one sees the outer one's lock held, before any run.json exists."""
    from vitembed.pipeline.folder import OutputFolder

    from vitembed.errors import ConfigError

    outer = OutputFolder(tmp_path / "P", {"a": 1}, {"config": {"a": 1}}, str)
    try:
        assert not (tmp_path / "P" / "run.json").exists()
        with pytest.raises(ConfigError, match="inside"):
            OutputFolder(tmp_path / "P" / "sub", {"a": 2}, {"config": {"a": 2}}, str)
    finally:
        outer.close()
    OutputFolder(tmp_path / "P" / "sub", {"a": 2}, {"config": {"a": 2}}, str).close()


# --- linked subfolders ---------------------------------------------------------------------------


def test_a_linked_subfolder_is_refused_before_anything_is_created_through_it(tmp_path):
    """The output folder out/sub/deep/er is checked before it is made: made first, it would be
    elsewhere/deep/er, outside -o DIR, though the message says nothing was written."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere")
    photos = make_images(tmp_path / "photos", ["sub/deep/er/b.png"])
    r = run_cli("encode", photos, "-o", tmp_path / "out", "--json", *SMALL)
    assert r.returncode == 1 and "outside" in json_lines(r.stdout)[0]["error"]
    assert not any((tmp_path / "elsewhere").iterdir()), "folders were created outside -o DIR"


# --- manifests in bounded memory ----------------------------------------------------------------


@pytest.mark.slow  # a process that reads 72 MB
def test_a_manifest_is_read_line_by_line_with_a_bound(tmp_path):
    """A manifest with a NUL-filled tail (a crash) and a huge line: its records are read, each line
    within a bound, and the NUL run counts as a torn tail."""
    from vitembed.pipeline.folder import read_manifest

    path = tmp_path / "manifest.jsonl"
    good = {"input": "a.png", "output": "a.npy", "status": "ok"}
    with open(path, "wb") as f:
        f.write(json.dumps(good).encode() + b"\n")
        f.write(b'{"input": "' + b"x" * (8 << 20) + b'", "output": "b.npy", "status": "ok"}\n')
        f.write(json.dumps({"input": "c.png", "output": "c.npy", "status": "ok"}).encode() + b"\n")
        f.truncate(f.tell() + (64 << 20))  # a sparse NUL tail
    code = ("import sys\n"
            "from vitembed.pipeline.folder import read_manifest\n"
            "made = read_manifest(__import__('pathlib').Path(sys.argv[1]))\n"
            "print(sorted(made.items()))\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    items, peak_kb = r.stdout.splitlines()
    assert items == str([("a.npy", "a.png"), ("c.npy", "c.png")])
    assert int(peak_kb) < 150 * 1024, f"reading a 72 MB manifest peaked at {int(peak_kb) // 1024} MB"
    assert read_manifest(path) == {"a.npy": "a.png", "c.npy": "c.png"}


def test_a_nul_tail_is_dropped_before_appending(tmp_path):
    photos = make_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos / "a.png", "-o", out, *SMALL).returncode == 0
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b"\0" * 200_000)  # longer than any one look back from the end
    assert run_cli("encode", photos, "-o", out, "--skip-existing", *SMALL).returncode == 0
    lines = (out / "manifest.jsonl").read_bytes().splitlines()
    assert b"\0" not in b"".join(lines)
    assert [json.loads(x)["status"] for x in lines] == ["ok", "skipped", "ok"]


# --- -o file:// ------------------------------------------------------------------------------------


def test_file_uri_output_lists_nothing_through_links(tmp_path):
    """-o file://DIR: whether an output exists is asked of that path alone, never by a recursive
    listing that follows links (a loop, or a link to a large tree)."""
    pytest.importorskip("pyarrow")
    from vitembed.pipeline.plan import OutputPlan

    out = tmp_path / "out"
    out.mkdir()
    (out / "loop").symlink_to(out)
    big = tmp_path / "big"
    for i in range(50):
        (big / f"d{i}").mkdir(parents=True)
    (out / "big").symlink_to(big)
    (out / "a.npy").write_bytes(b"x")
    plan = OutputPlan.from_option(f"file://{out}", None)
    calls = []
    original = plan.store.fs.get_file_info

    def spy(arg):
        calls.append(arg)
        return original(arg)

    object.__setattr__(plan.store, "fs", _Spy(plan.store.fs, spy))
    assert plan.exists(out / "a.npy") and not plan.exists(out / "b.npy")
    assert not any(getattr(c, "recursive", False) for c in calls), "a recursive listing of the folder"


class _Spy:
    def __init__(self, fs, get_file_info):
        self._fs, self.get_file_info = fs, get_file_info

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_file_uri_overwrite_never_deletes_through_a_linked_subfolder(tmp_path):
    pytest.importorskip("pyarrow")
    from vitembed.pipeline.folder import UriFolder
    from vitembed.files.uris import Store

    victim_dir = tmp_path / "elsewhere"
    victim_dir.mkdir()
    (victim_dir / "victim.npy").write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ln").symlink_to(victim_dir)
    (out / "run.json").write_text(json.dumps({"config": {"other": True}}))
    (out / "manifest.jsonl").write_text(json.dumps({"input": "x.png", "output": "ln/victim.npy", "status": "ok"}) + "\n")
    store = Store.open(f"file://{out}")
    UriFolder(store, {"mine": True}, {"config": {"mine": True}}, str, overwrite=True).close()
    assert (victim_dir / "victim.npy").read_bytes() == b"keep me"


def test_file_uri_input_listing_reports_broken_links(tmp_path):
    pytest.importorskip("pyarrow")
    from vitembed.images.inputs import iter_sources

    folder = tmp_path / "in"
    make_image(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    sources = list(iter_sources([f"file://{folder}"], uris=True))
    errors = {Path(str(s.path)).name: s.error for s in sources}
    assert errors.get("a.png", "missing") is None
    assert errors.get("gone.png") == "broken symbolic link", errors


def test_another_configuration_is_refused_or_overwritten_whole(photo_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("encode", photo_dir, "-o", out, *SMALL, "-q").returncode == 0
    before = npy_outputs(out)
    r = run_cli("encode", photo_dir, "-o", out, "--image-size", "64", "--patch-size", "8", "--emb-dim", "16",
                "--skip-existing")
    assert r.returncode == 2 and b"--image-size 32 then, 64 now" in r.stderr
    assert npy_outputs(out) == before
    # --overwrite removes the old configuration's outputs, even those this run does not remake.
    r = run_cli("encode", photo_dir / "a.png", "-o", out, "--image-size", "64", "--patch-size", "8",
                "--emb-dim", "16", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(npy_outputs(out)) == ["a.npy"] and np.load(out / "a.npy").shape == (65, 16)
    assert not (out / "sub" / "c.npy").exists()


def test_an_output_folder_below_a_file_is_one_line(photo_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("encode", photo_dir, "-o", tmp_path / "file" / "out", *SMALL)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"not a folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    from vitembed.pipeline.folder import OutputFolder

    out = tmp_path / "cout"
    holder = OutputFolder(out, {"layer": {}}, {}, str)  # another run, writing into cout/
    try:
        r = run_cli("encode", make_images(tmp_path / "cA", ["a.png"]), "-o", out, *SMALL)
        assert r.returncode == 2 and f"PID {os.getpid()}".encode() in r.stderr
        assert not (out / "manifest.jsonl").exists()
    finally:
        holder.close()
    assert run_cli("encode", tmp_path / "cA", "-o", out, *SMALL).returncode == 0
