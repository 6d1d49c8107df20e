"""The input layer in numpy: z0 computed where the image is decoded, without torch.

On a CPU the layer is one small matrix product per image. `Kernel` computes it inside the
decoder processes, so that an image is decoded, embedded and written by one process, and the
main process never imports torch (about 1.6 s of a core per run). The numbers are the layer's
(`layer.VitInputLayer.forward`) up to float32 rounding:

    patches = pixels cut into P x P x C blocks, flattened      (steps 1-2, HWC order)
    z0[k:]  = patches @ W + T[k:]                              (step 3 and E_pos of the patches)
    z0[:k]  = T[:k]                                            (steps 4-5 for the prefix tokens)

where W is E with the normalisation (x / 255 - mean) / std folded in, and T holds the class token
plus its E_pos row, and the bias plus the E_pos row of each patch.

A random layer (no --weights) comes from torch's generator; its parameters are kept in a small
cache (`layer_cache_dir`) after the first run, keyed by the layer shape, the seed and the torch
version, so that later runs need no torch at all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .config import LayerConfig

__all__ = ["Kernel", "LayerParams", "fingerprint", "layer_cache_dir", "set_blas_threads", "single_blas_thread"]

WEIGHT, BIAS, CLS, REG, POS = "patch_emb_layer.weight", "patch_emb_layer.bias", "cls_token", "reg_token", "pos_emb"


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
    """A layer's parameters as float32 numpy arrays, under the seed's names (see `VitInputLayer`)."""

    config: LayerConfig
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_module(cls, layer) -> LayerParams:
        return cls(layer.config, {k: v.detach().cpu().float().numpy() for k, v in layer.state_dict().items()})

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.tensors

    def fold(self, mean, std) -> Kernel:
        """The kernel for uint8 pixels normalised with `mean` and `std` (per channel, of pixels / 255)."""
        cfg, t = self.config, self.tensors
        c, p, d = cfg.in_channels, cfg.patch_size, cfg.emb_dim
        weight = t[WEIGHT].astype(np.float32)  # (D, C, P, P)
        mean = np.asarray(mean, np.float32).reshape(1, c, 1, 1)
        std = np.asarray(std, np.float32).reshape(1, c, 1, 1)
        scaled = weight / (np.float32(255.0) * std)  # E with x / (255 std) folded in
        bias = (weight * (-mean / std)).sum(axis=(1, 2, 3), dtype=np.float32)  # the - mean / std part
        if BIAS in t:
            bias = bias + t[BIAS]
        w = np.ascontiguousarray(scaled.transpose(2, 3, 1, 0).reshape(p * p * c, d))  # (P, P, C, D) -> (P^2 C, D)

        n, k = cfg.num_patches, cfg.num_prefix_tokens
        pos = t[POS].reshape(-1, d)
        table = np.empty((n + k, d), np.float32)
        prefix = [t[name].reshape(-1, d) for name in (CLS, REG) if name in t]
        if k:
            table[:k] = np.concatenate(prefix)
            if cfg.pos_embed_prefix:
                table[:k] += pos[:k]
        table[k:] = bias + pos[-n:]
        return Kernel(cfg, w, table)

    def __post_init__(self) -> None:
        cfg = self.config
        d = cfg.emb_dim
        expected = {WEIGHT: (d, cfg.in_channels, cfg.patch_size, cfg.patch_size), POS: (1, cfg.num_pos_rows, d)}
        if cfg.class_token:
            expected[CLS] = (1, 1, d)
        if cfg.num_reg_tokens:
            expected[REG] = (1, cfg.num_reg_tokens, d)
        if BIAS in self.tensors:
            expected[BIAS] = (d,)
        shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        if shapes != expected:
            raise ValueError(f"layer parameters {shapes} do not fit the layer {expected}")
        if any(t.dtype != np.float32 for t in self.tensors.values()):
            raise ValueError("layer parameters must be float32")


@dataclass
class Kernel:
    """The layer for one preprocessing: (S, S, C) uint8 pixels -> z0 (N + k, D) float32."""

    config: LayerConfig
    weight: np.ndarray  # (P^2 C, D), normalisation folded in, rows in (P, P, C) order
    table: np.ndarray  # (N + k, D): prefix tokens, then bias + E_pos of each patch

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        cfg = self.config
        s, p, c = cfg.image_size, cfg.patch_size, cfg.in_channels
        h = s // p
        # (1)-(2): (S, S, C) -> (h, P, w, P, C) -> (h, w, P, P, C) -> (N_p, P^2 C), row-major patches
        patches = pixels.reshape(h, p, h, p, c).transpose(0, 2, 1, 3, 4).reshape(h * h, p * p * c)
        k = cfg.num_prefix_tokens
        out = np.empty(self.table.shape, np.float32)
        out[:k] = self.table[:k]
        np.matmul(patches.astype(np.float32), self.weight, out=out[k:])  # (3): x_p E
        out[k:] += self.table[k:]  # (5): + bias + E_pos
        return out


# --- the cache of random layers --------------------------------------------------------------


def layer_cache_dir() -> Path:
    """Where random layers' parameters are kept: $VITEMBED_CACHE_DIR, else the user's cache folder."""
    explicit = os.environ.get("VITEMBED_CACHE_DIR")
    if explicit:
        return Path(explicit)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vitembed"


def torch_version() -> str:
    """torch's installed version, read without importing it (once: a search of sys.path)."""
    global _TORCH_VERSION
    if _TORCH_VERSION is not None:
        return _TORCH_VERSION
    try:
        _TORCH_VERSION = metadata.version("torch")
        return _TORCH_VERSION
    except metadata.PackageNotFoundError:
        torch = sys.modules.get("torch")
        return torch.__version__ if torch is not None else "none"


