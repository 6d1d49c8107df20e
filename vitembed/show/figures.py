"""The numbers behind `vitembed show`'s pictures, as numpy arrays (no torch, no Pillow).

Each picture of `drawing.py` draws one of these; a reader can compute them without drawing:

    patch grid      `patch_rows`, `patch_boxes`: where each token's patch lies in the S x S image
    tokens          `grid_tokens` (z0 without its prefix rows, on the patch grid), `token_norms`,
                    `token_pca`: the L2 norm and the first principal components of each patch token
    filters         `filter_pca`: principal components of E's D filters (ViT paper, Figure 7 left)
    positions       `grid_positions`, `position_similarity`: cosine similarity of E_pos rows
                    between every pair of patches (ViT paper, Figure 7 centre); `SimilarityRows`:
                    the same, one row of tiles at a time (bounded memory, for drawing)

Grids are (rows, columns) throughout: today's layers are square, these functions need not be.
Principal components have no sign of their own; each is returned with its largest-magnitude
entry (of the component for filters, of the scores for tokens) positive, so pictures repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layer.config import LayerConfig
from ..errors import ConfigError

# The most patches a side `show positions` draws: a tile per patch, each a map of every patch, so
# the picture grows as the fourth power of the side (64: 4160 px square; 1024 would be 1M px).
MAX_POSITION_GRID = 64

__all__ = [
    "MAX_POSITION_GRID",
    "Pca",
    "SimilarityRows",
    "filter_pca",
    "grid_positions",
    "grid_tokens",
    "patch_boxes",
    "patch_rows",
    "position_similarity",
    "position_similarity_rows",
    "token_norms",
    "token_pca",
]


def patch_rows(config: LayerConfig) -> np.ndarray:
    """The row of z0 that holds each patch: the patch grid in token order.

    Args:
        config: the layer shape (prefix tokens come first in z0).

    Returns:
        (gh, gw) int array: entry (r, c) is 1 + r gw + c in the ViT book's layout (row 0 the class token).
    """
    gh, gw = config.grid
    return config.num_prefix_tokens + np.arange(gh * gw).reshape(gh, gw)  # (N,) -> (gh, gw)


def patch_boxes(config: LayerConfig) -> np.ndarray:
    """Where each patch lies in the H x W image the layer sees, in token order.

    Args:
        config: the layer shape.

    Returns:
        (N, 4) int array of (left, top, right, bottom) pixels, right and bottom exclusive;
        row i is the patch of token `config.num_prefix_tokens + i`.
    """
    (gh, gw), p = config.grid, config.patch_size
    r, c = np.divmod(np.arange(gh * gw), gw)  # (N,) grid row and column of each patch, row-major
    return np.stack([c * p, r * p, (c + 1) * p, (r + 1) * p], axis=1)  # 4 x (N,) -> (N, 4)


def grid_tokens(tokens: np.ndarray, config: LayerConfig) -> np.ndarray:
    """The patch tokens of z0 on the patch grid, prefix tokens (class, registers) left out.

    Args:
        tokens: z0, (N + prefix, D), as `vitembed encode` writes it.
        config: the layer that made it.

    Returns:
        (gh, gw, D) float64.

    Raises:
        ConfigError: the shape is not the layer's token shape.
    """
    tokens = np.asarray(tokens)
    if tokens.shape != config.token_shape:
        raise ConfigError(
            f"tokens have shape {tokens.shape}; the layer gives {config.token_shape} "
            "(pass the layer options the tokens were made with)"
        )
    patches = tokens[config.num_prefix_tokens:].astype(np.float64)  # (N + prefix, D) -> (N, D)
    return patches.reshape(*config.grid, config.emb_dim)  # (N, D) -> (gh, gw, D)


def grid_positions(pos_emb: np.ndarray, config: LayerConfig) -> np.ndarray:
    """The patch rows of E_pos on the patch grid; rows of prefix tokens (class token) dropped.

    Args:
        pos_emb: E_pos, (rows, D) or (1, rows, D).
        config: the layer it belongs to (`pos_embed_prefix` says whether it has prefix rows).

    Returns:
        (gh, gw, D) float64.
    """
    pos = np.asarray(pos_emb, dtype=np.float64).reshape(-1, config.emb_dim)  # (1, rows, D) -> (rows, D)
    if pos.shape[0] != config.num_pos_rows:
        raise ConfigError(f"E_pos has {pos.shape[0]} rows; the layer has {config.num_pos_rows}")
    return pos[config.num_pos_prefix:].reshape(*config.grid, config.emb_dim)  # (N, D) -> (gh, gw, D)


def token_norms(patches: np.ndarray) -> np.ndarray:
    """The L2 norm of each patch token.

    Args:
        patches: (gh, gw, D), from `grid_tokens`.

    Returns:
        (gh, gw) float64.
    """
    return np.linalg.norm(np.asarray(patches, dtype=np.float64), axis=-1)


@dataclass(frozen=True)
class Pca:
    """What `token_pca` and `filter_pca` return.

    Attributes:
        values: the token maps (gh, gw, k) or the filter components (k, P, P, C).
        explained: (k,), each component's share of the total variance.
    """

    values: np.ndarray
    explained: np.ndarray


def _pca(samples: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred PCA by SVD: (components (k, d), scores (n, k), share of variance (k,))."""
    x = samples - samples.mean(axis=0)  # (n, d), centred over the samples
    _, s, vt = np.linalg.svd(x, full_matrices=False)  # vt: (min(n, d), d)
    var = s**2
    total = var.sum()
    share = var[:k] / total if total > 0 else np.zeros(min(k, var.size))
    return vt[:k], x @ vt[:k].T, share  # (k, d), (n, d) @ (d, k) -> (n, k), (k,)


