"""Signals in the `vitembed` process: SIGINT and SIGTERM stop a run cleanly (whole files only),
before the encode loop takes them over and while it runs."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["install_early_handlers", "stop_on_signals"]


def install_early_handlers() -> None:
    """The process's handling until the encode loop takes over: SIGTERM unwinds as Ctrl-C does
    (temporaries removed; exit 143, Ctrl-C 130), and neither is lost in a callback."""
    sys.unraisablehook = _signal_lost_in_callback
    signal.signal(signal.SIGTERM, _terminate)


class _Terminated(SystemExit):
    """SIGTERM before the encode loop took over (exit 143)."""


def _terminate(signum, frame):
    raise _Terminated(128 + signum)  # SIGTERM before the encode loop: unwind (temporaries removed), exit 143


def _signal_lost_in_callback(unraisable) -> None:
    """`sys.unraisablehook` of the `vitembed` process: a Ctrl-C or SIGTERM that landed in a
    callback Python cannot raise from (a weakref callback of the import system's module locks, a
    `__del__`) would be printed as an ignored traceback and the run would carry on as if never
    asked to stop. It is honoured at once instead, as a second signal is: before the encode loop
    nothing is half-written, and temporaries left by this process are removed by the next run."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("interrupted\n")
            sys.stderr.flush()
        os._exit(128 + signal.SIGINT)
    if isinstance(exc, _Terminated):
        os._exit(128 + signal.SIGTERM)
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM set `stop` (the run ends cleanly); a second one leaves at once. Yields
    the signals caught."""
    caught: list[int] = []

    def on_signal(signum, frame):
        if caught:  # a second Ctrl-C: leave now; outputs are whole files or absent anyway
            os._exit(128 + signum)
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
