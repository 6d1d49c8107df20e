"""The multiprocessing context of the decoder processes, kept light to import.

Decoders fork from a forkserver that has imported Pillow and numpy once (never torch). Starting
that server is a fresh interpreter plus those imports, about 0.2 s: `start_decoder_server` lets the
CLI begin it first thing, so that it overlaps the main process's own imports.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os

PRELOAD = ["vitembed.pipeline"]


def decoder_context():
    """forkserver where the platform has it (Linux, macOS), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start_decoder_server() -> None:
    """Start the forkserver now, in the background; a no-op where there is none or it runs.

    Its numpy gets one BLAS thread: a decoder computes on one core (see kernel.set_blas_threads),
    and OpenBLAS's extra threads would otherwise spin for a while in every process that loads it.
    """
    ctx = decoder_context()
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _environ(OPENBLAS_NUM_THREADS="1"):
        forkserver.ensure_running()


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables the user has not set, for a while."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
