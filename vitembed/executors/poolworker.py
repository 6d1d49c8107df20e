"""The worker side of `pool.OrderedPool`, and the executor it runs on: what a worker process
imports (the decoder server preloads it), kept apart from the main process's bookkeeping."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..errors import VitembedError, one_line
from ..files.reads import files_kept_open

DIED = "the decoder process died while reading this file"
TIMED_OUT = "decoding took longer than {timeout:g} s; the decoder was stopped"


@dataclass(frozen=True)
class TaskFailed:
    """A task that produced no result: its worker died, it ran past the timeout, it raised, or its result could not come back."""

    reason: str


class WorkersDied(VitembedError):
    """Worker processes die before any task finishes: they cannot start."""

    def __init__(self) -> None:
        super().__init__("decoder processes die before decoding anything; a script that calls "
                         "vitembed.encode must guard it with `if __name__ == '__main__':` "
                         "(or pass workers=0)")


def failure(exc: BaseException) -> str:
    """The report for an item whose task raised, or whose result could not come back."""
    return f"the decoder failed: {type(exc).__name__}: {one_line(exc)}"


def call(task: Callable[[Any], Any], item: Any) -> Any:
    """task(item), or TaskFailed if it raises."""
    try:
        return task(item)
    except Exception as exc:  # this item only; the rest of its chunk goes on
        return TaskFailed(failure(exc))


# --- in a worker process ---------------------------------------------------------------------

_TASK: Callable[[Any], Any] | None = None
_DROP: Any = None  # a shared byte: 1 once the pool wants nothing more from its workers
_TAKEN: Any = None  # shared: slot seq % len holds the number of a chunk a worker took


def _start_worker(task: Callable[[Any], Any], drop: Any, taken: Any, pids: Connection,
                  initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker's start: the task arrives here, once, however large it is; the pid goes back."""
    global _TASK, _DROP, _TAKEN
    _TASK, _DROP, _TAKEN = task, drop, taken
    try:
        pids.send_bytes(os.getpid().to_bytes(8, "little"))  # one write of 12 bytes: atomic, no lock
    except OSError:  # the pool is gone already; the drop flag is set
        pass
    pids.close()
    if initializer is not None:
        initializer(*initargs)


def _run_chunk(seq: int, items: list[Any]) -> tuple[list[Any], float]:
    """The task on each of a chunk's items, and the seconds they took (to size the next chunks)."""
    _TAKEN[seq % len(_TAKEN)] = seq
    start = time.perf_counter()
    values = []
    with files_kept_open():  # a tar shard's members in the chunk (`reads.Stored`), read with one open
        for item in items:
            if _DROP.value:
                break  # close(): the items left are not wanted
            values.append(call(_TASK, item))
    return values, time.perf_counter() - start


class Workers:
    """One ProcessPoolExecutor, the pids its workers send when they start, and the chunks they took."""

    def __init__(self, workers: int, context, slots: int, task: Callable[[Any], Any],
                 initializer: Callable[..., None] | None, initargs: tuple):
        self.drop = context.RawValue("b", 0)
        self.taken = context.RawArray("q", slots)
        self._pids, self._sender = context.Pipe(duplex=False)  # the sender goes to each worker started
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                            initargs=(task, self.drop, self.taken, self._sender, initializer, initargs))
        self.pids: set[int] = set()

    def took(self, seq: int) -> bool:
        """Whether a worker took the chunk sent as number `seq`."""
        return self.taken[seq % len(self.taken)] == seq

    def kill(self) -> None:
        """Kill the workers now (each that has taken anything sent its pid first) and wait until
        they are gone; one that has not sent its pid takes nothing (the drop flag)."""
        self.drop.value = 1  # before the pids are read: a worker sends its pid, then looks at it
        while self._pids.poll():
            self.pids.add(int.from_bytes(self._pids.recv_bytes(), "little"))
        mine = [p for p in multiprocessing.active_children() if p.pid in self.pids]
        for process in mine:
            process.kill()
        for process in mine:
            process.join(5.0)

    def submit(self, seq: int, items: list[Any]):
        """Send `items` as chunk number `seq`: a Future of (values, seconds)."""
        return self.executor.submit(_run_chunk, seq, items)

    def close(self, wait: bool) -> None:
        """Shut the executor down; with `wait`, until its manager thread has ended, within a bound
        (`shut_down`), whatever the workers did."""
        shut_down(self.executor, wait)
        self._pids.close()
        self._sender.close()


_SETTLE_SECONDS = 1.0  # for an executor's manager thread to end once its workers are dead or done


def shut_down(executor: ProcessPoolExecutor, wait: bool = True, seconds: float = _SETTLE_SECONDS) -> None:
    """`executor.shutdown(cancel_futures=True)`, its manager thread waited for (with `wait`) at
    most about 2 x `seconds`, plus the kill of its processes; without `wait`, the same is done in
    a daemon thread, so that no manager thread outlives its executor for good.

    The stdlib's `shutdown(wait=True)` waits without a bound, and one case never ends: a worker
    killed (SIGKILL, by `Workers.kill`) while it was sending a result leaves half a message in the
    result pipe, and the manager thread waits in `recv` for the rest of it for ever, this process
    holding a writer of that pipe. The executor offers no public way out, so past `seconds` its own
    processes are killed and this process's end of its result pipe is closed: the manager thread
    reads an end of file, takes the pool for broken, and ends.
    """
    # Taken before shutdown(), which drops the executor's references to them.
    thread = getattr(executor, "_executor_manager_thread", None)
    processes = list((getattr(executor, "_processes", None) or {}).values())
    results = getattr(executor, "_result_queue", None)
    executor.shutdown(wait=False, cancel_futures=True)
    if thread is None:
        return
    if wait:
        _settle(thread, processes, results, seconds)
    else:
        threading.Thread(target=_settle, args=(thread, processes, results, seconds), daemon=True,
                         name="vitembed-settle-pool").start()


def _settle(thread: threading.Thread, processes: list, results: Any, seconds: float) -> None:
    """Wait for an executor's manager thread; past `seconds`, end it (see `shut_down`)."""
    thread.join(seconds)
    if not thread.is_alive():
        return
    for process in processes:
        process.kill()
    for process in processes:
        process.join(seconds)
    try:
        results._writer.close()
    except (AttributeError, OSError):
        pass
    thread.join(seconds)