_TORCH_VERSION: str | None = None


def _cache_file(config: LayerConfig, seed: int) -> Path:
    # The numbers come from torch's generator: another torch version may draw others.
    key = json.dumps({"config": config.to_dict(), "seed": seed, "torch": torch_version()}, sort_keys=True)
    return layer_cache_dir() / f"random-layer-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def cached_random_layer(config: LayerConfig, seed: int) -> LayerParams | None:
    """The parameters of `build_layer(config, seed)` from the cache, or None."""
    path = _cache_file(config, seed)
    try:
        with np.load(path, allow_pickle=False) as data:
            tensors = {name: data[name] for name in data.files}
        return LayerParams(config, tensors)
    except Exception:  # absent, unreadable, damaged or not this layer's: drawn again
        return None


def remember_random_layer(params: LayerParams, seed: int) -> None:
    """Keep a random layer's parameters for the next run; a cache that cannot be written is skipped."""
    from .writers import atomic_write

    path = _cache_file(params.config, seed)
    try:
        atomic_write(path, lambda f: np.savez(f, **params.tensors))
    except Exception:  # OutputError, ...: the cache only saves time
        pass


# --- BLAS threads ---------------------------------------------------------------------------
#
# OpenBLAS splits a product differently with another thread count, which changes the last bits
# of the result. The kernel always runs on one thread (a decoder per core is the parallelism), so
# that an image's tokens do not depend on --workers or on the machine's core count.


@functools.cache
def _openblas() -> tuple | None:
    """(set_num_threads, get_num_threads, library) of the OpenBLAS that numpy's wheel bundles, or None."""
    import ctypes

    package = Path(np.__file__).resolve().parent
    candidates = []
    for libs in (package.parent / "numpy.libs", package / ".dylibs"):  # Linux and Windows wheels; macOS
        try:
            candidates += sorted(libs.glob("*openblas*")) if libs.is_dir() else []
        except OSError:
            pass
    for lib in candidates:
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "_64_", ""):
                setter = getattr(handle, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(handle, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter, handle
    return None


def set_blas_threads(n: int) -> int | None:
    """Give numpy's BLAS `n` threads in this process; returns the previous count (None: unknown).

    Best effort, as threadpoolctl does it; a BLAS other than the bundled OpenBLAS keeps its own.
    """
    import ctypes

    blas = _openblas()
    if blas is None:
        return None
    setter, getter, _ = blas
    previous = int(getter())
    setter(ctypes.c_int(n))
    return previous


def blas_core() -> str | None:
    """The CPU kernels numpy's OpenBLAS chose (Haswell, SkylakeX, ...), or None if unknown."""
    blas = _openblas()
    if blas is None:
        return None
    import ctypes

    for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
        getter = getattr(blas[2], name, None)
        if getter is not None:
            getter.restype = ctypes.c_char_p
            return getter().decode(errors="replace")
    return None


@contextlib.contextmanager
def single_blas_thread():
    """The kernel's thread count for a while, in a process that is not a decoder."""
    previous = set_blas_threads(1)
    try:
        yield
    finally:
        if previous is not None:
            set_blas_threads(previous)
