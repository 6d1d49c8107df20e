"""The image's own geometry: --resize crop/pad for rectangles (against timm's transforms), and
--resize native (each image its own grid, within --max-patches), through both engines and a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import encode_with, examples, json_lines, make_image, read_manifest, run_cli, slow_but
from tests.test_checkpoints import save, timm_vit
from vitembed.images import device as devicedecode
from vitembed.layer.config import LayerConfig
from vitembed.encoder import Encoder
from vitembed.errors import ConfigError
from vitembed.images.decode import Preprocess, load_image, read_plain_jpeg
from vitembed.layer.reference import build_layer
from vitembed.layer.resolution import native_grid

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Images of several aspect ratios, and the extremes: 20000 x 10, 10 x 20000, 1 x 1."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, size in enumerate([(64, 48), (48, 64), (90, 30), (33, 33), (20000, 10), (10, 20000), (1, 1)]):
        make_image(folder / f"{i}-{size[0]}x{size[1]}.png", size=size, seed=i)
    return folder


# --------------------------------------------------------------------------- crop and pad, rectangular


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("h,w", slow_but([(224, 320), (320, 224), (224, 224), (96, 160)], (224, 320), several=True))
def test_crop_and_pad_equal_timms_eval_transforms(tmp_path, h, w, interpolation):
    """crop = timm's transforms_imagenet_eval(img_size=(H, W), crop_pct) (torchvision's
    Resize(int(S / crop_pct)) + CenterCrop for a square); pad = its crop_mode="border" at
    crop_pct=1.0: the same pixels, exactly."""
    from timm.data.transforms_factory import transforms_imagenet_eval

    mean = (0.1, 0.5, 0.9)
    for i, size in enumerate([(640, 480), (480, 640), (1000, 200), (100, 900)]):
        path = make_image(tmp_path / f"{i}.png", size=size, seed=i)
        for resize, timm_args in (("crop", dict(crop_pct=0.875)), ("pad", dict(crop_pct=1.0, crop_mode="border"))):
            t = transforms_imagenet_eval(img_size=(h, w), interpolation=interpolation, normalize=False, mean=mean,
                                         **timm_args)
            theirs = t(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
            prep = Preprocess(image_size=h, image_width=w, resize=resize, interpolation=interpolation,
                              background=tuple(round(255 * v) for v in mean))
            np.testing.assert_array_equal(load_image(path, prep), theirs, err_msg=f"{resize} {size}")


def test_device_resize_follows_the_same_plan(tmp_path, sample_paths):
    """--decode gpu's resize (run on the CPU device) gives the rectangle Pillow gives, in every mode."""
    paths = []
    for i, size in enumerate([(320, 240), (240, 320), (301, 433)]):
        path = tmp_path / f"{i}.jpg"
        Image.open(sample_paths[i]).convert("RGB").resize(size).save(path, quality=90)
        paths.append(path)
    for resize in ("squash", "crop", "pad"):
        prep = Preprocess(image_size=96, image_width=160, resize=resize, background=(10, 200, 30))
        got = devicedecode.decode_jpegs([read_plain_jpeg(p, prep) for p in paths], prep,
                                        torch.device("cpu"))
        for path, pixels in zip(paths, got):
            expected = load_image(path, prep)
            assert tuple(pixels.shape) == expected.shape == (96, 160, 3)
            diff = np.abs(pixels.numpy().astype(int) - expected.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.25, (resize, path.name)
    native = Preprocess(resize="native", max_patches=196, patch_size=16)
    assert "--decode cpu" in devicedecode.unsupported(native)


# --------------------------------------------------------------------------- the native grid


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000), st.integers(1, 4096), st.sampled_from([8, 14, 16, 32]))
def test_native_grid(width, height, max_patches, p):
    """Within the budget; each side within one patch of the aspect-true size at Pix2Struct's scale
    (unless a side is clamped: a thin image keeps one row, a side at most 8192 pixels)."""
    gh, gw = native_grid(width, height, max_patches, p)
    assert 1 <= gh and 1 <= gw and gh * gw <= max_patches and gh * p <= 8192 and gw * p <= 8192
    scale = math.sqrt(max_patches * p * p / (width * height))
    for got, true in ((gh, scale * height / p), (gw, scale * width / p)):
        assert got <= max(true, 1) + 1e-9
        assert got > true - 1 - 1e-9 or got in (max_patches, 8192 // p)


@pytest.mark.parametrize("width,height,max_patches", [(640, 480, 196), (480, 640, 256), (1000, 200, 576),
                                                      (451, 300, 196), (300, 451, 2048), (123, 4567, 64)])
def test_native_grid_is_pix2structs(width, height, max_patches):
    """transformers' Pix2Struct rule, from its extract_flattened_patches (where its floats do not
    fall just short of a whole number)."""
    scale = (max_patches * (16 / height) * (16 / width)) ** 0.5
    rows = max(min(int(scale * height / 16), max_patches), 1)
    cols = max(min(int(scale * width / 16), max_patches), 1)
    assert native_grid(width, height, max_patches, 16) == (rows, cols)
    assert native_grid(224, 224, 196, 16) == (14, 14)  # an exact fit, which Pix2Struct's floats may miss


# --------------------------------------------------------------------------- native tokens


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory) -> Path:
    return save(timm_vit(reg_tokens=1).state_dict(), tmp_path_factory.mktemp("ckpt") / "timm.safetensors")


