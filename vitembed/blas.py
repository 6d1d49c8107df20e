"""numpy's BLAS threads, set per process.

OpenBLAS splits a product differently with another thread count, which changes the last bits of
the result. The numpy engine always multiplies on one thread (a decoder process per core is the
parallelism), so that an image's tokens do not depend on --workers or on the machine's core count;
OpenBLAS's idle threads would also spin in every decoder. Best effort, as threadpoolctl does it,
for the OpenBLAS that numpy's wheels bundle: a few ctypes calls, found once, instead of a
dependency that scans every loaded library on each call.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

__all__ = ["blas_core", "blas_threads", "set_blas_threads", "single_blas_thread"]


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
    """One BLAS thread for a while (the numpy engine's products), then the caller's count again.

    Where there is one already (a decoder process), nothing is set: OpenBLAS's setter is not free.
    """
    previous = blas_threads()
    if previous in (None, 1):
        yield
        return
    set_blas_threads(1)
    try:
        yield
    finally:
        set_blas_threads(previous)


def blas_threads() -> int | None:
    """numpy's BLAS threads in this process (None: unknown)."""
    blas = _openblas()
    return None if blas is None else int(blas[1]())
