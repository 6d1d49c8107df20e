"""The multiprocessing context of the decoder processes, kept light to import.

Decoders fork from a forkserver that has imported Pillow and numpy once (never torch). Starting
that server is a fresh interpreter plus those imports, about 0.2 s: `start_decoder_server` lets the
CLI begin it first thing, so that it overlaps the main process's own imports.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import sys
import threading
import time

PRELOAD = ["vitembed.executors.decoder", "vitembed.executors.pool"]  # the decoders' code, and the pool's worker side


def decoder_context():
    """forkserver where the platform has it (Linux, macOS), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start_decoder_server() -> None:
    """Start the forkserver now, in the background; a no-op where there is none or it runs.

    Its numpy gets one BLAS thread: a decoder computes on one core (see blas.py),
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


def keep_heap() -> None:
    """Let glibc serve a decoder's recurring large allocations from a heap it keeps.

    A decoder allocates and frees the same few megabytes for every image (pixels, patches, z0).
    By default glibc gives the top of the heap back to the OS after most of those frees, and the
    next image faults the pages in again: about 0.5 ms of system time per small JPEG, a fifth of
    a decoder's work. Here allocations up to 32 MB come from the heap, and it is trimmed only once
    64 MB lie free at its top. (A larger M_TOP_PAD alone also stops the trimming, but it freezes
    glibc's adaptive mmap threshold at 128 KB, and 12-megapixel images then pay more in mmap.)
    A no-op without glibc.
    """
    if not sys.platform.startswith("linux"):
        return  # macOS and Windows: their allocators differ
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def exit_with(pid: int) -> None:
    """End this process (a decoder) as soon as process `pid` (the run's main process) ends.

    A decoder's parent is the forkserver, which lives on while any decoder holds its pipes, and
    a decoder waits on a queue that nobody will close: after a `kill -9` of the run they would all
    stay, blocked, for good. A daemon thread waits for `pid` to end (on a pidfd, where Linux has
    them; else by looking once a second) and exits the process; the forkserver and the resource
    tracker then see their pipes close and exit too.
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux 5.3+, or `pid` is gone already
            while _alive(pid):
                time.sleep(1.0)
        else:
            select.select([fd], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=watch, name="vitembed-watch-run", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
