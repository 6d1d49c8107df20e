"""The input layer for uint8 pixels: its parameters, folded once, applied without torch.

A layer's parameters (`LayerParams`, numpy float32 under the ViT book's names) and one preprocessing
(mean and std of pixels / 255) fold into a single affine map of the raw patches (`fold`):

    patches = pixels cut into P x P x C blocks, flattened      (steps 1-2, HWC order)
    z0[k:]  = patches @ W + T[k:]                              (step 3, and E_pos of the patches)
    z0[:k]  = T[:k]                                            (steps 4-5 for the k prefix tokens)

W is E with (x / 255 - mean) / std folded in: (x a + b) E = x (a E) + b E, a = 1 / (255 std),
b = -mean / std. T holds the class (and register) tokens plus their E_pos rows, then the bias,
b E and the E_pos row of each patch. `Kernel` applies it with numpy, one BLAS call per image; the
torch engine (`encoder.TorchEngine`) applies the same W and T on its device. Both equal the
reference layer (`reference.VitInputLayer.forward`) up to float32 rounding.

A model with a pre-norm (CLIP's `ln_pre`, timm's `norm_pre`) normalises each token of z0 after
step 5 (`LayerNorm`): the prefix rows once, in T; the patch rows per image, after the product.

Which tokens (`TOKENS`) is decided here too, in T, so that both engines give the same: `z0`
(all of the above: what the first transformer block receives); `z0-before-norm` (z0 without the
pre-norm; z0 itself for a layer without one); `patches` (x_p E + bias: steps 1-3, no prefix rows,
no E_pos); `patches+pos` (x_p E + bias + E_pos's patch rows, no prefix rows: what MAE-style code
masks).

With `--resize native` each image has a grid of its own: `GridTables` makes T for any grid, the
layer's E_pos resampled to it (`resolution.resample_grid`) and folded the same way, and keeps the
last few.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .blas import single_blas_thread
from ..choices import TOKENS
from .config import LayerConfig
from ..errors import ConfigError
from .resolution import resample_grid

__all__ = ["TOKENS", "GridTables", "Kernel", "LayerParams", "fingerprint"]

WEIGHT, BIAS, CLS, DIST, REG, POS = ("patch_emb_layer.weight", "patch_emb_layer.bias", "cls_token", "dist_token",
                                     "reg_token", "pos_emb")
NORM_WEIGHT, NORM_BIAS = "norm_pre.weight", "norm_pre.bias"


def fingerprint(state_dict) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the tensors, in name order.

    Takes torch tensors or numpy arrays; both give the same digest for the same numbers, so a
    folder made by one engine can be resumed by the other.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if isinstance(t, np.ndarray):
            array, dtype = np.ascontiguousarray(t), f"torch.{t.dtype.name}"
        else:  # a torch tensor
            t = t.detach().cpu().contiguous()
            dtype = str(t.dtype)
            import torch

            array = t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        h.update(f"{name}:{tuple(t.shape)}:{dtype};".encode())
        h.update(array.tobytes() if array.size else b"")
    return h.hexdigest()


@dataclass
class LayerParams:
    """A layer's parameters as float32 numpy arrays, under the ViT book's names (see `VitInputLayer`)."""

    config: LayerConfig
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_module(cls, layer) -> LayerParams:
        """From a `VitInputLayer` (any device)."""
        return cls.from_state_dict(layer.config, layer.state_dict())

    @classmethod
    def from_state_dict(cls, config: LayerConfig, state) -> LayerParams:
        """From torch tensors (or arrays) under the ViT book's names, as float32 numpy arrays."""
        return cls(config, {k: _float32(v) for k, v in state.items()})

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.tensors

    def __post_init__(self) -> None:
        cfg = self.config
        d = cfg.emb_dim
        expected = {WEIGHT: (d, cfg.in_channels, cfg.patch_size, cfg.patch_size)}
        for name, shape, present in ((POS, (1, cfg.num_pos_rows, d), cfg.pos_table), (CLS, (1, 1, d), cfg.class_token),
                                     (DIST, (1, 1, d), cfg.dist_token), (REG, (1, cfg.num_reg_tokens, d), cfg.num_reg_tokens),
                                     (BIAS, (d,), BIAS in self.tensors),
                                     (NORM_WEIGHT, (d,), cfg.pre_norm_eps is not None),
                                     (NORM_BIAS, (d,), cfg.pre_norm_eps is not None)):
            if present:
                expected[name] = shape
        shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        if shapes != expected:
            raise ValueError(f"layer parameters {shapes} do not fit the layer {expected}")
        if any(t.dtype != np.float32 for t in self.tensors.values()):
            raise ValueError("layer parameters must be float32")

    def fold(self, mean, std, tokens: str = "z0", resample: str | None = None) -> Kernel:
        """The layer for uint8 pixels normalised with `mean` and `std` (per channel, of pixels / 255).

        Args:
            tokens: z0, z0-before-norm, patches or patches+pos (see the module docstring).
            resample: None, the layer's own grid only; a `--pos-resample` method, any grid too
                (`--resize native`), E_pos resampled as `resolution.resample_grid` does.

        Raises:
            ConfigError: tokens that need E_pos from a layer without one.
        """
        cfg, t = self.config, self.tensors
        check_tokens(tokens, cfg)
        c, p, d = cfg.in_channels, cfg.patch_size, cfg.emb_dim
        weight = t[WEIGHT]  # (D, C, P, P)
        mean = np.asarray(mean, np.float32).reshape(1, c, 1, 1)
        std = np.asarray(std, np.float32).reshape(1, c, 1, 1)
        scaled = weight / (np.float32(255.0) * std)  # E with x / (255 std) folded in
        bias = (weight * (-mean / std)).sum(axis=(1, 2, 3), dtype=np.float32)  # (D,): the - mean / std part
        if BIAS in t:
            bias = bias + t[BIAS]
        w = np.ascontiguousarray(scaled.transpose(2, 3, 1, 0).reshape(p * p * c, d))  # (D, C, P, P) -> (P^2 C, D)

        n, k = cfg.num_patches, cfg.num_prefix_tokens
        pos = t[POS].reshape(-1, d) if cfg.pos_table else None  # (1, rows, D) -> (rows, D); rows = N + k, or N
        head = np.empty((k if tokens.startswith("z0") else 0, d), np.float32)  # the prefix rows of the output
        if len(head):
            head[:] = np.concatenate([t[name].reshape(-1, d) for name in (CLS, DIST, REG) if name in t])  # (k, D)
            if cfg.num_pos_prefix:
                head += pos[:k]
        norm = None
        if tokens == "z0" and cfg.pre_norm_eps is not None:
            norm = LayerNorm(t[NORM_WEIGHT], t[NORM_BIAS], float(cfg.pre_norm_eps))
            head = norm(head)  # the prefix rows are the same for every image: normalised once
        grid_pos = None if tokens == "patches" or pos is None else pos[-n:].reshape(*cfg.grid, d)  # (gh, gw, D)
        tables = GridTables(head, bias, grid_pos, resample or "timm")
        return Kernel(cfg, w, tables.table(cfg.grid, keep=False), len(head), tables if resample else None, norm)


