"""Any resolution against the libraries: rectangular grids, resampled position embeddings (timm,
transformers), another patch size (FlexiViT), and which tokens (--tokens).

Checkpoints are made here from randomly initialised models (one transformer block: only the input
layer matters); images are made at the exact input size, so that no pixel is resampled and the
tokens are compared with the library's own input layer on the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_image, run_cli, slow_but
from tests.seed_reference import SeedVitInputLayer
from tests.test_checkpoints import assert_clean_error, hf_vit, pixels, save
from vitembed.layer.resolution import resample_grid, resample_patch_embed, resize_matrix

ATOL = RTOL = 1e-4


def encode(weights, image: Path, out: Path, *extra) -> tuple[np.ndarray, str]:
    r = run_cli("encode", image, "-o", out, "--weights", weights, "--workers", "0", "--normalize", "none", *extra)
    assert r.returncode == 0, r.stderr.decode()
    return np.load(out), r.stderr.decode()


def image_of(tmp_path: Path, h: int, w: int, seed: int = 7) -> Path:
    return make_image(tmp_path / f"x{h}x{w}.png", size=(w, h), seed=seed)


def timm_tiny(**kw):
    """timm's vit_tiny_patch16_224 (D = 192) with one block, its tokens and E_pos random."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, **kw).eval()
    with torch.no_grad():
        m.cls_token.normal_()
        m.pos_embed.normal_()
    return m


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """A 224-pixel, P = 16 timm checkpoint, and its state dict."""
    state = timm_tiny().state_dict()
    return save(state, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), state


def timm_loaded(state: dict, **kw):
    """The model timm builds for another img_size / patch_size, loaded through timm's own filter
    (resample_abs_pos_embed and resample_patch_embed, as timm's pretrained loader calls them)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    m = timm_tiny(**kw)
    m.load_state_dict(checkpoint_filter_fn(dict(state), m))
    return m


# --------------------------------------------------------------------------- timm: another grid


@pytest.mark.parametrize("h,w", slow_but([(224, 320), (160, 160), (384, 384), (320, 224), (96, 400)],
                                         (224, 320), several=True))
def test_timm_any_grid(tiny_ckpt, tmp_path, h, w):
    """--image-size HxW on a 224 checkpoint = timm's model for img_size=(H, W), loaded by timm."""
    ckpt, state = tiny_ckpt
    m = timm_loaded(state, img_size=(h, w))
    image = image_of(tmp_path, h, w)
    z0, err = encode(ckpt, image, tmp_path / "z.npy", "--image-size", f"{h}x{w}")
    with torch.no_grad():
        expected = m._pos_embed(m.patch_embed(pixels(image)))[0]
    assert z0.shape == (1 + (h // 16) * (w // 16), 192)
    torch.testing.assert_close(torch.from_numpy(z0), expected, atol=ATOL, rtol=RTOL)
    assert f"from 14x14 to {h // 16}x{w // 16} patches" in err or (h, w) == (224, 224)


def test_info_shows_the_grid(tiny_ckpt):
    r = run_cli("info", "--weights", tiny_ckpt[0], "--image-size", "224x320")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    for s in ("image         224 x 320 x 3", "grid          14 x 20 = 280 patches (N)", "281 x 192"):
        assert s in out, out
    assert "resampled the position embedding from 14x14 to 14x20 patches" in r.stderr.decode()
    info = json.loads(run_cli("info", "--weights", tiny_ckpt[0], "--image-size", "224x320", "--json").stdout)
    assert (info["grid"], info["image_size"], info["image_width"], info["tokens"]) == ([14, 20], 224, 320, [281, 192])


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("h,w", slow_but([(32, 48), (48, 32), (16, 24), (56, 56), (24, 24)], (32, 48), several=True))
def test_transformers_interpolate_pos_encoding(tmp_path, h, w):
    """A transformers checkpoint is resampled as its class's interpolate_pos_encoding, by default and with
    --pos-resample hf = ViTModel.embeddings(x, interpolate_pos_encoding=True) (32-pixel model, P = 8)."""
    m = hf_vit("ViTModel")
    ckpt = save(m.state_dict(), tmp_path / "hf.safetensors")
    image = image_of(tmp_path, h, w)
    z0, err = encode(ckpt, image, tmp_path / "z.npy", "--image-size", f"{h}x{w}", "--pos-resample", "hf")
    with torch.no_grad():
        expected = m.embeddings(pixels(image), interpolate_pos_encoding=True)[0]
    torch.testing.assert_close(torch.from_numpy(z0), expected, atol=ATOL, rtol=RTOL)
    assert "bicubic, not antialiased, as transformers' ViTModel.interpolate_pos_encoding" in err
    if (h, w) == (32, 48):  # the default is the checkpoint library's own; timm's antialiased way differs
        default, _ = encode(ckpt, image, tmp_path / "d.npy", "--image-size", f"{h}x{w}")
        np.testing.assert_array_equal(default, z0)
        timm_way, _ = encode(ckpt, image, tmp_path / "t.npy", "--image-size", f"{h}x{w}", "--pos-resample", "timm")
        assert np.abs(timm_way - z0).max() > 1e-3


# --------------------------------------------------------------------------- the numpy resampling


@pytest.mark.parametrize("method", ["timm", "hf"])
@pytest.mark.parametrize("old,new", [((14, 14), (14, 20)), ((14, 14), (24, 24)), ((14, 14), (10, 7)),
                                     ((16, 16), (1, 40)), ((4, 6), (9, 3)), ((1, 1), (3, 5))])
def test_resampling_equals_torch(method, old, new):
    """resolution.resample_grid = F.interpolate(bicubic, align_corners=False[, antialias=True]):
    to float64 rounding against torch in float64, to float32 rounding against torch in float32
    (which rounds as it goes: within 1e-6 of the table's largest value)."""
    table = torch.randn(1, 48, *old, generator=torch.Generator().manual_seed(sum(old) * 31 + sum(new)))
    ours = resample_grid(table[0].permute(1, 2, 0).numpy(), new, method)  # (h, w, D)
    for dtype, tolerance in ((torch.float64, 1e-6), (torch.float32, 1e-6 * float(table.abs().max()))):
        theirs = F.interpolate(table.to(dtype), size=new, mode="bicubic", align_corners=False, antialias=method == "timm")
        np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).numpy(), rtol=0, atol=tolerance)
    np.testing.assert_allclose(resize_matrix(old[0], new[0], method).sum(axis=1), 1.0, atol=1e-12)


