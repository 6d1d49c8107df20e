"""The multiprocessing context of the decoder processes, kept light to import.

Decoders fork from a forkserver that has imported Pillow and numpy once (never torch). Starting
that server is a fresh interpreter plus those imports, about 0.2 s: `start_decoder_server` lets the
CLI begin it first thing, so that it overlaps the main process's own imports.
"""

from __future__ import annotations

import multiprocessing

PRELOAD = ["vitembed.images"]


def decoder_context():
    """forkserver where the platform has it (Linux, macOS), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start_decoder_server() -> None:
    """Start the forkserver now, in the background; a no-op where there is none."""
    ctx = decoder_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