def check_tokens(tokens: str, config: LayerConfig) -> None:
    """Refuse a `--tokens` choice that is unknown or needs E_pos from a layer without one."""
    if tokens not in TOKENS:
        raise ConfigError(f"unknown tokens {tokens!r}; choose {', '.join(TOKENS)}")
    if tokens == "patches+pos" and not config.pos_table:
        raise ConfigError("--tokens patches+pos needs a position table E_pos, and this layer has none (its "
                          "positions are applied inside attention); use --tokens patches or z0")


@dataclass(frozen=True)
class LayerNorm:
    """A LayerNorm over the last axis (torch.nn.LayerNorm's arithmetic, in float32): the pre-norm
    some models apply to z0 before their first block (CLIP's ln_pre, timm's norm_pre)."""

    weight: np.ndarray  # (D,)
    bias: np.ndarray  # (D,)
    eps: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(rows, D) -> a new (rows, D) float32 array."""
        return self.inplace(np.array(x, np.float32))

    def inplace(self, x: np.ndarray) -> np.ndarray:
        """Normalise the float32 rows of `x` in place (no temporary of x's size); returns `x`."""
        x -= x.mean(axis=-1, keepdims=True, dtype=np.float32)
        var = np.einsum("ij,ij->i", x, x) / np.float32(x.shape[-1])  # (rows,), one pass, no (rows, D) square
        x *= (1.0 / np.sqrt(var + np.float32(self.eps)))[:, None]
        x *= self.weight
        x += self.bias
        return x


def _float32(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    return value.detach().cpu().float().numpy()  # a torch tensor


@dataclass
class GridTables:
    """T for any patch grid: the output's prefix rows, then bias + E_pos's patch rows resampled
    from the layer's grid to that one (`resolution.resample_grid`, timm's or transformers' way).
    The tables last used are kept, up to `KEEP_BYTES` (a run sees a few dozen grids again and again:
    20 for photos of aspect ratios 1:2 to 2:1 at 196 patches; one vit-b16 table takes 1.5 ms to make).

    Attributes:
        head: (k, D), the prefix rows of the output (none for `patches` tokens).
        bias: (D,), the convolution's bias with the normalisation's share.
        pos: (gh, gw, D), E_pos's patch rows on the layer's grid; None: no E_pos (`patches`).
        method: "timm" or "hf".
    """

    KEEP_BYTES = 32 << 20  # 50 vit-b16 tables of 196 patches

    head: np.ndarray
    bias: np.ndarray
    pos: np.ndarray | None
    method: str = "timm"
    kept: dict = field(default_factory=dict, repr=False)

    def table(self, grid: tuple[int, int], keep: bool = True) -> np.ndarray:
        """(k + gh gw, D) float32: the head, then bias (+ E_pos for the grid) for each patch."""
        grid = (int(grid[0]), int(grid[1]))
        table = self.kept.pop(grid, None)
        if table is None:
            d = len(self.bias)
            table = np.empty((len(self.head) + grid[0] * grid[1], d), np.float32)
            table[:len(self.head)] = self.head
            patches = table[len(self.head):]  # (gh gw, D)
            patches[:] = self.bias
            if self.pos is not None:
                patches += resample_grid(self.pos, grid, self.method).reshape(-1, d)  # (gh, gw, D) -> (N, D)
        if keep:
            self.kept[grid] = table  # the newest last
            while sum(t.nbytes for t in self.kept.values()) > self.KEEP_BYTES and len(self.kept) > 1:
                del self.kept[next(iter(self.kept))]
        return table


@dataclass
class Kernel:
    """The folded layer: (H, W, C) or (B, H, W, C) uint8 pixels -> z0 (k + N, D) or (B, k + N, D) float32.

    With `grids` (`--resize native`) it takes pixels of any grid (H and W multiples of P), one
    table per grid; a list of images of several grids gives a list of token arrays.
    """

    config: LayerConfig
    weight: np.ndarray  # (P^2 C, D), normalisation folded in, rows in (P, P, C) order
    table: np.ndarray  # (k + N, D): the output's prefix rows, then bias (+ E_pos) of each patch
    prefix: int  # k: rows of the output before the patches (0 for patch tokens)
    grids: GridTables | None = None  # tables for other grids (native); None: the layer's grid only
    norm: LayerNorm | None = None  # the pre-norm of the patch rows (the prefix rows are normalised in `table`)

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(k + N, D); None where each image has its own grid."""
        return None if self.grids is not None else tuple(self.table.shape)

    def grid_of(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The patch grid (gh, gw) of pixels of `shape` (H, W, C), checked against the layer."""
        cfg, p = self.config, self.config.patch_size
        h, w, c = shape[-3:] if len(shape) >= 3 else (0, 0, 0)
        fits = (h, w) == cfg.size if self.grids is None else h and w and not (h % p or w % p)
        if len(shape) not in (3, 4) or c != cfg.in_channels or not fits:
            size = f"({cfg.size[0]}, {cfg.size[1]}, " if self.grids is None else f"(H, W, with H and W multiples of {p}; "
            raise ValueError(f"expected pixels of shape {size}{cfg.in_channels}), got {tuple(shape)}")
        return h // p, w // p

    def table_for(self, grid: tuple[int, int]) -> np.ndarray:
        return self.table if self.grids is None or grid == self.config.grid else self.grids.table(grid)

    def __call__(self, pixels):
        with single_blas_thread():  # the same bits whatever the process and the machine: see blas.py
            if isinstance(pixels, (list, tuple)):  # images of several grids (native)
                return [self(image) for image in pixels]
            table = self.table_for(self.grid_of(pixels.shape))
            if pixels.ndim == 3:
                return self._one(pixels, table, np.empty(table.shape, np.float32))
            out = np.empty((len(pixels), *table.shape), np.float32)
            for image, z in zip(pixels, out):  # one product per image: each writes a contiguous block
                self._one(image, table, z)
            return out

    def _one(self, pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> np.ndarray:
        p, c = self.config.patch_size, self.config.in_channels
        h, w = pixels.shape[0] // p, pixels.shape[1] // p
        # (1)-(2): (H, W, C) -> (h, P, w, P, C) -> (h, w, P, P, C) -> (N_p, P^2 C), row-major patches
        patches = pixels.reshape(h, p, w, p, c).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * c)
        k = self.prefix
        out[:k] = table[:k]  # (4)-(5) for the prefix tokens
        np.matmul(patches.astype(np.float32), self.weight, out=out[k:])  # (3): x_p E
        out[k:] += table[k:]  # (5): + bias (+ E_pos)
        if self.norm is not None:
            self.norm.inplace(out[k:])  # the pre-norm (CLIP's ln_pre), token by token
        return out
