"""Fast paths give the plain path's tokens: the torch engine's fused layer, the whole path against
torchvision's recipe, and --fast-decode within its stated tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tests.conftest import make_image, slow_but
from vitembed.encoder import Encoder, encode_images
from vitembed.images.decode import Preprocess, load_image
from vitembed.layer.reference import PRESETS, build_layer

# --- the channels-last layer input ---------------------------------------------------------


@pytest.mark.parametrize("preset", slow_but(["vitbook-s14", "vit-b16", "vit-b32"], "vitbook-s14"))
def test_channels_last_forward_matches_nchw(preset, sample_paths):
    """The torch engine (channels-last, normalisation folded into E) gives the NCHW layer's tokens,
    to float32 rounding: sums of P^2*C products in another order (|z0| is about 1)."""
    layer = build_layer(PRESETS[preset])
    prep = Preprocess()
    pixels = torch.from_numpy(np.stack([load_image(p, prep) for p in sample_paths]))  # (B, S, S, C)
    with torch.inference_mode():
        fast = Encoder(layer, prep, engine="torch", device="cpu").torch(pixels)
        mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        x = ((pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()  # NCHW
        plain = layer(x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 9),
                    reason="torch.backends.cudnn.conv.fp32_precision, the setting this test reads, is new in torch 2.9")
def test_forward_convolves_in_full_float32(monkeypatch):
    """cuDNN's TF32 default (Ampere and later GPUs) is off while the layer runs, and restored after."""
    precision = lambda: torch.backends.cudnn.conv.fp32_precision  # noqa: E731
    seen = []
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: seen.append(precision()) or conv2d(*a, **k))
    layer = build_layer(PRESETS["vitbook-s14"])
    saved = precision()  # served by __getattr__: set and restored by hand, not by monkeypatch
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with torch.inference_mode():
            Encoder(layer, Preprocess(), engine="torch", device="cpu").torch(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
        assert seen == ["ieee"] and precision() == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved


def test_encode_matches_torchvision_reference(sample_paths):
    """The whole fast path against the seed's recipe: torchvision Resize + ToTensor + Normalize."""
    layer = build_layer(PRESETS["vit-b16"])
    transform = T.Compose([T.Resize((224, 224)), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    reference = []
    with torch.inference_mode():
        for p in sample_paths:
            im = Image.open(p)
            rgb = im.convert("RGB") if im.mode != "RGBA" else _over_white(im)
            reference.append(layer(transform(rgb).unsqueeze(0))[0])
    torch.testing.assert_close(encode_images(sample_paths, layer), torch.stack(reference))


def _over_white(im: Image.Image) -> Image.Image:
    base = Image.new("RGB", im.size, (255, 255, 255))
    base.paste(im, mask=im.getchannel("A"))
    return base


# --- --fast-decode -------------------------------------------------------------------------

# Stated tolerance of --fast-decode (JPEG DCT scaling to at least 2 S, then the same resize), on a
# photo-like JPEG: mean |pixel difference| after the resize under 0.5 (of 255; measured 0.15),
# the largest under 8; tokens of the seed layer within 0.01 mean and 0.1 max absolute difference
# (measured 0.003 and 0.023, with mean |z0| about 1).


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory, sample_paths) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    src = Image.open(sample_paths[0]).convert("RGB")
    src.resize((2000, 1500), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


@pytest.mark.parametrize("resize", ["squash", "crop", "pad"])
def test_fast_decode_within_tolerance(big_jpeg, resize):
    exact = load_image(big_jpeg, Preprocess(resize=resize))
    fast = load_image(big_jpeg, Preprocess(resize=resize, fast_decode=True))
    diff = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
    assert diff.any(), "--fast-decode decoded the full image"
    assert diff.mean() < 0.5 and diff.max() < 8
    layer = build_layer(PRESETS["vitbook-s14"])
    z_exact, z_fast = encode_images([exact], layer), encode_images([fast], layer)
    assert (z_exact - z_fast).abs().mean() < 0.01
    assert (z_exact - z_fast).abs().max() < 0.1


def test_fast_decode_leaves_small_jpegs_and_pngs_alone(tmp_path, sample_paths):
    small = make_image(tmp_path / "small.jpg", size=(400, 300))
    for path in (small, *sample_paths):  # none is at least 448 px on both sides as JPEG ... or a PNG
        if path.suffix == ".jpg" and min(Image.open(path).size) >= 448:
            continue
        np.testing.assert_array_equal(load_image(path, Preprocess(fast_decode=True)), load_image(path, Preprocess()))
