"""Hardening, round 2 (issue #12): planted links, resumes that must not lie, files vitembed did not
write, long names, concurrent runs, absurd options, full stdout. Each test is named after the
item it covers and failed on the code before the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, read_manifest, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")
SHAPE = [17, 16]


def _photos(folder: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        make_image(folder / name, size=(40 + i, 30 + i), seed=i)
    return folder


# --- 1. planted symbolic links --------------------------------------------------------------


def test_1_planted_temporary_links_are_never_followed(tmp_path):
    """Links planted under the old temporary names (for every nearby PID) and under any name
    are not written through: temporaries are created O_EXCL | O_NOFOLLOW under unpredictable names."""
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA precious\n")
    ds = _photos(tmp_path / "ds", ["cat.png"])
    for pid in range(max(2, os.getpid() - 300), os.getpid() + 3000):
        (ds / f".cat.npy.{pid}.vitembed-tmp").symlink_to(victim)
    r = run_cli("encode", ds, *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "ssh-ed25519 AAAA precious\n"
    assert (ds / "cat.npy").is_file() and not (ds / "cat.npy").is_symlink()
    assert np.load(ds / "cat.npy").shape == tuple(SHAPE)


def test_1_output_file_that_is_a_link_is_refused_then_replaced_not_followed(tmp_path):
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


def test_1_manifest_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(victim)
    r = run_cli("encode", _photos(tmp_path / "in", ["a.png"]), "-o", out, *SMALL)
    assert r.returncode == 1 and b"manifest.jsonl" in r.stderr and b"symbolic link" in r.stderr
    assert victim.read_text() == "keep me\n"


def test_1_planted_run_json_temporaries_are_never_followed(tmp_path):
    """`.run.json.<pid>.vitembed-tmp` links planted in -o DIR for every nearby PID (and a link
    as run.json itself) are not written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(max(2, os.getpid() - 300), os.getpid() + 3000):
        (out / f".run.json.{pid}.vitembed-tmp").symlink_to(victim)
    r = run_cli("encode", _photos(tmp_path / "in", ["a.png"]), "-o", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me\n"
    assert not (out / "run.json").is_symlink()
    (out / "run.json").unlink()
    (out / "run.json").symlink_to(victim)
    r = run_cli("encode", tmp_path / "in", "-o", out, "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me\n"
    assert json.loads((out / "run.json").read_text())["config"]["layer"]["emb_dim"] == 16


def test_1_linked_subfolder_of_the_output_folder_is_refused_for_its_inputs(tmp_path):
    photos = _photos(tmp_path / "photos", ["a.png", "sub/b.png"])
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


# --- 2 and 3. sharded resumes ------------------------------------------------------------------


def test_2_sharded_resume_with_changed_inputs_rewrites_the_shards_that_moved(tmp_path):
    photos = _photos(tmp_path / "sC", [f"img{i:03d}.png" for i in range(1, 9)])
    args = ("encode", photos, "-o", tmp_path / "shC", "--shard-size", "4", *SMALL)
    assert run_cli(*args).returncode == 0
    make_image(photos / "img000.png", seed=99)  # sorts first: every row moves by one
    r = run_cli(*args, "--skip-existing", "--json")
    assert r.returncode == 0, r.stderr
    assert all(x["status"] == "ok" for x in json_lines(r.stdout))
    fresh = tmp_path / "fresh"
    assert run_cli("encode", photos, "-o", fresh, "--shard-size", "4", *SMALL).returncode == 0
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00002.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "shC" / name), np.load(fresh / name))
    rows = {(m["output"], m["row"]): Path(m["input"]).name for m in read_manifest(tmp_path / "shC")[-9:]}
    assert rows[("shard-00000.npy", 0)] == "img000.png"


def test_2_sharded_resume_over_another_folder_skips_nothing(tmp_path):
    first = _photos(tmp_path / "a", [f"x{i}.png" for i in range(4)])
    other = tmp_path / "b"
    other.mkdir()
    for i, p in enumerate(sorted(first.iterdir())):
        make_image(other / f"y{i}.png", seed=50 + i)
    assert run_cli("encode", first, "-o", tmp_path / "sh", "--shard-size", "4", *SMALL).returncode == 0
    r = run_cli("encode", other, "-o", tmp_path / "sh", "--shard-size", "4", "--skip-existing", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in json_lines(r.stdout)] == ["ok"] * 4