def _flip(signed: np.ndarray, *others: np.ndarray) -> None:
    """Make each column of `signed` have its largest-magnitude entry positive (and the same
    columns of `others`), in place."""
    rows = np.abs(signed).argmax(axis=0)  # (k,)
    signs = np.sign(signed[rows, np.arange(signed.shape[1])])  # (k,)
    signs[signs == 0] = 1
    for a in (signed, *others):
        a *= signs


def token_pca(patches: np.ndarray, k: int = 3) -> Pca:
    """The first principal components of the patch tokens, as maps on the patch grid.

    The N patch tokens are the samples (centred over the patches), D the features.

    Args:
        patches: (gh, gw, D), from `grid_tokens`.
        k: components wanted (fewer come back if N or D is smaller).

    Returns:
        `Pca(scores, explained)`: scores (gh, gw, k), each patch's coordinate on component j;
        explained (k,), each component's share of the patch tokens' variance.
    """
    gh, gw, d = patches.shape
    x = np.asarray(patches, dtype=np.float64).reshape(gh * gw, d)  # (gh, gw, D) -> (N, D)
    _, scores, share = _pca(x, k)
    _flip(scores)
    return Pca(scores.reshape(gh, gw, -1), share)  # (N, k) -> (gh, gw, k)


def filter_pca(weight: np.ndarray, k: int = 28) -> Pca:
    """Principal components of the patch embedding's filters (ViT paper, Figure 7 left).

    Each of E's D columns, seen as a P x P x C picture (the convolution's weight row), is a
    sample; the components are pictures of the same shape, centred over the D filters.

    Args:
        weight: the convolution's weight, (D, C, P, P) (E^T, reshaped).
        k: components wanted (at most min(D, P^2 C) come back).

    Returns:
        `Pca(components, explained)`: components (k, P, P, C), unit norm each; explained (k,),
        each one's share of the filters' variance.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ConfigError(f"filters must be (D, C, P, P), got shape {w.shape}")
    d, c, p, q = w.shape
    x = w.transpose(0, 2, 3, 1).reshape(d, p * q * c)  # (D, C, P, P) -> (D, P, P, C) -> (D, P^2 C)
    components, scores, share = _pca(x, k)
    comps = components.T.copy()  # (k, P^2 C) -> (P^2 C, k)
    _flip(comps, scores)
    return Pca(comps.T.reshape(-1, p, q, c), share)  # (P^2 C, k) -> (k, P, P, C)


def position_similarity(positions: np.ndarray) -> np.ndarray:
    """Cosine similarity between the position embeddings of every pair of patches.

    Args:
        positions: (gh, gw, D), E_pos's patch rows on the grid (`grid_positions`).

    Returns:
        (gh, gw, gh, gw) float64: entry (i, j, r, c) is cos(E_pos[i, j], E_pos[r, c]), in [-1, 1];
        (i, j, i, j) is 1 unless that row is all zero (then its similarities are 0).
    """
    gh, gw, d = positions.shape
    x = np.asarray(positions, dtype=np.float64).reshape(gh * gw, d)  # (gh, gw, D) -> (N, D)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    unit = x / np.where(norms > 0, norms, 1.0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)  # (N, D) @ (D, N) -> (N, N)
    return sim.reshape(gh, gw, gh, gw)  # (N, N) -> (gh, gw, gh, gw)


def _unit_rows(positions: np.ndarray) -> np.ndarray:
    """(gh, gw, D) -> (N, D) float32 rows of unit norm (an all-zero row stays zero)."""
    gh, gw, d = positions.shape
    x = np.asarray(positions, dtype=np.float32).reshape(gh * gw, d)  # (gh, gw, D) -> (N, D)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.where(norms > 0, norms, 1.0)


class SimilarityRows:
    """`position_similarity` computed one row of tiles at a time, in float32, for drawing: row i
    costs gw x N values, where the whole array costs N^2 float64.

    Attributes:
        shape: (gh, gw, gh, gw), as the whole array's.
    """

    def __init__(self, positions: np.ndarray) -> None:
        gh, gw, _ = positions.shape
        self.shape = (gh, gw, gh, gw)
        self._unit = _unit_rows(positions)  # (N, D)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile row i: (gw, gh, gw) float32, entry (j, r, c) = cos(E_pos[i, j], E_pos[r, c])."""
        gh, gw = self.shape[:2]
        if not 0 <= i < gh:
            raise IndexError(i)
        rows = self._unit[i * gw:(i + 1) * gw]  # (gw, D): the patches of grid row i
        sim = np.clip(rows @ self._unit.T, -1.0, 1.0)  # (gw, D) @ (D, N) -> (gw, N)
        return sim.reshape(gw, gh, gw)  # (gw, N) -> (gw, gh, gw)


def position_similarity_rows(positions: np.ndarray) -> SimilarityRows:
    """`position_similarity` of a grid `show positions` can draw, one tile row at a time.

    Raises:
        ConfigError: a grid side over `MAX_POSITION_GRID` patches (its picture cannot be read).
    """
    check_position_grid(positions.shape[:2])
    return SimilarityRows(positions)


def check_position_grid(grid: tuple[int, int]) -> None:
    """Refuse a patch grid too large for `show positions` to draw (a tile per patch, each a map
    of every patch), with the limit in the message."""
    gh, gw = grid
    if max(gh, gw) > MAX_POSITION_GRID:
        raise ConfigError(f"show positions draws a tile per patch, each a map of all patches: a grid of {gh} x {gw} "
                          f"patches is too large to draw (at most {MAX_POSITION_GRID} patches a side); give a "
                          "smaller --image-size or a larger --patch-size")