def _run(inputs, out: Path, *extra) -> list[dict]:
    r = run_cli("encode", *inputs, "-o", out, "--json", "--workers", "0", *extra)
    assert r.returncode == 0, r.stderr.decode()
    return json_lines(r.stdout)


@pytest.mark.parametrize("extra", slow_but([(), ("--max-patches", "40"), ("--pos-resample", "hf"), ("--tokens", "patches+pos")],
                                           ()))
def test_native_equals_squash_at_the_images_grid(timm_ckpt, shapes, tmp_path, extra):
    """Each image's tokens = a --image-size {gh P}x{gw P} --resize squash run of it with the same
    weights (E_pos resampled once from the checkpoint's 4 x 4 grid); the grid is in --json."""
    records = _run([shapes], tmp_path / "native", "--weights", timm_ckpt, "--resize", "native", *extra)
    assert len(records) == 7 and all(r["status"] == "ok" for r in records)
    budget = int(extra[1]) if extra[:1] == ("--max-patches",) else 16
    tokens = extra[1] if extra[:1] == ("--tokens",) else "z0"
    for i, record in enumerate(records):
        gh, gw = record["grid"]
        w, h = map(int, Path(record["input"]).stem.split("-")[1].split("x"))
        assert (gh, gw) == native_grid(w, h, budget, 8) and gh * gw <= budget
        z = np.load(record["output"])
        assert z.shape == (gh * gw + (2 if tokens == "z0" else 0), 48) and record["shape"] == list(z.shape)
        squash = _run([record["input"]], tmp_path / f"squash-{i}.npy", "--weights", timm_ckpt, "--resize", "squash",
                      "--image-size", f"{gh * 8}x{gw * 8}", *[e for e in extra if e != "--max-patches" and e != "40"])
        np.testing.assert_array_equal(z, np.load(squash[0]["output"]))


def test_native_random_layer_resamples_its_own_pos_embed(shapes, tmp_path):
    """A random layer's native grids resample its E_pos, as for a checkpoint: its layer file with
    --weights and the image's squash size gives the same tokens."""
    layer = tmp_path / "layer.pt"
    assert run_cli("init", *SMALL, "--seed", "3", "-o", layer).returncode == 0
    image = shapes / "0-64x48.png"
    native = _run([image], tmp_path / "n.npy", *SMALL, "--seed", "3", "--resize", "native")[0]
    assert native["grid"] == [3, 4]
    squash = _run([image], tmp_path / "s.npy", "--weights", layer, "--image-size", "24x32")[0]
    np.testing.assert_array_equal(np.load(native["output"]), np.load(squash["output"]))


def test_native_through_both_engines_and_the_api(shapes):
    """The numpy and torch engines agree; a list of images of several grids gives a list."""
    layer = build_layer(LayerConfig(32, 8, 16, num_reg_tokens=2), seed=1)
    prep = Preprocess(image_size=32, resize="native", max_patches=24, patch_size=8)
    files = sorted(shapes.iterdir())
    numpy_engine, torch_engine = (Encoder(layer, prep, engine=e, device="cpu") for e in ("numpy", "torch"))
    assert numpy_engine.token_shape is None
    a, b = numpy_engine.encode_files(files), torch_engine.encode_files(files)
    assert a.errors == b.errors == [None] * len(files)
    for x, y, path in zip(a.tokens, b.tokens, files):
        pixels = numpy_engine.decode(path)
        gh, gw = numpy_engine.grid_of(pixels)
        assert x.shape == (3 + gh * gw, 16) and (pixels.shape[0], pixels.shape[1]) == (gh * 8, gw * 8)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-5)
    mixed = [numpy_engine.decode(f) for f in files[:3]]
    assert [t.shape for t in torch_engine.encode(mixed)] == [t.shape for t in a.tokens[:3]]


