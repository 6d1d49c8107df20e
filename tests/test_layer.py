"""The input layer against the seed's own class and an explicit unfold-and-matmul of eq. (3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import slow_but
from tests.layers import SMALL_CONFIGS, random_layer
from tests.seed_reference import SeedVitInputLayer
from vitembed.encoder import Encoder
from vitembed.errors import ConfigError
from vitembed.images.decode import Preprocess
from vitembed.layer.reference import PRESETS, LayerConfig, VitInputLayer, build_layer, patchify, resolve_config


def unfold_matmul_reference(layer: VitInputLayer, x: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(5) spelled out with F.unfold and a matrix product, independent of the conv."""
    p, d = layer.patch_size, layer.emb_dim
    patches = nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, P^2 C, N) -> (B, N, P^2 C)
    E = layer.patch_emb_layer.weight.reshape(d, -1).T  # (P^2 C, D)
    embedded = patches @ E + layer.patch_emb_layer.bias  # (B, N, D)
    cls = layer.cls_token.expand(x.shape[0], 1, d)
    return torch.cat([cls, embedded], dim=1) + layer.pos_emb


def test_seed_signature_defaults():
    layer = VitInputLayer()
    assert (layer.in_channels, layer.emb_dim, layer.num_patch_row, layer.image_size) == (3, 384, 2, 32)
    assert layer.patch_size == 16
    assert layer.cls_token.shape == (1, 1, 384)
    assert layer.pos_emb.shape == (1, 5, 384)
    assert layer(torch.randn(2, 3, 32, 32)).shape == (2, 5, 384)


@pytest.mark.parametrize("args", [(3, 384, 2, 32), (3, 64, 4, 32), (1, 32, 7, 28), (3, 48, 16, 224)])
def test_matches_seed_class_same_init(args):
    """Built from the same seed, our layer has the seed class's exact parameters and outputs."""
    torch.manual_seed(123)
    seed_layer = SeedVitInputLayer(*args)
    torch.manual_seed(123)
    ours = VitInputLayer(*args)
    for (name_a, a), (name_b, b) in zip(seed_layer.state_dict().items(), ours.state_dict().items()):
        assert name_a == name_b
        assert torch.equal(a, b)
    x = torch.randn(3, args[0], args[3], args[3])
    torch.testing.assert_close(ours(x), seed_layer(x), rtol=0, atol=0)