def test_3_sharded_resume_redoes_a_shard_with_a_failed_row(tmp_path):
    photos = _photos(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    good = (photos / "b.png").read_bytes()
    (photos / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    args = ("encode", photos, "-o", tmp_path / "sh", "--shard-size", "4", *SMALL)
    assert run_cli(*args).returncode == 1
    again = run_cli(*args, "--skip-existing", "--json")  # still broken: still an error, never "skipped"
    assert again.returncode == 1
    assert {Path(x["input"]).name: x["status"] for x in json_lines(again.stdout)}["b.png"] == "error"
    (photos / "b.png").write_bytes(good)
    fixed = run_cli(*args, "--skip-existing", "--json")
    assert fixed.returncode == 0 and [x["status"] for x in json_lines(fixed.stdout)] == ["ok"] * 4
    assert not np.isnan(np.load(tmp_path / "sh" / "shard-00000.npy")).any()


# --- 7. long names ----------------------------------------------------------------------------


def test_7_long_names_fit_and_a_name_that_cannot_is_one_inputs_error(tmp_path):
    folder = tmp_path / "long"
    name = "a" * 251
    _photos(folder, [f"{name}.jpg", f"{name}.png", "z.png"])  # the second would be NAME.png.npy: 259 bytes
    r = run_cli("encode", folder, "--json", *SMALL)
    records = {x["input"][-5:]: x for x in json_lines(r.stdout)}
    assert r.returncode == 1 and len(records) == 3
    assert records["a.jpg"]["status"] == "ok" and records["z.png"]["status"] == "ok"
    assert records["a.png"]["status"] == "error" and "too long" in records["a.png"]["error"]
    resumed = run_cli("encode", folder, "--json", "--skip-existing", *SMALL)
    assert [x["status"] for x in json_lines(resumed.stdout)] == ["skipped", "error", "skipped"]


# --- 8. files vitembed did not write ----------------------------------------------------------


def test_8_beside_mode_never_replaces_a_file_it_did_not_write(tmp_path):
    lbl = _photos(tmp_path / "lbl", ["0001.png", "0002.png"])
    np.save(lbl / "0001.npy", np.arange(5))  # a user's labels
    r = run_cli("encode", lbl, "--json", *SMALL)
    records = {Path(x["input"]).name: x for x in json_lines(r.stdout)}
    assert r.returncode == 1 and records["0002.png"]["status"] == "ok"
    assert records["0001.png"]["status"] == "error" and "--overwrite" in records["0001.png"]["error"]
    np.testing.assert_array_equal(np.load(lbl / "0001.npy"), np.arange(5))
    assert run_cli("encode", lbl, "--overwrite", *SMALL).returncode == 0
    assert np.load(lbl / "0001.npy").shape == tuple(SHAPE)


@pytest.mark.parametrize("out", [None, "one.npy"])
def test_8_skip_existing_checks_the_shape_and_dtype_it_finds(tmp_path, out):
    bs = _photos(tmp_path / "bs", ["a.png"])
    target = [] if out is None else ["-o", tmp_path / out]
    assert run_cli("encode", bs / "a.png", *target).returncode == 0  # (257, 384)
    r = run_cli("encode", bs / "a.png", *target, "--preset", "vit-b16", "--skip-existing", "--json")
    record = json_lines(r.stdout)[0]
    assert r.returncode == 1 and record["status"] == "error" and "(257, 384) float32" in record["error"]
    r = run_cli("encode", bs / "a.png", *target, "--skip-existing", "--json")
    assert r.returncode == 0 and json_lines(r.stdout)[0]["status"] == "skipped"
    assert json_lines(r.stdout)[0]["shape"] == [257, 384]


# --- 10. one run per output folder ------------------------------------------------------------


def test_10_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    from vitembed.folder import OutputFolder

    out = tmp_path / "cout"
    holder = OutputFolder(out, {"layer": {}}, {}, str)  # another run, writing into cout/
    try:
        r = run_cli("encode", _photos(tmp_path / "cA", ["a.png"]), "-o", out, *SMALL)
        assert r.returncode == 2 and f"PID {os.getpid()}".encode() in r.stderr
        assert not (out / "manifest.jsonl").exists()
    finally:
        holder.close()
    assert run_cli("encode", tmp_path / "cA", "-o", out, *SMALL).returncode == 0


# --- 12. absurd options -----------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--seed", "1180591620717411303424"], "seed"),
    (["--image-size", "140000", "--patch-size", "14"], "image-size (140000) is over the limit"),
    (["--emb-dim", "1000000000"], "emb-dim"),
    (["--decode-timeout", "nan"], "decode timeout"),
    (["--shard-size", "100000000", "-o", "OUT"], "shard size"),
])
def test_12_absurd_options_are_one_line_usage_errors(tmp_path, args, needle):
    image = make_image(tmp_path / "a.png")
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    r = run_cli("encode", image, *args)
    assert r.returncode == 2 and needle.encode() in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "a.npy").exists()


