"""`--decode gpu`: JPEGs decoded and resized by torchvision on the layer's device, in batches.

No GPU here: the same code runs on the CPU device (torchvision's decode_jpeg, libjpeg-turbo), with
`pipeline._DEVICE_DECODE_TYPES` widened to let it. On a CUDA device the decoder is nvJPEG.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.conftest import encode_with, make_image, run_cli, slow_but
from vitembed.images import device as devicedecode
from vitembed.pipeline import skeleton as pipeline
from vitembed.images.device import decode_jpegs, orient
from vitembed.errors import ConfigError
from vitembed.images.decode import PlainJpeg, Preprocess, load_image, read_plain_jpeg
from vitembed.layer.reference import PRESETS, LayerConfig, build_layer
from vitembed.pipeline.skeleton import EncodeOptions

CPU = torch.device("cpu")


def _photo_jpegs(folder: Path, sample_paths: list[Path]) -> list[Path]:
    """JPEGs of the sample photos, of several sizes (some equal, resized together), and one with
    an EXIF rotation."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(sample_paths):
        im = Image.open(src).convert("RGB")
        for size in ((320, 240), (320, 240), (301, 433)):
            path = folder / f"p{i}-{size[0]}x{size[1]}-{len(paths)}.jpg"
            im.resize(size).save(path, quality=90)
            paths.append(path)
    rotated = Image.open(sample_paths[0]).convert("RGB").resize((200, 120))
    exif = rotated.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    return paths + [folder / "rotated.jpg"]


def _odd_files(folder: Path) -> dict[str, str]:
    """Files the device does not decode: name -> what becomes of them (ok, or an error)."""
    make_image(folder / "progressive.jpg", (90, 70), progressive=True)
    make_image(folder / "cmyk.jpg", (90, 70), mode="CMYK")
    make_image(folder / "plain.png", (90, 70))
    good = make_image(folder / "whole.jpg", (90, 70)).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    # Starts and ends as a JPEG, but Pillow cannot read its header: the error is Pillow's.
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 200 + b"\xff\xd9")
    return {"progressive.jpg": "ok", "cmyk.jpg": "ok", "plain.png": "ok", "whole.jpg": "ok",
            "truncated.jpg": "error", "garbage.jpg": "error"}


def test_plain_jpegs_only(tmp_path, sample_paths):
    photo = _photo_jpegs(tmp_path, sample_paths[:1])[0]
    _odd_files(tmp_path)
    prep = Preprocess()
    assert read_plain_jpeg(photo, prep) == PlainJpeg(bytearray(photo.read_bytes()), 1, 320 * 240)
    assert read_plain_jpeg(tmp_path / "rotated.jpg", prep).orientation == 6
    assert read_plain_jpeg(tmp_path / "whole.jpg", prep) is not None
    for name in ("progressive.jpg", "cmyk.jpg", "plain.png", "truncated.jpg", "garbage.jpg", "missing.jpg"):
        assert read_plain_jpeg(tmp_path / name, prep) is None, name
    assert read_plain_jpeg(photo, Preprocess(channels=1)) is None
    assert read_plain_jpeg(photo, Preprocess(max_pixels=320 * 240 - 1)) is None


