"""The Vision Transformer input layer: image -> tokens z0, after the ViT book (ghmagazine/vit_book).

The ViT book's five steps (Dosovitskiy et al., "An Image is Worth 16x16 Words", eq. 1):

    (1) split     x in R^{H x W x C}  ->  N_p patches of P x P x C pixels, N_p = HW / P^2
    (2) flatten   each patch         ->  x_p^i in R^{P^2 C}
    (3) embed     [x_p^1 E; ...; x_p^{N_p} E] in R^{N_p x D},  E in R^{(P^2 C) x D}
    (4) class     prepend x_class in R^D                 ->  (N_p + 1) x D
    (5) position  z0 = [x_class; x_p^1 E; ...] + E_pos,  E_pos in R^{(N_p + 1) x D}

Steps (1)-(3) run at once as a convolution whose kernel and stride are both P: each output
pixel of the convolution is exactly one patch, flattened, times E (plus a bias).
`patchify` spells out steps (1)-(2) for readers and tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DEFAULT_PRESET, PRESETS, LayerConfig, nearest_valid_sizes, resolve_config
from ..errors import ConfigError

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "LayerConfig",
    "VitInputLayer",
    "build_layer",
    "nearest_valid_sizes",
    "patchify",
    "resolve_config",
]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Steps (1)-(2): cut images into P x P patches and flatten each one.

    The values of a patch are ordered (C, P, P), the layout of the convolution's weight, so that
    `patchify(x, P) @ E` with `E = conv.weight.reshape(D, -1).T` is step (3).

    Args:
        x: images, (B, C, H, W), with H and W multiples of `patch_size`.

    Returns:
        (B, N_p, P^2 C) patches in row-major order over the patch grid.
    """
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, H, W) -> (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # -> (B, h, w, C, P, P)
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # -> (B, N_p, P^2 C)


class VitInputLayer(nn.Module):
    """The ViT input layer of the ViT book: (B, C, S, S) images -> (B, N_p + 1, D) tokens z0;
    (B, C, H, W) images for a rectangular `config` (N_p = HW / P^2, patches row-major).

    The signature, defaults and parameter names (`patch_emb_layer`, `cls_token`, `pos_emb`) are
    the ViT book's, so a state dict of the book's class loads unchanged. `patch_size` may be given
    instead of `num_patch_row`. Construction draws from torch's global generator in the ViT book's
    order (conv, class token, position embedding); `build_layer` does it from a fixed seed.
    """

    def __init__(
        self,
        in_channels: int = 3,
        emb_dim: int = 384,
        num_patch_row: int | None = 2,
        image_size: int = 32,
        patch_size: int | None = None,
        *,
        config: LayerConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            if patch_size is None:
                if num_patch_row is None or num_patch_row < 1 or image_size % num_patch_row:
                    raise ConfigError(
                        f"image size ({image_size}) is not divisible by num_patch_row ({num_patch_row})"
                    )
                patch_size = image_size // num_patch_row
            config = LayerConfig(image_size, patch_size, emb_dim, in_channels)
        self.config = config
        self.in_channels = config.in_channels
        self.emb_dim = config.emb_dim
        self.image_size = config.image_size
        self.image_height, self.image_width = config.size
        self.patch_size = config.patch_size
        self.num_patch_row = config.num_patch_row
        self.num_patch = config.num_patches
        d = config.emb_dim

        # (1)-(3): one convolution with kernel = stride = P is "split, flatten, times E".
        # Its weight (D, C, P, P) reshaped to (D, P^2 C) is E^T.
        self.patch_emb_layer = nn.Conv2d(config.in_channels, d, config.patch_size, config.patch_size,
                                         bias=config.conv_bias)
        # (4): x_class ~ N(0, 1), (1, 1, D).
        self.cls_token = nn.Parameter(torch.randn(1, 1, d)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if config.dist_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, config.num_reg_tokens, d)) if config.num_reg_tokens else None
        )
        # (5): E_pos ~ N(0, 1), (1, N_p + 1, D): one row per patch plus one for the class token.
        # None where positions are applied inside attention (rotary, relative).
        self.pos_emb = nn.Parameter(torch.randn(1, config.num_pos_rows, d)) if config.pos_table else None
        # After (5), where the model has one (CLIP's ln_pre, timm's norm_pre): a LayerNorm per token.
        self.norm_pre = nn.LayerNorm(d, eps=config.pre_norm_eps) if config.pre_norm_eps is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x, images (B, C, H, W) (H = W = S for a square layer). Returns: z0, (B, N_p + 1, D)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, *cfg.size):
            raise ValueError(
                f"expected images of shape (B, {cfg.in_channels}, {cfg.size[0]}, {cfg.size[1]}), "
                f"got {tuple(x.shape)}"
            )
        b = x.shape[0]
        # (1)-(3) eq. (3): [x_p^1 E; ...; x_p^{N_p} E]
        z = self.patch_emb_layer(x)  # (B, C, H, W) -> (B, D, H/P, W/P)
        z = z.flatten(2)  # (B, D, H/P, W/P) -> (B, D, N_p), row-major over the grid
        z = z.transpose(1, 2)  # (B, D, N_p) -> (B, N_p, D)

        # (B, 1, D) class, (B, 1, D) distillation, (B, R, D) register tokens, those the layer has
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.pos_emb is None:  # positions come later, inside attention
            z = torch.cat([*prefix, z], dim=1)
        elif cfg.pos_embed_prefix:
            # (4) eq. (4): [x_class; x_p^1 E; ...], (B, N_p, D) -> (B, N_p + 1, D)
            z = torch.cat([*prefix, z], dim=1)
            # (5) eq. (5): z0 = ... + E_pos; E_pos has N_p + 1 rows, the first for x_class.
            z = z + self.pos_emb
        else:
            # timm's no_embed_class: E_pos covers the N_p patches only, prefix tokens are added bare.
            z = torch.cat([*prefix, z + self.pos_emb], dim=1)  # (B, N_p, D) -> (B, prefix + N_p, D)
        return z if self.norm_pre is None else self.norm_pre(z)


def build_layer(config: LayerConfig, seed: int = 0, pos_init: str = "normal") -> VitInputLayer:
    """A layer with the ViT book's initialisation drawn from `seed`, on the CPU.

    The numbers come from a CPU generator whatever the device the layer later moves to, and
    match the ViT book's class built after `torch.manual_seed(seed)`. torch's global RNG state is
    left as it was.

    Args:
        config: the layer shape.
        seed: seed of torch's generator for E, the bias, x_class and (with "normal") E_pos.
        pos_init: "normal", the ViT book's E_pos ~ N(0, 1); or "sincos", MAE's fixed 2-D sine-cosine
            table (`posembed.sincos_2d`, prefix rows zero), which replaces the drawn E_pos, so
            that E and x_class stay those of "normal" for the same seed.
    """
    from ..choices import unknown
    from .posembed import POS_INITS, sincos_2d

    if pos_init not in POS_INITS:
        raise ConfigError(unknown("position init", pos_init, POS_INITS, " or "))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = VitInputLayer(config=config)
    if pos_init == "sincos" and config.pos_table:
        prefix = config.num_prefix_tokens if config.pos_embed_prefix else 0
        table = sincos_2d(config.emb_dim, config.grid, num_prefix=prefix)  # (num_pos_rows, D)
        with torch.no_grad():
            layer.pos_emb.copy_(torch.from_numpy(table)[None])  # (rows, D) -> (1, rows, D)
    return layer.eval()