def test_12_a_large_shard_size_holds_only_the_rows_written(tmp_path):
    import tracemalloc

    from tests.conftest import encode_with
    from vitembed.config import LayerConfig
    from vitembed.layer import build_layer

    photos = _photos(tmp_path / "in", [f"p{i}.png" for i in range(4)])
    tracemalloc.start()
    summary, _ = encode_with([photos], tmp_path / "sh", build_layer(LayerConfig(32, 8, 16)), workers=0,
                             shard_size=20000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.ok == 4 and np.load(tmp_path / "sh" / "shard-00000.npy").shape == (4, *SHAPE)
    assert peak < 50 << 20  # 20000 rows would be 21 MB of this small layer's tokens; vit-b16's 12 GB


# --- 13. stdout on a full disk ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["-o", "-"], ["--json", "-o", "OUT"]])
def test_13_stdout_on_a_full_disk_is_one_line(tmp_path, args):
    import subprocess
    import sys

    image = make_image(tmp_path / "a.png")
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(image), *args, *SMALL],
                           stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    errors = [line for line in r.stderr.decode().splitlines() if line.startswith("error")]
    assert errors == ["error: stopped: stdout: disk full (no space left on device)"]


# --- 15. decoder memory -----------------------------------------------------------------------


def _png16_grey_zeros(path: Path, side: int) -> Path:
    import struct
    import zlib

    row = b"\0" + bytes(2 * side)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.slow
def test_15_a_large_16_bit_image_decodes_in_a_fraction_of_the_memory(tmp_path):
    """A 380 KB 16-bit grey PNG of 13370 x 13370 (179 megapixels) peaked at 4.6 GB per decode;
    converted a band of rows at a time it stays under 2 GB (measured 1.3 GB)."""
    import subprocess
    import sys

    png = _png16_grey_zeros(tmp_path / "big16.png", 13370)
    script = ("import resource, sys\nfrom vitembed.images import Preprocess, load_image\n"
              f"load_image({str(png)!r}, Preprocess())\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 2 << 20  # KiB


def test_15_large_images_are_decoded_one_at_a_time_across_decoders(tmp_path):
    """The decoders share a gate: an image over LARGE_PIXELS waits while another one decodes;
    smaller images never wait."""
    import threading

    from vitembed.images import LARGE_PIXELS, Preprocess, load_image

    side = int(LARGE_PIXELS ** 0.5) + 2
    large = _png16_grey_zeros(tmp_path / "large.png", side)
    small = make_image(tmp_path / "small.png")
    gate = threading.Lock()
    done = threading.Event()
    with gate:  # another decoder holds it
        load_image(small, Preprocess(), gate)  # not held up
        worker = threading.Thread(target=lambda: (load_image(large, Preprocess(), gate), done.set()))
        worker.start()
        assert not done.wait(1.0)
    worker.join(60)
    assert done.is_set()


# --- 9. a killed run leaves no orphans ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the processes")
def test_9_children_die_with_a_killed_run(tmp_path):
    """`kill -9` of the main process: the forkserver, the decoders and the resource tracker follow
    it within seconds instead of staying blocked for minutes."""
    import signal
    import subprocess
    import sys
    import time

    from tests.test_hardening import _descendants

    photos = tmp_path / "many"
    for i in range(200):
        make_image(photos / f"i{i:03d}.png", size=(200, 200), seed=i)
    proc = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(photos), "-o", str(tmp_path / "out"),
                             "--json", "-j", "2", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.readline()
    children = _descendants(proc.pid)
    assert len(children) >= 3  # the resource tracker, the forkserver, its decoders
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in children):
        time.sleep(0.1)
    assert [pid for pid in children if Path(f"/proc/{pid}").exists() and not _zombie(pid)] == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
