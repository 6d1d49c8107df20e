"""Layer shapes and random layers shared by the layer and engine tests."""

from __future__ import annotations

import torch

from vitembed.layer.reference import LayerConfig, build_layer

# Small shapes covering the prefix variants: class token, register tokens (with and without
# position embeddings of their own), no class token, a grey input, and rectangular inputs (H x W).
SMALL_CONFIGS = [
    LayerConfig(32, 8, 24),
    LayerConfig(32, 8, 24, num_reg_tokens=2),
    LayerConfig(32, 8, 24, num_reg_tokens=4, pos_embed_prefix=False),
    LayerConfig(32, 8, 24, class_token=False),
    LayerConfig(28, 7, 16, in_channels=1),
    LayerConfig(32, 8, 24, image_width=48),
    LayerConfig(40, 8, 24, num_reg_tokens=2, pos_embed_prefix=False, image_width=16),
]


def random_layer(config: LayerConfig, bias: bool = True):
    """A layer whose every parameter is random (E_pos and register tokens start at zero otherwise)."""
    layer = build_layer(config, seed=2)
    with torch.no_grad():
        torch.nn.init.normal_(layer.pos_emb)
        if layer.reg_token is not None:
            torch.nn.init.normal_(layer.reg_token)
    if not bias:
        layer.patch_emb_layer.bias = None
    return layer