# --------------------------------------------------------------------------- FlexiViT: another patch size


@pytest.mark.parametrize("p", slow_but([8, 32, 14], 14))
def test_patch_embed_equals_timm(p):
    from timm.layers import resample_patch_embed as timm_resample

    weight = torch.nn.Conv2d(3, 64, 16, 16).weight.detach()
    ours = resample_patch_embed(weight.numpy(), p)
    assert ours.shape == (64, 3, p, p)
    np.testing.assert_allclose(ours, timm_resample(weight, [p, p]).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("p,size", slow_but([(8, None), (32, None), (8, "128x192")], (8, "128x192"), several=True))
def test_another_patch_size(tiny_ckpt, tmp_path, p, size):
    """--patch-size 8 / 32 on a P = 16 checkpoint = timm's model for that patch size, loaded by timm
    (E resampled as FlexiViT does, E_pos for the new grid); both changes are told."""
    ckpt, state = tiny_ckpt
    h, w = (224, 224) if size is None else map(int, size.split("x"))
    m = timm_loaded(state, patch_size=p, img_size=(h, w))
    image = image_of(tmp_path, h, w)
    z0, err = encode(ckpt, image, tmp_path / "z.npy", "--patch-size", str(p), *(("--image-size", size) if size else ()))
    with torch.no_grad():
        expected = m._pos_embed(m.patch_embed(pixels(image)))[0]
    assert z0.shape == (1 + (h // p) * (w // p), 192)
    torch.testing.assert_close(torch.from_numpy(z0), expected, atol=ATOL, rtol=RTOL)
    assert f"resampled the patch embedding E from 16x16 to {p}x{p} pixels" in err
    assert f"from 14x14 to {h // p}x{w // p} patches" in err
    r = run_cli("info", "--weights", ckpt, "--patch-size", str(p))
    assert r.returncode == 0 and f"patch         {p} x {p} x 3" in r.stdout.decode()
    assert "resampled the patch embedding" in r.stderr.decode() and "resampled the position" in r.stderr.decode()


def test_a_patch_size_that_does_not_divide_is_refused(tiny_ckpt, tmp_path):
    image = image_of(tmp_path, 224, 224)
    r = run_cli("encode", image, "-o", tmp_path / "z.npy", "--weights", tiny_ckpt[0], "--patch-size", "15")
    assert_clean_error(r, "image size (224) is not divisible by patch size (15)", "--image-size 210 or 225", code=2)


# --------------------------------------------------------------------------- --tokens


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory):
    torch.manual_seed(4)
    seed = SeedVitInputLayer(emb_dim=48, num_patch_row=4, image_size=32).eval()
    return seed, save(seed.state_dict(), tmp_path_factory.mktemp("seed") / "seed.pt")


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("tokens", slow_but(["z0", "patches", "patches+pos"], "patches+pos"))
def test_tokens(seed_ckpt, tmp_path, tokens, engine):
    """patches = the seed's patch_emb_layer(x).flatten(2).transpose(1, 2); patches+pos adds E_pos's
    patch rows; z0 is the seed's forward. The same from both engines."""
    seed, ckpt = seed_ckpt
    image = image_of(tmp_path, 32, 32)
    got, _ = encode(ckpt, image, tmp_path / "z.npy", "--tokens", tokens, "--engine", engine, "--device", "cpu")
    x = pixels(image)
    with torch.no_grad():
        patches = seed.patch_emb_layer(x).flatten(2).transpose(1, 2)[0]  # (N, D)
        expected = {"z0": seed(x)[0], "patches": patches, "patches+pos": patches + seed.pos_emb[0, 1:]}[tokens]
    assert got.shape == ((17 if tokens == "z0" else 16), 48)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


def test_tokens_are_recorded_and_a_resume_with_others_is_refused(tmp_path):
    folder = image_of(tmp_path / "in", 40, 56).parent
    out = tmp_path / "out"
    small = ("--image-size", "32x48", "--patch-size", "8", "--emb-dim", "16", "-q")
    r = run_cli("encode", folder, "-o", out, "--tokens", "patches+pos", *small)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((out / "run.json").read_text())["config"]["tokens"] == "patches+pos"
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert line["shape"] == [24, 16]
    r = run_cli("encode", folder, "-o", out, "--tokens", "patches", "--skip-existing", *small)
    assert r.returncode == 2 and b"--tokens patches+pos then, patches now" in r.stderr
    r = run_cli("encode", folder, "-o", out, "--skip-existing", *small)
    assert r.returncode == 2 and b"tokens" in r.stderr
    r = run_cli("encode", folder, "-o", out, "--tokens", "patches+pos", "--skip-existing", *small, "--json")
    assert r.returncode == 0 and [json.loads(line)["status"] for line in r.stdout.splitlines()] == ["skipped"]
