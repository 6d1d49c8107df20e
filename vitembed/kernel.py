"""The input layer for uint8 pixels: its parameters, folded once, applied without torch.

A layer's parameters (`LayerParams`, numpy float32 under the seed's names) and one preprocessing
(mean and std of pixels / 255) fold into a single affine map of the raw patches (`fold`):

    patches = pixels cut into P x P x C blocks, flattened      (steps 1-2, HWC order)
    z0[k:]  = patches @ W + T[k:]                              (step 3, and E_pos of the patches)
    z0[:k]  = T[:k]                                            (steps 4-5 for the k prefix tokens)

W is E with (x / 255 - mean) / std folded in: (x a + b) E = x (a E) + b E, a = 1 / (255 std),
b = -mean / std. T holds the class (and register) tokens plus their E_pos rows, then the bias,
b E and the E_pos row of each patch. `Kernel` applies it with numpy, one BLAS call per image; the
torch engine (`encoder.TorchEngine`) applies the same W and T on its device. Both equal the
reference layer (`layer.VitInputLayer.forward`) up to float32 rounding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .blas import single_blas_thread
from .config import LayerConfig

__all__ = ["Kernel", "LayerParams", "fingerprint"]

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
        """From a `VitInputLayer` (any device)."""
        return cls.from_state_dict(layer.config, layer.state_dict())

    @classmethod
    def from_state_dict(cls, config: LayerConfig, state) -> LayerParams:
        """From torch tensors (or arrays) under the seed's names, as float32 numpy arrays."""
        return cls(config, {k: _float32(v) for k, v in state.items()})

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.tensors

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

    def fold(self, mean, std) -> Kernel:
        """The layer for uint8 pixels normalised with `mean` and `std` (per channel, of pixels / 255)."""
        cfg, t = self.config, self.tensors
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
        pos = t[POS].reshape(-1, d)  # (1, rows, D) -> (rows, D); rows = N + k, or N (no_embed_class)
        table = np.empty((n + k, d), np.float32)
        if k:
            table[:k] = np.concatenate([t[name].reshape(-1, d) for name in (CLS, REG) if name in t])  # (k, D)
            if cfg.pos_embed_prefix:
                table[:k] += pos[:k]
        table[k:] = bias + pos[-n:]
        return Kernel(cfg, w, table)


def _float32(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    return value.detach().cpu().float().numpy()  # a torch tensor


@dataclass
class Kernel:
    """The folded layer: (S, S, C) or (B, S, S, C) uint8 pixels -> z0 (N + k, D) or (B, N + k, D) float32."""

    config: LayerConfig
    weight: np.ndarray  # (P^2 C, D), normalisation folded in, rows in (P, P, C) order
    table: np.ndarray  # (N + k, D): prefix tokens, then bias + E_pos of each patch

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with single_blas_thread():  # the same bits whatever the process and the machine: see blas.py
            if pixels.ndim == 3:
                return self._one(pixels, np.empty(self.table.shape, np.float32))
            out = np.empty((len(pixels), *self.table.shape), np.float32)
            for image, z in zip(pixels, out):  # one product per image: each writes a contiguous block
                self._one(image, z)
            return out

    def _one(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        cfg = self.config
        s, p, c = cfg.image_size, cfg.patch_size, cfg.in_channels
        if pixels.shape != (s, s, c):
            raise ValueError(f"expected pixels of shape ({s}, {s}, {c}), got {pixels.shape}")
        h = s // p
        # (1)-(2): (S, S, C) -> (h, P, w, P, C) -> (h, w, P, P, C) -> (N_p, P^2 C), row-major patches
        patches = pixels.reshape(h, p, h, p, c).transpose(0, 2, 1, 3, 4).reshape(h * h, p * p * c)
        k = cfg.num_prefix_tokens
        out[:k] = self.table[:k]  # (4)-(5) for the prefix tokens
        np.matmul(patches.astype(np.float32), self.weight, out=out[k:])  # (3): x_p E
        out[k:] += self.table[k:]  # (5): + bias + E_pos
        return out
