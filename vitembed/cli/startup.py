"""Start-up and exit of the `vitembed` process: two tricks that make a short run shorter (a run
of one image is mostly start-up: `benchmarks/ab.py` compares launch to exit).

- **The decoder server starts first** (`start_early`): the forkserver that decoder processes fork
  from imports numpy, Pillow and the decoding code once, about 0.2 s. Started before Typer is
  even imported, it overlaps the main process's own imports. Typer has not parsed the command
  line yet, so `wants_decoders` reads it the simple way: `encode` without `--help` and without
  `--workers 0`; a wrong guess costs only an idle server.
- **No interpreter teardown** (`exit_without_teardown`): once `encode` has returned, every file
  is closed and every decoder joined, the interpreter would still tear down every module (numpy,
  Pillow, typer, pydantic): about 40 ms of every run. The exit handlers still run and the
  standard streams are flushed; a run under a profiler or debugger, or with a thread still
  running, exits the usual way.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["exit_without_teardown", "start_early", "wants_decoders"]


def start_early(argv: list[str]) -> None:
    """What the `vitembed` process sets for itself before anything is imported: one BLAS thread
    for `encode` and `show`, and the decoder server if `vitembed ARGV` is an encode that will use it.

    One BLAS thread: an encode's main process computes nothing with numpy's BLAS (decoders do, on
    one thread each: see blas.py), and `show`'s PCAs and products are small, where OpenBLAS's
    threads would contend with torch's on few cores and spin for a while after numpy loads. It
    takes effect when numpy is first imported, and decoder processes inherit it.
    """
    if argv[:1] in (["encode"], ["show"]):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if argv[:1] == ["encode"] and wants_decoders(argv[1:]):
        from ..executors.processes import start_decoder_server

        start_decoder_server()


def wants_decoders(args: list[str]) -> bool:
    """Whether `encode ARGS` will start decoder processes: not for --help, --workers 0 or --ray
    (Ray's actors decode)."""
    if "--help" in args or "-h" in args or "--ray" in args:
        return False
    for i, arg in enumerate(args):
        if arg in ("-j", "--workers") and args[i + 1:i + 2] == ["0"] or arg in ("-j0", "--workers=0"):
            return False
    return True


def exit_without_teardown(code: int | str | None) -> None:
    """Exit as `sys.exit(code)` would, less the interpreter's teardown of every module.

    Only with no other thread the interpreter would wait for (the run's files are closed and its
    decoders stopped; a daemon thread ends with the process either way), and with no profiler or
    debugger attached: otherwise this returns, for the caller to exit as usual.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        return  # a thread still runs; let the interpreter wait for it as usual (daemon threads it would not)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return  # a profiler or debugger (python -m cProfile ...) writes its results on the way out
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    import atexit

    atexit._run_exitfuncs()  # the exit handlers, as the interpreter would run them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what the interpreter returns when its final flush fails
    os._exit(code)
