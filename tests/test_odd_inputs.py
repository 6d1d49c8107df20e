"""Hardening: odd files, odd paths, killed workers, signals, full disks and resumes.

Every bad file is made here (truncations, bit flips, lying headers); the subprocess tests wait
for the first JSON line before they signal, so that they do not depend on timing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitembed.errors import InputError
from vitembed.images import Preprocess, load_image
from vitembed.files import clean_stale_temporaries

from tests.conftest import make_image, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")
PREP = Preprocess(image_size=32)


def _json_lines(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


def _png_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG signature and IHDR chunk claiming any size, with no image data after it."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) from an (H, W, 3) uint16 array."""
    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _encoded(fmt: str, size=(40, 30), mode="RGB", **kwargs) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    im.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _bad_files() -> dict[str, bytes]:
    """Broken and lying files of many kinds, made from valid ones."""
    rng = np.random.default_rng(7)
    jpeg, png, gif, tif = _encoded("JPEG"), _encoded("PNG"), _encoded("GIF", mode="P"), _encoded("TIFF")
    bmp, webp, ico = _encoded("BMP"), _encoded("WEBP"), _encoded("ICO", mode="RGBA")
    files = {
        "empty.jpg": b"",
        "html.jpg": b"<!doctype html><html><body>not found</body></html>\n",
        "text.png": b"just some text\n" * 20,
        "zeros.gif": bytes(4096),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_only.jpg": jpeg[:200],
        "truncated.png": png[: len(png) - 40],
        "truncated.gif": gif[:60],
        "truncated.tif": tif[:100],
        "truncated.webp": webp[:50],
        "lying_size.png": _png_header(0x7FFFFFFF, 0x7FFFFFFF),
        "lying_size_zero.png": _png_header(0, 10),
        "lying_size.gif": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
        "lying_size.bmp": bmp[:18] + struct.pack("<ii", 1 << 30, 1 << 30) + bmp[26:],
        "lying_size.ico": ico[:6] + b"\x00\x00" + ico[8:12] + struct.pack("<I", 1 << 31) + ico[16:],
    }
    for name, data in (("flip.jpg", jpeg), ("flip.png", png), ("flip.tif", tif), ("flip.gif", gif),
                       ("flip.bmp", bmp), ("flip.webp", webp)):
        for k in range(4):
            b = bytearray(data)
            for i in rng.integers(0, min(len(b), 400), 6):
                b[i] ^= 1 << int(rng.integers(0, 8))
            files[f"{k}{name}"] = bytes(b)
    return files


# --- inputs: whatever the bytes ------------------------------------------------------------


def test_bad_files_are_one_line_errors_and_others_passed_over(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _bad_files()
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    make_image(folder / "good.png")
    (folder / "notes.txt").write_text("not an image extension")
    (folder / "data.bin").write_bytes(b"\x89PNG")
    r = run_cli("encode", folder, "-o", tmp_path / "out", "--json", *SMALL, "-j", "2")
    assert r.returncode == 1, r.stderr
    assert b"Traceback" not in r.stderr
    records = {Path(rec["input"]).name: rec for rec in _json_lines(r.stdout)}
    assert set(records) == set(bad) | {"good.png"}  # .txt and .bin passed over
    assert records["good.png"]["status"] == "ok"
    for name in ("empty.jpg", "html.jpg", "text.png", "truncated.jpg", "lying_size.png", "lying_size.gif"):
        assert records[name]["status"] == "error", name
    for rec in records.values():
        assert rec["status"] in ("ok", "error")
        if rec["status"] == "error":
            assert rec["error"] and "\n" not in rec["error"]
        else:  # a bit flip Pillow can still decode: encoded, and finite
            assert np.isfinite(np.load(tmp_path / "out" / rec["output"].split("/out/")[-1])).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), magic=st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"RIFF", b"\x00\x00\x01\x00"]))
def test_random_bytes_never_escape_as_anything_but_input_error(tmp_path, data, magic):
    path = tmp_path / "x.img"
    path.write_bytes(magic + data)
    try:
        out = load_image(path, PREP)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from(["PNG", "GIF", "TIFF", "BMP", "JPEG", "WEBP"]))