def test_seed_state_dict_loads_unchanged():
    seed_layer = SeedVitInputLayer(3, 96, 14, 224)
    ours = VitInputLayer(3, 96, 14, 224)
    ours.load_state_dict(seed_layer.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(ours(x), seed_layer(x))


@pytest.mark.parametrize("name", slow_but(sorted(PRESETS), "vitbook-s14", "vit-b14", "vit-b32"))  # P = 16, 14, 32
def test_preset_matches_unfold_matmul(name):
    cfg = PRESETS[name]
    small = LayerConfig(image_size=cfg.patch_size * 3, patch_size=cfg.patch_size, emb_dim=cfg.emb_dim)
    layer = build_layer(small, seed=1)
    x = torch.randn(2, 3, small.image_size, small.image_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unfold_matmul_reference(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", slow_but(sorted(PRESETS), "vitbook-s14", "clip-b16", "dinov2-s14-reg4", "dinov3-s16",
                                          "siglip-b16"))  # each kind of prefix
def test_preset_shapes(name):
    cfg = PRESETS[name]
    n = (cfg.image_size // cfg.patch_size) ** 2
    prefix = {"siglip": 0, "dinov3": 5}.get(name.split("-")[0], 5 if name.endswith("reg4") else 1)
    assert cfg.num_patches == n
    assert cfg.token_shape == (n + prefix, cfg.emb_dim)
    assert cfg.patch_dim == cfg.patch_size**2 * 3
    layer = build_layer(cfg)
    assert sum(p.numel() for p in layer.parameters()) == cfg.num_params
    with torch.no_grad():
        assert layer(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape == (1, n + prefix, cfg.emb_dim)


def test_seed_worked_example_is_default():
    cfg = resolve_config()
    assert (cfg.image_size, cfg.patch_size, cfg.num_patch_row, cfg.patch_dim, cfg.emb_dim) == (224, 14, 16, 588, 384)
    assert cfg.token_shape == (257, 384)


def test_patchify_is_steps_one_and_two():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)  # (B, N_p, P^2 C)
    # Patch (r=0, c=1) of image 1 holds rows 0..3, columns 4..7 of every channel, channel-major.
    torch.testing.assert_close(p[1, 1], x[1, :, 0:4, 4:8].reshape(-1))
    layer = build_layer(LayerConfig(8, 4, 16))
    E = layer.patch_emb_layer.weight.reshape(16, -1).T
    with torch.no_grad():
        expected = layer.patch_emb_layer(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(p @ E + layer.patch_emb_layer.bias, expected, rtol=1e-5, atol=1e-4)


def test_token_layout_row_major():
    """Row 1 + r * grid + c of z0 is the patch at grid row r, column c."""
    layer = build_layer(LayerConfig(12, 4, 8), seed=3)
    x = torch.zeros(1, 3, 12, 12)
    x[0, :, 4:8, 8:12] = 1.0  # patch (r=1, c=2) only
    with torch.no_grad():
        z = layer(x)
        base = layer(torch.zeros(1, 3, 12, 12))
    changed = (z - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [1 + 1 * 3 + 2]


def test_class_token_row_zero():
    layer = build_layer(LayerConfig(16, 8, 8), seed=0)
    with torch.no_grad():
        z = layer(torch.randn(4, 3, 16, 16))
        expected = (layer.cls_token + layer.pos_emb[:, :1]).expand(4, 1, 8)
    torch.testing.assert_close(z[:, :1], expected)


def test_build_layer_deterministic_and_rng_untouched():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = build_layer(PRESETS["vit-s16"], seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_layer(PRESETS["vit-s16"], seed=7)
    c = build_layer(PRESETS["vit-s16"], seed=8)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a.pos_emb, c.pos_emb)


def test_init_distributions():
    layer = build_layer(LayerConfig(224, 16, 768), seed=0)
    # x_class and E_pos ~ N(0, 1); the conv as PyTorch initialises it (uniform, bound 1/sqrt(fan_in)).
    assert abs(layer.pos_emb.std().item() - 1.0) < 0.02
    assert abs(layer.pos_emb.mean().item()) < 0.02
    bound = 1 / (16 * 16 * 3) ** 0.5
    assert layer.patch_emb_layer.weight.abs().max().item() <= bound + 1e-6


def test_batch_invariance():
    """An image's tokens do not depend on the rest of its batch (needed for byte-identical resumes)."""
    layer = build_layer(PRESETS["vit-b16"], seed=0)
    x = torch.randn(9, 3, 224, 224)
    with torch.inference_mode():
        full = layer(x)
        parts = torch.cat([layer(x[:1]), layer(x[1:5]), layer(x[5:])])
    assert torch.equal(full, parts)


@pytest.mark.parametrize(
    ("size", "patch", "hint"), [(200, 16, "192 or 208"), (225, 14, "224 or 238"), (10, 16, "--image-size 16")]
)
def test_indivisible_image_size_refused(size, patch, hint):
    with pytest.raises(ConfigError) as info:
        LayerConfig(image_size=size, patch_size=patch)
    message = str(info.value)
    assert f"({size})" in message and f"({patch})" in message and hint in message


def test_resolve_config_overrides_and_errors():
    cfg = resolve_config("vit-b16", image_size=384)
    assert (cfg.image_size, cfg.patch_size, cfg.emb_dim) == (384, 16, 768)
    assert resolve_config(num_patch_row=7).patch_size == 32
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("vit-zz")
    with pytest.raises(ConfigError, match="not both"):
        resolve_config(patch_size=16, num_patch_row=14)
    with pytest.raises(ConfigError, match="num-patch-row"):
        resolve_config(num_patch_row=15)
    with pytest.raises(ConfigError, match="positive"):
        resolve_config(emb_dim=0)


def test_wrong_input_shape_names_expected():
    layer = build_layer(LayerConfig(32, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        layer(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
def test_torch_engine_equals_normalise_then_forward(config):
    """The torch engine's fused path (normalisation folded into E, `kernel.fold`) gives forward's tokens."""
    layer = random_layer(config)
    c, (h, w) = config.in_channels, config.size
    pixels = torch.randint(0, 256, (3, h, w, c), dtype=torch.uint8)
    mean, std = torch.rand(c), torch.rand(c) + 0.1
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    prep = Preprocess(image_size=h, image_width=w, channels=c, mean=tuple(mean.tolist()), std=tuple(std.tolist()))

    def fused(layer):
        return Encoder(layer, prep, engine="torch", device="cpu").torch(pixels)

    with torch.no_grad():
        torch.testing.assert_close(fused(layer), layer(x), rtol=1e-5, atol=1e-4)
    layer.patch_emb_layer.bias = None
    with torch.no_grad():
        torch.testing.assert_close(fused(layer), layer(x), rtol=1e-5, atol=1e-4)
