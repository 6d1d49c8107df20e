"""MAE's fixed 2-D sine-cosine position embedding (`--pos-init sincos`), against MAE's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vitembed.cli.main import app
from vitembed.layer.config import PRESETS, LayerConfig
from vitembed.layer.reference import build_layer
from vitembed.layer.posembed import sincos_2d
from vitembed.weights.load import load_weights


def mae_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True), re-derived from its
    structure: grid = meshgrid(w, h); half the channels from grid[0], half from grid[1]; each half
    [sin(p w_k), cos(p w_k)] with w_k = 1 / 10000^(k / (D/4)); a zero row for the class token."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim,g", [(384, 16), (768, 14), (32, 3)])
def test_sincos_equals_mae(dim, g):
    ours = sincos_2d(dim, (g, g), num_prefix=1)
    assert ours.dtype == np.float32 and ours.shape == (1 + g * g, dim)
    np.testing.assert_allclose(ours, mae_sincos(dim, g), rtol=0, atol=1e-6)
    # The definition, entry by entry: patch (r, c) = token 1 + r g + c; channel k < D/4 is sin(c w_k).
    r, c, k, quarter = 2, 1, 3, dim // 4
    w = 10000 ** (-k / quarter)
    row = ours[1 + r * g + c]
    assert row[k] == pytest.approx(np.sin(c * w), abs=1e-6) and row[quarter + k] == pytest.approx(np.cos(c * w), abs=1e-6)
    assert row[2 * quarter + k] == pytest.approx(np.sin(r * w), abs=1e-6)


@pytest.mark.slow  # imports timm
def test_sincos_is_timm_with_its_channels_reordered():
    from timm.layers import build_sincos2d_pos_embed

    theirs = build_sincos2d_pos_embed([4, 4], dim=64).numpy()  # (16, 64): [sin h, sin w, cos h, cos w]
    ours = sincos_2d(64, (4, 4))  # [sin w, cos w, sin h, cos h]
    q = np.arange(16)
    assert not np.allclose(ours, theirs)
    np.testing.assert_allclose(ours[:, np.concatenate([32 + q, q, 48 + q, 16 + q])], theirs, atol=1e-6)


def test_build_layer_pos_init():
    config = LayerConfig(32, 8, 24, num_reg_tokens=2)
    normal, sincos = build_layer(config, 5), build_layer(config, 5, "sincos")
    torch.testing.assert_close(normal.patch_emb_layer.weight, sincos.patch_emb_layer.weight)
    torch.testing.assert_close(normal.cls_token, sincos.cls_token)
    assert (sincos.pos_emb[0, :3] == 0).all()  # class token and 2 registers
    np.testing.assert_array_equal(sincos.pos_emb[0].detach().numpy(), sincos_2d(24, (4, 4), num_prefix=3))
    torch.testing.assert_close(build_layer(config, 5, "normal").pos_emb, normal.pos_emb)
    no_prefix = build_layer(LayerConfig(32, 8, 24, num_reg_tokens=2, pos_embed_prefix=False), 0, "sincos")
    np.testing.assert_array_equal(no_prefix.pos_emb[0].detach().numpy(), sincos_2d(24, (4, 4)))
    with pytest.raises(ValueError, match="divisible by 4"):
        build_layer(LayerConfig(32, 8, 30), 0, "sincos")
    with pytest.raises(ValueError, match="unknown position init"):
        build_layer(config, 0, "zeros")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_init_pos_init_sincos_round_trips(suffix, tmp_path):
    path = tmp_path / f"layer{suffix}"
    result = CliRunner().invoke(app, ["init", "--preset", "vit-ti16", "--seed", "3", "--pos-init", "sincos", "-o", str(path)])
    assert result.exit_code == 0, result.output
    loaded = load_weights(path)
    pos = loaded.state_dict["pos_emb"][0].numpy()
    np.testing.assert_array_equal(pos, sincos_2d(192, (14, 14), num_prefix=1))
    reference = build_layer(PRESETS["vit-ti16"], 3, "sincos").state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded.state_dict[name], tensor, rtol=0, atol=0)