def test_mutated_valid_files_never_escape(tmp_path, data, fmt):
    raw = bytearray(_encoded(fmt, mode="P" if fmt == "GIF" else "RGB"))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    path = tmp_path / f"m.{fmt.lower()}"
    path.write_bytes(bytes(raw))
    try:
        out = load_image(path, PREP)
    except InputError:
        return
    assert out.shape == (32, 32, 3)


def test_bomb_refused_before_decoding_and_limit_can_be_raised(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(200_000, 200_000))
    with pytest.raises(InputError, match="max-pixels|decompression bomb"):
        load_image(bomb, PREP)
    small = make_image(tmp_path / "small.png", size=(64, 48))
    r = run_cli("encode", small, "-o", tmp_path / "a.npy", "--max-pixels", "1000", *SMALL)
    assert r.returncode == 1 and b"max-pixels" in r.stderr and not (tmp_path / "a.npy").exists()
    r = run_cli("encode", small, "-o", tmp_path / "a.npy", "--max-pixels", "3072", *SMALL)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_decoder_memory_is_capped(tmp_path):
    """A worker's address space is limited, so a header that lies past --max-pixels cannot exhaust RAM."""
    script = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from vitembed.workers import limit_memory; limit_memory(1000)\n"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0])\n"
        "try:\n    b = bytearray(8 << 30)\nexcept MemoryError:\n    print('refused')\n"
    ) % str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.stdout.split() == [str((4 << 30) + 32 * 1000).encode(), b"refused"]


# --- inputs: awkward but valid -------------------------------------------------------------


def _exif_rotated_jpeg(path: Path) -> np.ndarray:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(path, exif=exif, quality=95)
    return array


AWKWARD = {
    "1x1.png": lambda p: make_image(p, size=(1, 1)),
    "20000x10.png": lambda p: make_image(p, size=(20000, 10)),
    "10x20000.png": lambda p: make_image(p, size=(10, 20000)),
    "cmyk.jpg": lambda p: make_image(p, mode="CMYK"),
    "grey16.png": lambda p: Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(p),
    "rgb16.png": lambda p: p.write_bytes(_png16_rgb(np.random.default_rng(0).integers(0, 65536, (30, 20, 3)))),
    "float.tif": lambda p: Image.fromarray(np.random.default_rng(0).random((30, 20), np.float32)).save(p),
    "palette_alpha.png": lambda p: make_image(p, mode="P", transparency=0),
    "rgba.webp": lambda p: make_image(p, mode="RGBA"),
    "la.png": lambda p: make_image(p, mode="LA"),
    "bilevel.bmp": lambda p: make_image(p, mode="1"),
}


@pytest.mark.parametrize("name", sorted(AWKWARD))
@pytest.mark.parametrize("resize", ["squash", "crop", "pad"])
def test_awkward_valid_images_encode_finite(tmp_path, name, resize):
    from vitembed.layer import build_layer, resolve_config
    from vitembed.encoder import encode_images

    path = tmp_path / name
    AWKWARD[name](path)
    prep = Preprocess(image_size=32, resize=resize)
    pixels = load_image(path, prep)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    layer = build_layer(resolve_config(None, image_size=32, patch_size=8, emb_dim=16), seed=0)
    z = encode_images([path], layer, prep)
    assert z.shape == (1, 17, 16) and torch.isfinite(z).all()


def test_first_frame_of_animation_and_multipage_tiff(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "lime", "blue")]
    for name in ("anim.gif", "pages.tif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        pixels = load_image(tmp_path / name, PREP)
        assert tuple(pixels[16, 16]) == (255, 0, 0), name


def test_exif_orientation_applied(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rot.jpg")
    pixels = load_image(tmp_path / "rot.jpg", Preprocess(image_size=40, resize="pad", background=(0, 0, 0)))
    # Stored 40 wide x 20 high, shown rotated: 20 wide x 40 high, white half on top.
    assert pixels[5, 20].mean() > 200 and pixels[35, 20].mean() < 50


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "La", "RGBa", "PA", "HSV", "LAB"]


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(MODES),
       channels=st.sampled_from([1, 3]), resize=st.sampled_from(["squash", "crop", "pad"]))
