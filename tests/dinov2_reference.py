"""The official DINOv2 and DINOv3 repositories' input layers, for tests: their parameters under their
own names and their own token-making code, written after facebookresearch/dinov2's
`dinov2/models/vision_transformer.py` (`prepare_tokens_with_masks`, `interpolate_pos_encoding`) and
facebookresearch/dinov3's (`prepare_tokens_with_masks`; positions are RoPE, inside attention).

Only what the input layer needs is computed; the rest of a one-block model's tensors are there
under the repositories' names so that a state dict has the real layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()


class _Block(nn.Module):
    """A block's parameters under the repositories' names (never run here)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))


class Dinov2Reference(nn.Module):
    """DinoVisionTransformer's input layer (interpolate_offset 0.1, interpolate_antialias False, its
    defaults); `forward` is its `prepare_tokens_with_masks` without masks."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, num_register_tokens: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.interpolate_offset, self.interpolate_antialias = 0.1, False
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList([_Block(embed_dim)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def interpolate_pos_encoding(self, x, w, h):
        # the repository's naming: w is the image's height (dim 2), h its width (dim 3)
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        m = int(math.sqrt(n))
        assert n == m * m
        sx = float(w0 + self.interpolate_offset) / m
        sy = float(h0 + self.interpolate_offset) / m
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),  # (1, M M, D) -> (1, D, M, M)
            mode="bicubic", antialias=self.interpolate_antialias, scale_factor=(sx, sy))
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)  # -> (1, w0 h0, D)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, nc, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x


class Dinov3Reference(nn.Module):
    """DINOv3's DinoVisionTransformer input layer: [cls; storage tokens; patches], no position table
    (RoPE inside attention, `rope_embed.periods` a buffer of the state dict); `forward` is its
    `prepare_tokens_with_masks` without masks (`cls_token + 0 * mask_token`)."""

    def __init__(self, patch_size: int, embed_dim: int, n_storage_tokens: int = 0, num_heads: int = 2):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.n_storage_tokens = n_storage_tokens
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.rope_embed = nn.Module()
        self.rope_embed.register_buffer("periods", torch.arange(1, embed_dim // num_heads // 4 + 1, dtype=torch.float32))
        self.blocks = nn.ModuleList([_Block(embed_dim)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, D, H, W) -> (B, H, W, D), the repo's NHWC
        b = x.shape[0]
        x = x.flatten(1, 2)
        cls_token = self.cls_token + 0 * self.mask_token
        storage = self.storage_tokens if self.n_storage_tokens else x.new_empty(1, 0, x.shape[-1])
        return torch.cat([cls_token.expand(b, -1, -1), storage.expand(b, -1, -1), x], dim=1)
