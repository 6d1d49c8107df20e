"""Resolution: where an image's pixels go on the patch grid, and a layer's tables for another grid
or patch size. numpy only (no torch, no Pillow), so that the decoder processes can use it.

- `resize_plan`: the geometry of `--resize` for one image: squash, crop (as torchvision and timm),
  pad, or native (the image's own aspect ratio, `native_grid`).
- `native_grid`: the patch grid that fits an image within a number of patches, as Pix2Struct
  picks it (the patches of a NaViT / Pix2Struct batch).
- `resample_grid` / `resample_pos`: a position table on one grid resampled to another, as timm's
  `resample_abs_pos_embed` does ("timm": bicubic, antialiased) or transformers'
  `ViTEmbeddings.interpolate_pos_encoding` ("hf": bicubic, not antialiased).
- `resample_patch_embed`: E for another patch size, FlexiViT's pseudo-inverse resize, as timm's
  `resample_patch_embed` does.

Each resampling is separable: one (new, old) matrix per axis (`resize_matrix`), the weights of
torch's `F.interpolate(mode="bicubic", align_corners=False)` (with `antialias=True` for timm),
computed in float64 and applied as matrix products. Results are float32 and equal torch's within
float32 rounding (tests: 1e-6 absolute for values about 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..choices import POS_RESAMPLES, unknown
from .config import LIMITS
from ..errors import ConfigError

__all__ = [
    "POS_RESAMPLES",
    "ResizePlan",
    "native_grid",
    "resample_grid",
    "resample_patch_embed",
    "resample_pos",
    "resize_matrix",
    "resize_plan",
    "resize_strain",
]


# --------------------------------------------------------------------------- image geometry


@dataclass(frozen=True)
class ResizePlan:
    """The geometry of `--resize` for one image, all sizes (width, height): resize the image to
    `size`, then take the `target` window at `crop` (left, top), or paste it onto a `target`
    canvas of the background colour at `paste` (left, top), or neither (`size` is the target)."""

    size: tuple[int, int]
    target: tuple[int, int]
    crop: tuple[int, int] | None = None
    paste: tuple[int, int] | None = None


def resize_plan(width: int, height: int, prep) -> ResizePlan:
    """Where an image of `width` x `height` pixels goes, for `decode.Preprocess` `prep`.

    - squash: straight to the layer's W x H.
    - crop: a square layer as torchvision's Resize(int(S / crop_pct)) + CenterCrop(S) (the shorter
      side to S / crop_pct); a rectangular one as timm's eval transform for img_size (H, W):
      ResizeKeepRatio((floor(H / crop_pct), floor(W / crop_pct))), the aspect ratio kept and the
      image just covering that size, then CenterCrop((H, W)).
    - pad: the aspect ratio kept, the image just fitting inside W x H, centred on the background.
    - native: the image's own grid (`native_grid`), squashed to (gw P, gh P).
    - squash-crop: squashed to (floor(H / crop_pct), floor(W / crop_pct)), then the centre H x W,
      its offset rounded down as transformers' center_crop does (DeiT's and BEiT's processors:
      256 x 256, then 224 x 224).
    """
    h, w = prep.size
    if prep.resize == "squash":
        return ResizePlan((w, h), (w, h))
    if prep.resize == "native":
        gh, gw = native_grid(width, height, prep.max_patches, prep.patch_size)
        return ResizePlan((gw * prep.patch_size, gh * prep.patch_size), (gw * prep.patch_size, gh * prep.patch_size))
    if prep.resize == "squash-crop":
        size = (max(int(w / prep.crop_pct), w), max(int(h / prep.crop_pct), h))
        return ResizePlan(size, (w, h), crop=((size[0] - w) // 2, (size[1] - h) // 2))
    if prep.resize == "crop":
        size = _crop_size(width, height, h, w, prep.crop_pct)
        size = (max(size[0], w), max(size[1], h))
        return ResizePlan(size, (w, h), crop=(int(round((size[0] - w) / 2.0)), int(round((size[1] - h) / 2.0))))
    scale = min(w / width, h / height)  # pad: for a square, S / the longer side
    size = (min(w, max(1, round(width * scale))), min(h, max(1, round(height * scale))))
    return ResizePlan(size, (w, h), paste=((w - size[0]) // 2, (h - size[1]) // 2))


UPSCALE_NOTED = 4.0  # an image enlarged more than this many times is noted (an 8 x 8 icon at 224 px)
SQUASH_NOTED = 2.0  # an image whose aspect ratio the resize changes more than this is noted


def resize_strain(width: int, height: int, prep) -> str | None:
    """"upscaled" if the resize enlarges a `width` x `height` image more than `UPSCALE_NOTED`
    times, "squashed" if it changes its aspect ratio more than `SQUASH_NOTED` to 1, else None."""
    if width < 1 or height < 1:
        return None
    size = resize_plan(width, height, prep).size
    sx, sy = size[0] / width, size[1] / height
    if max(sx, sy) / min(sx, sy) > SQUASH_NOTED:
        return "squashed"
    return "upscaled" if min(sx, sy) > UPSCALE_NOTED else None


def _crop_size(width: int, height: int, h: int, w: int, crop_pct: float) -> tuple[int, int]:
    """The size before the centre crop (width, height)."""
    if h == w:  # torchvision: Resize(int(S / crop_pct)) on the shorter side, the longer truncated
        short = int(h / crop_pct)
        return (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    # timm's ResizeKeepRatio(longest=0): the side that needs the least scaling fits, rounded
    cover_h, cover_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    ratio = min(height / cover_h, width / cover_w)
    return round(width / ratio), round(height / ratio)


def native_grid(width: int, height: int, max_patches: int, patch_size: int) -> tuple[int, int]:
    """The patch grid (rows gh, columns gw) for an image of its own aspect ratio, gh gw <= max_patches.

    Pix2Struct's rule (transformers' `Pix2StructImageProcessor.extract_flattened_patches`): the
    scale s that would give exactly `max_patches` patches, then each side's whole number of
    patches, gh = floor(s H / P), gw = floor(s W / P), at least 1. With s^2 H W / P^2 =
    max_patches, gh = floor(sqrt(max_patches H / W)), computed here in integers (Pix2Struct's
    floats lose a row to rounding at some exact fits). Each side stays within one patch of the
    aspect-true size; a side is at most 8192 pixels (the layer's size limit), and a very thin
    image gets one row (or column).
    """
    most = max(1, LIMITS["image_size"] // patch_size)
    rows = math.isqrt(max_patches * height // width)
    cols = math.isqrt(max_patches * width // height)
    return min(max(rows, 1), max_patches, most), min(max(cols, 1), max_patches, most)


# --------------------------------------------------------------------------- resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75; its antialiased resize and Pillow: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(old: int, new: int, method: str = "timm") -> np.ndarray:
    """The (new, old) float64 matrix of a 1-D bicubic resize, as torch's F.interpolate computes it:
    antialiased ("timm", torch's `_upsample_bicubic2d_aa`: a = -0.5, the support widened by
    old / new when shrinking, weights normalised), or not (torch's `upsample_bicubic2d`: a = -0.75,
    indices clamped to the border) with align_corners=False ("hf"), align_corners=True
    ("torchvision") or DINOv2's scale factor (new + 0.1) / old ("dinov2")."""
    if method not in POS_RESAMPLES:
        raise ConfigError(unknown("position resampling", method, POS_RESAMPLES))
    scale = old / new
    m = np.zeros((new, old))
    if method == "timm":
        support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
        for i in range(new):
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), old)
            weights = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
            total = weights.sum()
            m[i, lo:hi] = weights / total if total != 0 else weights
        return m
    for i in range(new):
        if method == "torchvision":  # align_corners=True: the corner pixels' centres line up
            real = i * (old - 1) / (new - 1) if new > 1 else 0.0
        else:
            step = old / (new + 0.1) if method == "dinov2" else scale  # torch maps with 1 / scale_factor
            real = step * (i + 0.5) - 0.5
        base = min(math.floor(real), old - 1)
        t = min(max(real - base, 0.0), 1.0)
        for k, weight in enumerate(_cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
            m[i, min(max(base - 1 + k, 0), old - 1)] += weight
    return m


def resample_grid(table: np.ndarray, new: tuple[int, int], method: str = "timm") -> np.ndarray:
    """A table on a (gh, gw) grid resampled to the grid `new` (rows, columns).

    Args:
        table: (gh, gw, D).

    Returns:
        (new rows, new columns, D) float32.
    """
    (gh, gw, d), (nh, nw) = table.shape, new
    if (gh, gw) == (nh, nw):
        return np.asarray(table, np.float32)
    rows, cols = resize_matrix(gh, nh, method), resize_matrix(gw, nw, method)
    x = rows @ np.asarray(table, np.float64).reshape(gh, gw * d)  # (nh, gh) @ (gh, gw D) -> (nh, gw D)
    x = x.reshape(nh, gw, d).transpose(1, 0, 2).reshape(gw, nh * d)  # -> (nh, gw, D) -> (gw, nh, D) -> (gw, nh D)
    x = (cols @ x).reshape(nw, nh, d)  # (nw, gw) @ (gw, nh D) -> (nw, nh D) -> (nw, nh, D)
    return np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float32)  # (nw, nh, D) -> (nh, nw, D)