def test_any_shape_and_mode_loads(w, h, mode, channels, resize):
    from vitembed.images import _prepare

    rng = np.random.default_rng(w * 1000 + h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I", "I;16", "F"):
        im = im.convert("L").convert(mode)
    elif mode == "PA":
        im = im.convert("P").convert("PA")
    else:
        im = im.convert(mode)
    out = _prepare(im, Preprocess(image_size=16, channels=channels, resize=resize))
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8


# --- inputs: awkward paths -----------------------------------------------------------------


def test_awkward_paths(tmp_path):
    folder = tmp_path / "in"
    names = ["with space.png", "ünïcødé 画像.png", "-leading-dash.png", "new\nline.png"]
    for name in names:
        make_image(folder / name)
    raw = os.fsencode(str(folder)) + b"/caf\xe9.png"  # not valid UTF-8
    make_image(Path(os.fsdecode(raw)))
    (folder / "link.png").symlink_to(folder / "with space.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to(folder)  # a folder loop
    paths = [str(folder / n).encode() for n in names] + [raw, str(folder / "link.png").encode(),
                                                         str(folder / "missing.png").encode()]
    r = run_cli("encode", "-", "-0", "-o", tmp_path / "out", "--json", *SMALL, input=b"\0".join(paths))
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    records = _json_lines(r.stdout)
    assert len(records) == len(paths)
    by_status = {rec["input"]: rec["status"] for rec in records}
    assert by_status[str(folder / "missing.png")] == "error"
    assert [rec["status"] for rec in records].count("ok") == len(paths) - 1
    assert any(rec["input"].endswith("caf\\xe9.png") for rec in records)
    assert b"caf\\xe9.png" in r.stderr or b"missing.png" in r.stderr
    # The folder walk follows the link, passes over the loop and ends.
    r = run_cli("encode", folder, "-o", tmp_path / "out2", "--json", *SMALL, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(_json_lines(r.stdout)) == len(names) + 2  # + caf\xe9.png and link.png
    # A leading dash after --, on the command line.
    r = run_cli("encode", "-o", tmp_path / "dash.npy", *SMALL, "--", folder / "-leading-dash.png", cwd=folder)
    assert r.returncode == 0, r.stderr


def test_fifo_in_folder_is_an_error(tmp_path):
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    os.mkfifo(folder / "pipe.png")  # reading it blocks forever
    r = run_cli("encode", folder, "-o", tmp_path / "out", "--json", *SMALL, timeout=60)
    rec = {Path(x["input"]).name: x for x in _json_lines(r.stdout)}
    assert rec["pipe.png"]["status"] == "error" and "regular file" in rec["pipe.png"]["error"]
    assert rec["a.png"]["status"] == "ok"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_fifos_named_directly_or_on_stdin_are_refused_without_waiting(tmp_path, workers):
    """#12.14: a FIFO is refused before it is opened for reading: no hang with --workers 0, no
    decode timeout to wait out with decoders."""
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    start = time.monotonic()
    r = run_cli("encode", folder / "pipe.png", "-", "-o", tmp_path / f"out{workers}", "--json", "-j", workers,
                *SMALL, input=bytes(folder / "a.png") + b"\n" + bytes(folder / "pipe.png") + b"\n", timeout=60)
    records = _json_lines(r.stdout)
    assert r.returncode == 1 and time.monotonic() - start < 20
    assert [(Path(x["input"]).name, x["status"]) for x in records] == [("pipe.png", "error"), ("a.png", "ok"),
                                                                        ("pipe.png", "error")]
    assert all("not a regular file" in x["error"] for x in records if x["status"] == "error")


# --- subprocess runs that are signalled or lose a worker -----------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """300 small photos-like images: enough that a run is still going when it is signalled."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def reference_run(many_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run_cli("encode", many_images, "-o", out, *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    return out


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitembed", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)  # unbuffered: readline
    # takes exactly one line, and communicate() gets the rest


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


def _same_as_reference(out: Path, reference: Path) -> None:
    got, want = _outputs(out), _outputs(reference)
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want), "resumed outputs differ from an uninterrupted run"
    assert not list(out.glob(".vitembed-*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_is_byte_identical(many_images, reference_run, tmp_path, signum, code):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "1", *SMALL)
    first = proc.stdout.readline()
    assert json.loads(first)["status"] == "ok"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert b"Traceback" not in stderr and b"--skip-existing" in stderr
    done = len(_outputs(out))
    assert 0 < done < 300
    for name, data in _outputs(out).items():  # whole files only
        assert np.load(io.BytesIO(data)).shape == (17, 16)
    r = run_cli("encode", many_images, "-o", out, "--json", "--skip-existing", *SMALL)
    assert r.returncode == 0, r.stderr
    statuses = [rec["status"] for rec in _json_lines(r.stdout)]
    assert statuses.count("skipped") == done and statuses.count("ok") == 300 - done
    _same_as_reference(out, reference_run)
    # The manifest's last line for each input says what it is now.
    last = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["input"]] = rec
    assert len(last) == 300 and all(r["status"] in ("ok", "skipped") and r["shape"] == [17, 16] for r in last.values())


@pytest.mark.slow
def test_sigkill_leaves_only_whole_files_and_resume_cleans_up(many_images, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "1", *SMALL)
    proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoders, at once
    proc.communicate(timeout=30)
    stale = out / ".vitembed-999999999-00000000deadbeef.tmp"  # as a killed run leaves them
    stale.write_bytes(b"torn")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"input": "torn')  # a manifest line cut by the kill
    for path in out.glob("*.npy"):
        assert np.load(path).shape == (17, 16)
    r = run_cli("encode", many_images, "-o", out, "--skip-existing", *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    _same_as_reference(out, reference_run)
    for line in (out / "manifest.jsonl").read_text().splitlines():
        json.loads(line)


def _descendants(pid: int) -> list[int]:
    """Processes below `pid`, from /proc (the decoders sit below the forkserver, below the run)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the decoder processes")
def test_ctrl_c_does_not_wait_for_a_hung_decode(many_images, tmp_path):
    """A decoder that hangs (stopped with SIGSTOP here) does not hold up Ctrl-C: it is killed."""
    proc = _start("encode", many_images, "-o", tmp_path / "out", "--json", "-j", "1", *SMALL)
    proc.stdout.readline()  # the run is under way
    decoders = [pid for pid in _descendants(proc.pid) if _parent(pid) != proc.pid]  # below the forkserver
    assert decoders
    for pid in decoders:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)  # far below the 120 s decode timeout
    assert proc.returncode == 130 and b"--skip-existing" in stderr and b"Traceback" not in stderr


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the decoder processes")
def test_killed_decoder_costs_no_result(many_images, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "2", *SMALL)
    lines = [proc.stdout.readline()]
    # The decoders are the grandchildren of the run (run -> forkserver -> decoders).
    children = set(_descendants(proc.pid))
    grandchildren = [p for p in children if any(p in _descendants(c) for c in children)]
    assert grandchildren
    os.kill(grandchildren[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    records = _json_lines(b"".join(lines) + stdout)
    assert len(records) == 300 and all(r["status"] == "ok" for r in records)
    _same_as_reference(out, reference_run)


@pytest.mark.slow
def test_closed_pipe_ends_quietly(many_images, tmp_path):
    proc = _start("encode", many_images, "-o", tmp_path / "out", "--json", "-b", "4", *SMALL)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 141) and b"Traceback" not in stderr and b"Exception" not in stderr


# --- outputs -------------------------------------------------------------------------------


def test_other_configuration_refused_or_overwritten(photo_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("encode", photo_dir, "-o", out, *SMALL, "-q").returncode == 0
    before = _outputs(out)
    r = run_cli("encode", photo_dir, "-o", out, "--image-size", "64", "--patch-size", "8", "--emb-dim", "16",
                "--skip-existing")
    assert r.returncode == 2 and b"image_size: 32 then, 64 now" in r.stderr
    assert _outputs(out) == before
    # --overwrite removes the old configuration's outputs, even those this run does not remake.
    r = run_cli("encode", photo_dir / "a.png", "-o", out, "--image-size", "64", "--patch-size", "8",
                "--emb-dim", "16", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(_outputs(out)) == ["a.npy"] and np.load(out / "a.npy").shape == (65, 16)
    assert not (out / "sub" / "c.npy").exists()


def test_skip_existing_follows_moved_collision_names(tmp_path):
    folder = tmp_path / "in"
    make_image(folder / "pet.png", seed=1)
    out = tmp_path / "out"
    assert run_cli("encode", folder, "-o", out, *SMALL, "-q").returncode == 0
    make_image(folder / "pet.jpg", seed=2)  # sorts first: now pet.jpg -> pet.npy, pet.png -> pet.png.npy
    r = run_cli("encode", folder, "-o", out, "--skip-existing", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert [rec["status"] for rec in _json_lines(r.stdout)] == ["ok", "ok"]
    fresh = tmp_path / "fresh"
    assert run_cli("encode", folder, "-o", fresh, *SMALL, "-q").returncode == 0
    assert _outputs(out) == _outputs(fresh)


def test_uncreatable_output_folder(photo_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("encode", photo_dir, "-o", tmp_path / "file" / "out", *SMALL)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"not a folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where mounting is allowed (root on Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_full_disk_stops_with_one_clear_message(many_images, small_disk):
    out = small_disk / "out"
    r = run_cli("encode", many_images, "-o", out, "--image-size", "64", "--patch-size", "8", "--emb-dim", "64",
                "-b", "4", "-q")
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"disk full" in r.stderr
    written = list(out.glob("*.npy"))
    assert written and len(written) < 300
    for path in written:
        assert np.load(path).shape == (65, 64)
    assert not list(out.glob(".vitembed-*.tmp"))


@pytest.mark.slow
def test_read_only_target(photo_dir, small_disk):
    (small_disk / "out").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    r = run_cli("encode", photo_dir, "-o", small_disk / "out", *SMALL)
    assert r.returncode == 1 and b"read-only" in r.stderr and b"Traceback" not in r.stderr


# --- safety --------------------------------------------------------------------------------


def test_inputs_untouched_and_nothing_written_outside_output(tmp_path):
    folder = tmp_path / "deep" / "in"
    a = make_image(folder / "a.png")
    b = make_image(tmp_path / "b.png", seed=3)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    out = tmp_path / "deep" / "out"
    listing = f"{folder}/../in/a.png\n{tmp_path}/deep/../b.png\n../../b.png\n".encode()
    r = run_cli("encode", "-", "-o", out, "--json", *SMALL, input=listing, cwd=folder)
    assert r.returncode == 0, r.stderr
    for rec in _json_lines(r.stdout):
        assert Path(rec["output"]).resolve().is_relative_to(out.resolve())
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)} == digest
    everything = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert everything - {a, b} == {p for p in everything if p.is_relative_to(out)}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/stat").exists(), reason="needs fork and /proc")
def test_temporary_of_a_zombie_writer_is_stale(tmp_path):
    """A decoder killed with its parent is a zombie until init reaps it (slowly, in some
    containers); its temporary file is as stale as a dead process's."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f".vitembed-{pid}-0a1b2c3d4e5f6789.tmp").write_bytes(b"torn")
        (tmp_path / f".vitembed-{os.getpid()}-0a1b2c3d4e5f6789.tmp").write_bytes(b"being written")  # a live writer's
        assert clean_stale_temporaries(tmp_path) == 1
        assert [p.name for p in tmp_path.iterdir()] == [f".vitembed-{os.getpid()}-0a1b2c3d4e5f6789.tmp"]
    finally:
        os.waitpid(pid, 0)
