"""numpy's BLAS threads, set per process (threadpoolctl).

OpenBLAS splits a product differently with another thread count, which changes the last bits of
the result. The numpy engine always multiplies on one thread (a decoder process per core is the
parallelism), so that an image's tokens do not depend on --workers or on the machine's core count;
OpenBLAS's idle threads would also spin in every decoder. Only the BLAS that numpy loaded is set:
torch's own thread pools are torch's (`torch.set_num_threads`).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

__all__ = ["blas_core", "blas_threads", "set_blas_threads", "single_blas_thread"]


@functools.cache
def _numpy_blas():
    """threadpoolctl's controller of the BLAS libraries numpy's wheel bundles (none: an empty one)."""
    from threadpoolctl import ThreadpoolController

    package = Path(np.__file__).resolve().parent
    folders = (package.parent / "numpy.libs", package / ".dylibs", package)  # Linux and Windows; macOS; in-tree
    controller = ThreadpoolController()
    bundled = [lib.filepath for lib in controller.lib_controllers
               if lib.user_api == "blas" and Path(lib.filepath).resolve().parent in folders]
    return controller.select(filepath=bundled)


def set_blas_threads(n: int) -> int | None:
    """Give numpy's BLAS `n` threads in this process; returns the previous count (None: unknown)."""
    previous = blas_threads()
    if previous is not None:
        _numpy_blas().limit(limits=n)
    return previous


def blas_core() -> str | None:
    """The CPU kernels numpy's OpenBLAS chose (Haswell, SkylakeX, ...), or None if unknown."""
    return next((lib.architecture for lib in _numpy_blas().lib_controllers if hasattr(lib, "architecture")), None)


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
    libs = _numpy_blas().lib_controllers
    return libs[0].num_threads if libs else None