def resample_pos(pos: np.ndarray, old: tuple[int, int], new: tuple[int, int], num_prefix: int,
                 method: str = "timm") -> np.ndarray:
    """A position table (prefix rows, then the patches of the `old` grid row-major) for the `new`
    grid; the first `num_prefix` rows (class, register tokens) kept as they are.

    Args:
        pos: (num_prefix + gh gw, D).

    Returns:
        (num_prefix + new rows x new columns, D) float32.
    """
    d = pos.shape[-1]
    patches = pos[num_prefix:].reshape(*old, d)  # (N, D) -> (gh, gw, D)
    grid = resample_grid(patches, new, method).reshape(-1, d)  # (nh, nw, D) -> (N', D)
    return np.concatenate([np.asarray(pos[:num_prefix], np.float32), grid])  # (num_prefix + N', D)


def resample_patch_embed(weight: np.ndarray, new: int) -> np.ndarray:
    """E for patches of `new` x `new` pixels: FlexiViT's pseudo-inverse resize (Beyer et al. 2023), as
    timm's `resample_patch_embed` computes it.

    With B the (P'^2, P^2) matrix of the antialiased bicubic resize of a P x P patch to P' x P',
    the new filters are w' = w pinv(B), so that <x, w> = <B x, w'> for resized patches B x (exactly
    when P' >= P). Computed in float64.

    Args:
        weight: the convolution's weight, (D, C, P, P).

    Returns:
        (D, C, P', P') float32.
    """
    d, c, p, _ = weight.shape
    one_d = resize_matrix(p, new, "timm")  # (P', P)
    resize = np.kron(one_d, one_d)  # (P'^2, P^2): row-major pixels of the new patch x of the old one
    pinv = np.linalg.pinv(resize)  # (P^2, P'^2)
    flat = np.asarray(weight, np.float64).reshape(d, c, p * p)  # (D, C, P, P) -> (D, C, P^2)
    return (flat @ pinv).reshape(d, c, new, new).astype(np.float32)  # -> (D, C, P'^2) -> (D, C, P', P')