@pytest.mark.parametrize("resize", slow_but(["squash", "crop", "pad"], "crop"))
@pytest.mark.parametrize("interpolation", slow_but(["bilinear", "bicubic"], "bicubic"))
def test_decode_jpegs_matches_pillow(tmp_path, sample_paths, resize, interpolation):
    """Near Pillow's pixels in every resize mode, the EXIF rotation applied. The decode itself is
    identical here (libjpeg-turbo on both sides); the resizes differ at odd scale factors (301 x
    433 -> 224 here) by up to 1 level (bilinear) or 5 (bicubic, at sharp edges), 0.2 on average."""
    limit = {"bilinear": 1, "bicubic": 5}[interpolation]
    prep = Preprocess(resize=resize, interpolation=interpolation, background=(10, 200, 30))
    paths = _photo_jpegs(tmp_path, sample_paths)
    got = decode_jpegs([read_plain_jpeg(p, prep) for p in paths], prep, CPU)
    for path, pixels in zip(paths, got):
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (224, 224, 3)
        diff = np.abs(pixels.numpy().astype(int) - load_image(path, prep).astype(int))
        assert diff.max() <= limit and diff.mean() < 0.25, (path.name, diff.max(), diff.mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_as_pillow(tmp_path, orientation):
    """All eight EXIF orientations, applied by vitembed on every device (torchvision applies them
    on the CPU only, and nvJPEG not at all): as Pillow's exif_transpose, exactly, and end to end."""
    a = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    got = orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    im = Image.fromarray(a)
    im.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(got, expected)

    path = tmp_path / "o.jpg"
    photo = Image.fromarray(np.kron(a, np.ones((40, 40, 1), dtype=np.uint8)))  # 280 x 200, blocky
    exif = photo.getexif()
    exif[0x0112] = orientation
    photo.save(path, exif=exif, quality=95)
    prep = Preprocess()
    jpeg = read_plain_jpeg(path, prep)
    assert jpeg.orientation == orientation
    pixels = decode_jpegs([jpeg], prep, CPU)[0].numpy()
    assert np.abs(pixels.astype(int) - load_image(path, prep).astype(int)).max() <= 1


def test_large_batches_are_decoded_in_chunks(tmp_path, sample_paths, monkeypatch):
    """No more than CHUNK_PIXELS decoded at once (an image larger than that alone); same pixels."""
    from vitembed.images import device as devicedecode

    prep = Preprocess()
    jpegs = [read_plain_jpeg(p, prep) for p in _photo_jpegs(tmp_path, sample_paths)]
    whole = decode_jpegs(jpegs, prep, CPU)
    chunks = []
    real = devicedecode._decode_chunk
    monkeypatch.setattr(devicedecode, "_decode_chunk", lambda chunk, *a: chunks.append([j.pixels for j in chunk]) or real(chunk, *a))
    limit = 2 * 320 * 240  # two 320 x 240 photos together; a 301 x 433 one then starts a chunk
    monkeypatch.setattr(devicedecode, "CHUNK_PIXELS", limit)
    chunked = decode_jpegs(jpegs, prep, CPU)
    assert sum(map(len, chunks)) == len(jpegs) and max(map(len, chunks)) == 2
    assert all(sum(c) <= limit for c in chunks)
    monkeypatch.setattr(devicedecode, "CHUNK_PIXELS", 1000)  # smaller than any image: one at a time
    chunks.clear()
    assert all(torch.equal(a, b) for a, b in zip(whole, decode_jpegs(jpegs, prep, CPU)))
    assert list(map(len, chunks)) == [1] * len(jpegs)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_a_file_the_device_refuses_goes_to_pillow(tmp_path, sample_paths):
    prep = Preprocess()
    paths = _photo_jpegs(tmp_path, sample_paths[:1])
    jpegs = [read_plain_jpeg(p, prep) for p in paths]
    good = bytearray(paths[0].read_bytes())
    half = len(good) // 2
    broken = good[:half] + bytearray(b"\x00" * 64) + good[half + 64:]  # scan data damaged, still ends in EOI
    got = decode_jpegs([jpegs[0], PlainJpeg(bytearray(b"\xff\xd8\xff\x00\xff\xd9")), jpegs[1]], prep, CPU)
    assert got[1] == "not an image Pillow can read"
    for pixels, path in ((got[0], paths[0]), (got[2], paths[1])):
        assert np.abs(pixels.numpy().astype(int) - load_image(path, prep).astype(int)).max() <= 1
    # Damaged scan data, whole markers: libjpeg warns and decodes on both sides, alike.
    one = decode_jpegs([PlainJpeg(broken)], prep, CPU)[0]
    assert np.abs(one.numpy().astype(int) - load_image(io.BytesIO(broken), prep).astype(int)).max() <= 1


def test_a_decode_that_is_not_rgb_goes_to_pillow(tmp_path, sample_paths, monkeypatch):
    """A device decode of the wrong shape (one channel, say, from a grey JPEG) is not resized as
    RGB: Pillow decodes that file instead."""
    import torchvision.io

    prep = Preprocess()
    paths = _photo_jpegs(tmp_path, sample_paths[:1])[:3]
    real = torchvision.io.decode_jpeg

    def one_grey(encoded, **kwargs):
        images = real(encoded, **kwargs)
        return [im[:1] if i == 1 else im for i, im in enumerate(images)]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", one_grey)
    got = decode_jpegs([read_plain_jpeg(p, prep) for p in paths], prep, CPU)
    assert got[1].shape == (224, 224, 3)
    np.testing.assert_array_equal(got[1].numpy(), load_image(paths[1], prep))  # Pillow's own pixels
    for i in (0, 2):
        assert np.abs(got[i].numpy().astype(int) - load_image(paths[i], prep).astype(int)).max() <= 1


def _encode(folder: Path, out: Path, **options) -> tuple[dict, object]:
    summary, outcomes = encode_with([folder], out, build_layer(PRESETS["vitbook-s14"], seed=0), Preprocess(),
                                    engine="torch", **options)
    return {r.input.name: r for r in outcomes}, summary


@pytest.mark.parametrize("workers", slow_but([0, 2], 0))  # 2: a pool of decoder processes
def test_encode_with_device_decoding(tmp_path, sample_paths, monkeypatch, workers):
    """The whole run: the same files succeed and fail with the same messages as with Pillow, and
    the tokens agree to within the resize's 1-level differences; other files are Pillow's, exactly."""
    folder = tmp_path / "in"
    jpegs = _photo_jpegs(folder, sample_paths)
    odd = _odd_files(folder)
    cpu_results, _ = _encode(folder, tmp_path / "cpu", decode="cpu", workers=workers)
    with pytest.raises(ConfigError, match="--decode gpu decodes with nvJPEG on a CUDA device"):
        _encode(folder, tmp_path / "refused", decode="gpu", workers=workers)
    calls = []
    real = devicedecode.decode_jpegs
    monkeypatch.setattr(devicedecode, "decode_jpegs", lambda jpegs, *a: calls.append(len(jpegs)) or real(jpegs, *a))
    monkeypatch.setattr(pipeline, "_DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    gpu_results, summary = _encode(folder, tmp_path / "gpu", decode="gpu", workers=workers, batch_size=8)
    assert calls, "no batch went through the device decoder"
    assert summary.ok == len(jpegs) + 4 and summary.errors == 2
    assert {n: (r.status, r.error) for n, r in gpu_results.items()} == {n: (r.status, r.error) for n, r in cpu_results.items()}
    assert {n: r.status for n, r in gpu_results.items() if n in odd} == odd
    for name, result in gpu_results.items():
        if result.status != "ok":
            continue
        a, b = np.load(result.output), np.load(cpu_results[name].output)
        if name in ("progressive.jpg", "cmyk.jpg", "plain.png"):  # Pillow's in both runs, batched differently
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
        else:
            assert np.abs(a - b).mean() < 5e-3 * np.abs(b).mean() and np.abs(a - b).max() < 0.5, name


def test_device_decoding_into_shards(tmp_path, sample_paths, monkeypatch):
    """A failed file's row is NaN in its shard, as with Pillow decoding."""
    folder = tmp_path / "in"
    _photo_jpegs(folder, sample_paths[:1])
    (folder / "b-garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 200 + b"\xff\xd9")
    monkeypatch.setattr(pipeline, "_DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    results, summary = _encode(folder, tmp_path / "out", decode="gpu", shard_size=3, workers=0)
    assert summary.errors == 1 and summary.ok == 4
    rows = np.load(tmp_path / "out" / "shard-00000.npy")  # b-garbage.jpg sorts first
    assert rows.shape == (3, 257, 384) and np.isnan(rows[0]).all() and not np.isnan(rows[1:]).any()
    assert np.load(tmp_path / "out" / "shard-00001.npy").shape == (2, 257, 384)


def test_decode_choices(tmp_path, sample_paths, monkeypatch):
    shutil.copy(sample_paths[0], tmp_path / "a.png")
    r = run_cli("encode", tmp_path / "a.png", "-o", tmp_path / "out", "--decode", "gpu")
    assert r.returncode == 2 and b"--decode gpu decodes with nvJPEG" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
    monkeypatch.setattr(pipeline, "_DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    with pytest.raises(ConfigError, match="interpolation lanczos is Pillow's alone"):
        layer = build_layer(PRESETS["vitbook-s14"], seed=0)
        encode_with([tmp_path], tmp_path / "o", layer, Preprocess(interpolation="lanczos"), engine="torch", decode="gpu")
    with pytest.raises(ConfigError, match="grey .* only Pillow decodes; use --decode cpu"):
        grey = build_layer(LayerConfig(224, 16, 32, in_channels=1), seed=0)
        encode_with([tmp_path], tmp_path / "o", grey, Preprocess(channels=1), engine="torch", decode="gpu")
    with pytest.raises(ConfigError, match="unknown decode"):
        EncodeOptions(decode="nvjpeg")
    # auto is Pillow until the nvJPEG path has been checked on a GPU, even where it could run
    monkeypatch.setattr(devicedecode, "decode_jpegs", lambda *a: pytest.fail("auto decoded on the device"))
    shutil.copy(sample_paths[-1], tmp_path / "b.jpg")
    results, summary = _encode(tmp_path, tmp_path / "auto", decode="auto", workers=0)
    assert summary.ok == 2 and summary.errors == 0


@pytest.mark.parametrize("out, fmt", [("-", "npy"), ("one.pt", "pt")])
def test_device_decoding_to_stdout_and_to_one_file(tmp_path, sample_paths, monkeypatch, out, fmt):
    """`-o -` and `-o FILE.pt` take the device-decoded tensor like any other (float16 here)."""
    photo = _photo_jpegs(tmp_path / "in", sample_paths[:1])[0]
    monkeypatch.setattr(pipeline, "_DEVICE_DECODE_TYPES", ("cuda", "cpu"))
    layer = build_layer(PRESETS["vitbook-s14"], seed=0)
    stream = io.BytesIO()
    target = out if out == "-" else str(tmp_path / out)
    summary, _ = encode_with([photo], target, layer, Preprocess(), engine="torch", decode="gpu", dtype="float16",
                             workers=0, stdout=stream)
    assert summary.ok == 1
    z = np.load(io.BytesIO(stream.getvalue())) if fmt == "npy" else torch.load(tmp_path / out).numpy()
    reference, _ = _encode(photo.parent, tmp_path / "cpu", decode="cpu", workers=0)
    expected = np.load(reference[photo.name].output)
    assert z.dtype == np.float16 and z.shape == expected.shape
    assert np.abs(z.astype(np.float32) - expected).mean() < 5e-3 * np.abs(expected).mean()
