"""Fixed 2-D sine-cosine position embeddings, as MAE builds them (numpy only, no torch).

MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") starts ViTs from a fixed
E_pos instead of a random one: `get_2d_sincos_pos_embed` in facebookresearch/mae `util/pos_embed.py`.
For a patch at grid row r, column c, with D = 4K channels and frequencies w_k = 10000^(-k / K),
k = 0 .. K-1, the row of E_pos is

    [sin(c w_0) .. sin(c w_{K-1}), cos(c w_0) .. cos(c w_{K-1}),     first half:  the column c
     sin(r w_0) .. sin(r w_{K-1}), cos(r w_0) .. cos(r w_{K-1})]     second half: the row r

MAE names the first half `emb_h`, but it is built from `np.meshgrid(grid_w, grid_h)[0]`, the
column index: the column comes first. The prefix rows (the class token's) are zero.
timm's `build_sincos2d_pos_embed` orders the channels differently ([sin r, sin c, cos r, cos c],
or [sin c, sin r, cos c, cos r] with `reverse_coord`): same values, other columns. Ours equal MAE's.
"""

from __future__ import annotations

import numpy as np

from ..choices import POS_INITS  # normal: the ViT book's E_pos ~ N(0, 1); sincos: MAE's fixed table
from ..errors import ConfigError

__all__ = ["POS_INITS", "sincos_1d", "sincos_2d"]



def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """The 1-D sine-cosine embedding of scalar positions (MAE's `get_1d_sincos_pos_embed_from_grid`).

    Args:
        dim: channels, even; half sines, half cosines.
        positions: any shape, M values in all.

    Returns:
        (M, dim) float64: [sin(p w_0) .. sin(p w_{dim/2-1}), cos(p w_0) ..], w_k = 10000^(-2k/dim).
    """
    if dim % 2:
        raise ConfigError(f"a sine-cosine embedding needs an even number of channels, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)  # (dim/2,)
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, dim/2) x 2 -> (M, dim)


def sincos_2d(emb_dim: int, grid: tuple[int, int], num_prefix: int = 0) -> np.ndarray:
    """MAE's fixed 2-D sine-cosine position embedding for a grid of patches.

    Computed in float64 and returned as float32 (MAE's current code computes in float32: the two
    differ by float32 rounding, about 1e-6).

    Args:
        emb_dim: D, a multiple of 4 (a quarter each for sin/cos of the column and of the row).
        grid: (rows, columns) of the patch grid; MAE's grids are square, any is allowed here.
        num_prefix: zero rows put first, for the class token (and any register tokens).

    Returns:
        (num_prefix + rows * columns, D) float32; patch rows in row-major order.

    Raises:
        ConfigError: D is not a multiple of 4.
    """
    if emb_dim % 4:
        lower = emb_dim - emb_dim % 4
        raise ConfigError(
            f"--pos-init sincos needs D divisible by 4, got D = {emb_dim}; pass --emb-dim {lower or 4} or {lower + 4}"
        )
    rows, cols = grid
    # MAE: grid = meshgrid(grid_w, grid_h): [0] holds the column of each patch, [1] its row.
    col, row = np.meshgrid(np.arange(cols), np.arange(rows))  # (rows, cols) each
    emb = np.concatenate(
        [sincos_1d(emb_dim // 2, col), sincos_1d(emb_dim // 2, row)], axis=1
    )  # (rows * cols, D/2) x 2 -> (rows * cols, D)
    prefix = np.zeros((num_prefix, emb_dim))
    return np.concatenate([prefix, emb], axis=0).astype(np.float32)  # (num_prefix + N, D)