def test_native_run_records_and_refusals(shapes, tmp_path):
    out = tmp_path / "out"
    summary, outcomes = encode_with([shapes], out, build_layer(LayerConfig(32, 8, 16), seed=0),
                                    Preprocess(image_size=32, resize="native", max_patches=16, patch_size=8), workers=2)
    assert summary.ok == 7 and all(o.grid is not None and o.shape[0] == o.grid[0] * o.grid[1] + 1 for o in outcomes)
    records = _run([shapes], tmp_path / "cli", *SMALL, "--resize", "native")
    lines = read_manifest(tmp_path / "cli")
    assert [line["grid"] for line in lines] == [r["grid"] for r in records]
    assert {tuple(line["grid"]) for line in lines} >= {(1, 16), (16, 1), (4, 4)}  # the extremes
    config = json.loads((tmp_path / "cli" / "run.json").read_text())["config"]
    assert (config["preprocess"]["resize"], config["preprocess"]["max_patches"]) == ("native", 16)
    again = run_cli("encode", shapes, "-o", tmp_path / "cli", *SMALL, "--resize", "native", "--skip-existing", "--json")
    assert again.returncode == 0 and {r["status"] for r in json_lines(again.stdout)} == {"skipped"}
    for extra, message in ((("--shard-size", "4"), "each image has a grid"),
                           (("--decode", "gpu"), "--decode cpu"), (("--max-patches", "0"), "max-patches from 1")):
        r = run_cli("encode", shapes, "-o", tmp_path / "x", *SMALL, "--resize", "native", *extra)
        assert r.returncode == 2 and message in r.stderr.decode(), r.stderr.decode()
    r = run_cli("encode", shapes, "-o", tmp_path / "x", *SMALL, "--max-patches", "8")
    assert r.returncode == 2 and "--max-patches 8 is for --resize native" in r.stderr.decode()
    with pytest.raises(ConfigError, match="--resize native cuts 16-pixel patches"):
        Encoder(build_layer(LayerConfig(32, 8, 16)), Preprocess(resize="native", max_patches=16, patch_size=16))


def test_native_fast_decode_keeps_the_grid_of_a_rotated_jpeg(tmp_path):
    """--fast-decode asks the JPEG decoder for twice the image's grid in the file's orientation, and
    the grid is the whole image's: DCT scaling rounds this 601 x 603 image to 151 x 151 at 1/4,
    whose own grid would be 4 x 4."""
    path = tmp_path / "r.jpg"
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (601, 603, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6  # shown turned: 601 wide, 603 high
    photo.save(path, exif=exif, quality=95)
    prep = Preprocess(resize="native", max_patches=16, patch_size=16)
    slow, fast = load_image(path, prep), load_image(path, Preprocess(resize="native", max_patches=16, patch_size=16,
                                                                      fast_decode=True))
    assert native_grid(601, 603, 16, 16) == (4, 3) and native_grid(151, 151, 16, 16) == (4, 4)
    assert slow.shape == fast.shape == (16 * 4, 16 * 3, 3)
    assert np.abs(slow.astype(int) - fast.astype(int)).mean() < 2


def test_rectangular_api(tmp_path, shapes):
    import vitembed

    summary = vitembed.encode([shapes / "0-64x48.png"], tmp_path / "o.npy", image_size=(24, 40), patch_size=8,
                              emb_dim=16, tokens="patches", workers=0)
    assert summary.ok == 1 and np.load(tmp_path / "o.npy").shape == (15, 16)
    layer = vitembed.build_layer(vitembed.LayerConfig(24, 8, 16, image_width=40))
    encoder = vitembed.Encoder(layer, tokens="patches+pos")
    assert encoder.token_shape == (15, 16) and encoder.decode(shapes / "1-48x64.png").shape == (24, 40, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, 24, 40\)"):
        layer(torch.zeros(1, 3, 40, 24))
    for bad, message in (("24x", "height x width"), ("24x36", "24x32 or 24x40")):
        r = run_cli("info", "--image-size", bad, "--patch-size", "8")
        assert r.returncode == 2 and message in r.stderr.decode()
    r = run_cli("info", "--image-size", "24x40", "--num-patch-row", "3")
    assert r.returncode == 2 and "--num-patch-row is for square images" in r.stderr.decode()


def test_show_draws_rectangular_grids(tmp_path, shapes):
    """`vitembed show` follows a rectangular layer's grid; native (a grid per image) is encode's."""
    out = tmp_path / "p.png"
    r = run_cli("show", "patches", shapes / "0-64x48.png", *SMALL[2:], "--image-size", "24x40", "-o", out)
    assert r.returncode == 0, r.stderr.decode()
    with Image.open(out) as im:
        boxes = json.loads(im.text["vitembed"])
    left, top, right, bottom = boxes["panels"]["image"]
    assert (right - left) * 24 == (bottom - top) * 40
    r = run_cli("show", "positions", *SMALL[2:], "--image-size", "24x40", "--emb-dim", "16", "-o", tmp_path / "q.png")
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("show", "patches", shapes / "0-64x48.png", "--resize", "native", "-o", tmp_path / "n.png")
    assert r.returncode == 2 and "--resize native is encode's" in r.stderr.decode()
