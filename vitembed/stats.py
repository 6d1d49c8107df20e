"""Statistics of saved outputs, for `vitembed inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["tensor_stats"]


def tensor_stats(path: Path) -> dict[str, Any]:
    """Shape, dtype, min, mean, std and max of a saved .npy or .pt output.

    Raises:
        InputError: the file cannot be read as an array.
    """
    import numpy as np

    from .errors import InputError

    try:
        if path.suffix.lower() == ".pt":
            import torch

            t = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise InputError(f"holds a {type(t).__name__}, not a tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            values = t.detach().double()
            shape = list(t.shape)
            if values.numel() == 0:
                return {"shape": shape, "dtype": dtype, "min": None, "mean": None, "std": None, "max": None}
            return {"shape": shape, "dtype": dtype, "min": values.min().item(), "mean": values.mean().item(),
                    "std": values.std(unbiased=False).item(), "max": values.max().item()}
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("no such file") from None
    except Exception as exc:  # numpy and torch raise many kinds for a bad file
        raise InputError(f"cannot read: {' '.join(str(exc).split())[:200]}") from None
    stats: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.size == 0 or a.dtype.kind not in "fiu":
        return {**stats, "min": None, "mean": None, "std": None, "max": None}
    v = np.asarray(a, dtype=np.float64)
    return {**stats, "min": float(v.min()), "mean": float(v.mean()), "std": float(v.std()), "max": float(v.max())}
