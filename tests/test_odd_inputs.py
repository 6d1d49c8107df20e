"""Odd inputs: broken and lying files, awkward but valid images, awkward paths and FIFOs, each an
input's one-line error or encoded, and inputs never written to.

Every bad file is made here (truncations, bit flips, lying headers).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
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
from vitembed.images.decode import Preprocess, load_image

from tests.conftest import examples, make_image, run_cli

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


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
    from vitembed.layer.reference import build_layer, resolve_config
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


@settings(max_examples=examples(60), deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(MODES),
       channels=st.sampled_from([1, 3]), resize=st.sampled_from(["squash", "crop", "pad"]))
def test_any_shape_and_mode_loads(w, h, mode, channels, resize):
    from vitembed.images.decode import _prepare

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
    """A FIFO is refused before it is opened for reading: no hang with --workers 0, no
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


    # takes exactly one line, and communicate() gets the rest


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
