"""An ordered pool of worker processes: one task on many items, results in input order.

    items ──> OrderedPool(task, workers, window=...) ──> (item, task(item) | TaskFailed | None)

It knows nothing of images: the run gives it a picklable `task` (vitembed's decoders) and the items.

Order and pass-through. `start(items, is_task)` takes the items lazily; `__iter__` yields each item
once, in input order, with what `task(item)` returned, or a `TaskFailed`. An item for which
`is_task(item)` is false is sent nowhere: it comes back as (item, None), in its place.

Window and back-pressure. At most `window` items are held (sent and not yet yielded, pass-through
items included): the next chunk is sent only once the window has room for all of it, so a slow
consumer stops the reading of `items`. `start` sends the first window at once, before anything is
asked for, so that the workers' start and first tasks overlap the caller's own set-up.

Chunks. Consecutive task items travel together, to spread the main process's cost per message
(about 0.1 ms, whatever a message holds) over several items. The first window goes one item per
chunk; after that a chunk is about 20 ms of a worker's work, from a moving average of the measured
seconds per item (0.8 old + 0.2 new), at most 16 items and at most window // (3 * workers), so that
each worker still holds a few chunks of the window.

Failures. Each costs only its own item, which gets `TaskFailed(reason)`:
  - a task that raises: "the decoder failed: Error: message"; the rest of its chunk goes on;
  - a result that cannot come back (it does not pickle): its chunk's items are sent again, each
    alone, and the one that fails alone gets the same message;
  - a worker that dies: the executor breaks, and its workers and every task it held are lost. The
    chunks a worker had taken (each worker marks, in shared memory, the chunk it takes) are the
    suspects: their items are sent again, each alone, and one at a time, with nothing else in
    the pool until the last of them is back, so that a death has one suspect; one that kills its
    worker there is reported, "the decoder process died while reading this file". The chunks no
    worker had taken are sent again as they were;
  - a chunk that is still running `timeout` seconds after the main process began to wait for it
    (it is the oldest in flight then): the pool is killed and replaced, the chunk's items are sent
    again alone, and an item alone past the timeout is reported, "decoding took longer than
    {timeout:g} s; the decoder was stopped".
Three deaths before any task has finished (items dying alone, or pools whose workers all die
before they take a task) raise `WorkersDied`: the workers cannot start, most often a script that
calls vitembed without an `if __name__ == '__main__':` guard.

Stop and close. When `stop` is set, iteration returns within 0.1 s, and `close()` kills the
workers at once, and waits until they are gone: each worker sends its pid when it starts, and the
pool kills, with `Process.kill()` (SIGKILL: a worker stuck in C code dies too), the processes
among `multiprocessing.active_children()` that have those pids. (One that has not sent its pid yet
has taken nothing; it finds the drop flag set and takes nothing.) `close()` without a stop lets
each worker finish the item it is on, drops the rest, and kills a worker still on its item after
`timeout`. `close()` returns the task items whose worker was killed, or died, while it held them
(stop, timeout, death), for the caller to clean up after (a killed task may leave a temporary
file); an item may come twice.

workers=0 runs each task in this process, when it is asked for: the same results, TaskFailed for a
task that raises, no timeout, no initializer.

The task travels once per worker: it rides in the worker's initializer arguments, never in a chunk.

Why a pool of our own (over the stdlib's ProcessPoolExecutor) and not a library. pebble's
ProcessPool was used for a while (per-task timeouts, a death blamed on its one task, a public
stop) and loky was glanced at (one dead worker breaks its whole executor; no per-task timeout).
The project's rule keeps hand-written machinery only where an A/B run shows it is better; it did.
Measured on 2 cores (AMD EPYC, KVM guest), 2 workers, numpy engine writing .npy, interleaved
turns (`TMPDIR=/dev/shm python benchmarks/ab.py A B --turns N -- CORPUS`), medians:
  - 1024 small JPEGs (/tmp/vb/small1024 from benchmarks/bench.py): pebble against this pool,
    B/A = 1.111 and 1.063 against the pool of 9189685 (which killed through the executor's private
    `_processes`), in the same hour; this pool against 9189685: 1.058 (16 turns, 1.90 vs 2.01 s),
    1.02 by wall time in a loop of 8 (`/usr/bin/time`: 2.42 vs 2.47 s; main process CPU 0.555 vs
    0.585 s). The rest of the gap is the restructured run's own bookkeeping (outcomes that pickle
    paths, the claimed-path table): in one process (`--workers 0`) this revision is faster.
  - 64 large JPEGs, vit-b16: this pool against 9189685, 1.022 (6 turns, 2.63 vs 2.69 s).
  - 48 small JPEGs (start-up): 1.012 (0.455 vs 0.460 s): pebble's import (asyncio) cost 25 ms.
What it gives up against pebble: a timeout counts from the moment the main process waits for the
chunk (it is then the oldest in flight), not from the moment a worker took it; and after a death
the suspects run one at a time (a death breaks the whole executor, which cannot say which task
its worker held). Both only matter on inputs that hang or crash a decoder.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .errors import VitembedError

__all__ = ["OrderedPool", "TaskFailed", "WorkersDied"]

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


def _failure(exc: BaseException) -> str:
    """The report for an item whose task raised, or whose result could not come back."""
    return f"the decoder failed: {type(exc).__name__}: {exc}"


def _call(task: Callable[[Any], Any], item: Any) -> Any:
    try:
        return task(item)
    except Exception as exc:  # this item only; the rest of its chunk goes on
        return TaskFailed(_failure(exc))


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
    for item in items:
        if _DROP.value:
            break  # close(): the items left are not wanted
        values.append(_call(_TASK, item))
    return values, time.perf_counter() - start


# --- in the main process ---------------------------------------------------------------------


def _everything(item: Any) -> bool:
    return True


_CHUNK_SECONDS = 0.02  # a chunk's work: far above the cost of its messages (about 0.1 ms)
_MAX_CHUNK = 16
_POLL = 0.1  # seconds between looks at the stop event


@dataclass(eq=False)
class _Chunk:
    """Consecutive items sent together. `values` once known (at once, None each, for a
    pass-through item); `future` None while it waits to be sent."""

    items: list[Any]
    values: list[Any] | None = None
    future: Future | None = None
    seq: int = 0  # the number it was last sent with
    probe: bool = False  # alone, after a death: sent with nothing else in the pool


class _Workers:
    """One ProcessPoolExecutor, the pids its workers send when they start, and the chunks they took."""

    def __init__(self, workers: int, context, slots: int, task: Callable[[Any], Any],
                 initializer: Callable[..., None] | None, initargs: tuple):
        self.drop = context.RawValue("b", 0)
        self.taken = context.RawArray("q", slots)
        self._pids, self._sender = context.Pipe(duplex=False)  # the sender goes to each worker started
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                            initargs=(task, self.drop, self.taken, self._sender, initializer, initargs))
        self.pids: set[int] = set()

    def took(self, chunk: _Chunk) -> bool:
        """Whether a worker took `chunk` (from its last sending)."""
        return self.taken[chunk.seq % len(self.taken)] == chunk.seq

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

    def close(self, wait: bool) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=True)
        self._pids.close()
        self._sender.close()


class OrderedPool:
    """Ordered, bounded parallel tasks that survive workers dying or hanging (see the module docstring)."""

    def __init__(self, task: Callable[[Any], Any], workers: int, *, window: int,
                 timeout: float | None = None, stop: threading.Event | None = None,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 context=None):
        self.task = task
        self.workers = workers
        self.window = max(window, 1)
        self.timeout = timeout
        self.stop = stop if stop is not None else threading.Event()
        self.initializer, self.initargs = initializer, initargs
        self.context = context if context is not None else multiprocessing.get_context()
        self.finished = 0  # task items that came back from a worker, TaskFailed included
        self.deaths = 0  # items that killed their worker alone, and pools whose workers all died
        self.chunk = 1  # items per chunk: one until chunks have been timed
        self.max_chunk = max(1, min(_MAX_CHUNK, self.window // (3 * max(workers, 1))))
        self.seconds_per_item: float | None = None
        self._workers: _Workers | None = None
        self._seq = 0  # chunks sent
        self._probing = False  # items on probation after a death: one chunk in the pool at a time
        self._items: Iterator[Any] = iter(())
        self._is_task: Callable[[Any], bool] = _everything
        self._inflight: deque[_Chunk] = deque()
        self._held = 0  # items in _inflight
        self._killed: list[Any] = []  # task items whose worker was killed, or died, while it held them

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, items: Iterable[Any], is_task: Callable[[Any], bool] = _everything) -> None:
        """Take `items` (lazily) and send the first window now, before anything is asked for."""
        self._items, self._is_task = iter(items), is_task
        self._inflight.clear()
        self._held = 0
        if self.workers:
            self._fill()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """(item, task(item) or TaskFailed) in input order; pass-through items as (item, None)."""
        if self.workers == 0:
            yield from _run_here(self)
            return
        while not self.stop.is_set():
            self._fill()
            if not self._inflight:
                return
            head = self._inflight[0]
            if head.values is None:
                self._settle(head)
                continue
            self._inflight.popleft()
            self._held -= len(head.items)
            yield from zip(head.items, head.values)

    def close(self) -> list[Any]:
        """Shut the workers down: after a stop, kill them at once; else let each finish the item it
        is on. Returns the task items whose worker was killed, or died, while it held them (the
        caller cleans up after them; an item may come twice)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            if self.stop.is_set() or not self._finish(workers):
                workers.kill()
                self._killed.extend(item for chunk in self._lost() if workers.took(chunk) for item in chunk.items)
            workers.close(wait=True)
        killed, self._killed = self._killed, []
        return killed

    def _finish(self, workers: _Workers) -> bool:
        """Ask the workers to drop what they hold, and wait for each to finish its item; False if
        a stop, or the timeout, comes first."""
        workers.drop.value = 1
        pending = [chunk.future for chunk in self._lost()]
        for future in pending:
            future.cancel()  # those no worker has been given yet
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self.stop.is_set():
            if not wait(pending, timeout=_POLL).not_done:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
        return False

    # --- sending -----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Send chunks while the window has room for a whole one."""
        while not self.stop.is_set() and (self._held == 0 or self.window - self._held >= self.chunk):
            items = list(itertools.islice(self._items, self.chunk))
            run: list[Any] = []
            for item in items:
                if self._is_task(item):
                    run.append(item)
                    continue
                self._hold(run)  # what came before it goes first
                run = []
                self._inflight.append(_Chunk([item], [None]))
                self._held += 1
            self._hold(run)
            if len(items) < self.chunk:
                return  # no more items

    def _hold(self, items: list[Any]) -> None:
        if items:
            chunk = _Chunk(items)
            self._inflight.append(chunk)
            self._held += len(items)
            if not self._probing:
                self._submit(chunk)

    def _submit(self, chunk: _Chunk) -> None:
        self._seq += 1
        chunk.seq, chunk.future = self._seq, self._send(chunk.items)

    def _send(self, items: list[Any]) -> Future:
        """Send `items` as chunk number `self._seq`."""
        if self._workers is None:
            self._workers = _Workers(self.workers, self.context, 4 * self.window + 16, self.task,
                                     self.initializer, self.initargs)
        try:
            return self._workers.executor.submit(_run_chunk, self._seq, items)
        except RuntimeError as exc:  # the pool broke since the last look
            future: Future = Future()
            future.set_exception(BrokenProcessPool(str(exc)))
            return future

    def _dispatch(self) -> None:
        """Send the chunks that wait: all of them; or, while items are on probation, the first
        one (in input order) once nothing else is in the pool."""
        waiting = [chunk for chunk in self._inflight if chunk.values is None and chunk.future is None]
        self._probing = any(chunk.probe and chunk.values is None for chunk in self._inflight)
        if not self._probing:
            for chunk in waiting:
                self._submit(chunk)
        elif waiting and not any(chunk.future is not None and not chunk.future.done() for chunk in self._inflight):
            self._submit(waiting[0])

    # --- receiving ---------------------------------------------------------------------------

    def _settle(self, chunk: _Chunk) -> None:
        """Wait for the head chunk, and set its values; or send its items again (alone, to find
        the one that fails, or as they were)."""
        if not self._wait(chunk):
            if not self.stop.is_set():
                self._ran_over(chunk)
            return
        try:
            values, seconds = chunk.future.result()
        except BrokenProcessPool:
            self._broken(chunk)
            return
        except Exception as exc:  # the result could not come back
            self._failed(chunk, TaskFailed(_failure(exc)))
            return
        self._learn(seconds, max(len(values), 1))
        self.finished += len(values)
        chunk.values = values
        if self._probing:
            self._dispatch()

    def _wait(self, chunk: _Chunk) -> bool:
        """Wait for `chunk` to finish; False if stopped, or past the timeout, first."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self.stop.is_set():
            try:
                chunk.future.exception(timeout=_POLL)
                return True
            except FutureTimeout:
                if deadline is not None and time.monotonic() > deadline:
                    return False
        return False

    def _failed(self, chunk: _Chunk, failure: TaskFailed) -> None:
        """`failure` for an item alone; a chunk's items are sent again, each alone, to find which."""
        if len(chunk.items) > 1:
            self._split([chunk], probe=chunk.probe)
            self._dispatch()
            return
        chunk.values = [failure]
        self.finished += 1

    def _ran_over(self, chunk: _Chunk) -> None:
        """The head chunk ran past the timeout: the pool is killed and replaced; an item alone is
        reported, a chunk's items go again alone."""
        if chunk in self._retire():
            if len(chunk.items) > 1:
                self._split([chunk], probe=chunk.probe)
            else:
                chunk.values = [TaskFailed(TIMED_OUT.format(timeout=self.timeout))]
        self._dispatch()

    def _broken(self, chunk: _Chunk) -> None:
        """A worker died, and the pool with it. Alone in the pool, an item that a worker had taken
        is to blame; else the chunks taken go on probation, each item alone."""
        alone = self._probing  # the head was the only chunk in the pool
        taken = self._retire()
        if not taken:
            self._count_death()  # the workers died before they took anything
        elif alone and len(chunk.items) == 1:
            chunk.values = [TaskFailed(DIED)]
            self._count_death()
        else:
            self._split(taken, probe=True)
        self._dispatch()

    def _retire(self) -> list[_Chunk]:
        """Kill the pool (it broke, or a chunk ran past the timeout); every chunk it had not
        finished waits to be sent again, to a new pool, as it was. Returns those a worker had
        taken: their items are among the killed."""
        workers, self._workers = self._workers, None
        workers.kill()
        lost = self._lost()
        taken = [chunk for chunk in lost if workers.took(chunk)]
        workers.close(wait=False)
        for chunk in lost:
            chunk.future = None
        self._killed.extend(item for chunk in taken for item in chunk.items)
        return taken

    def _lost(self) -> list[_Chunk]:
        """The chunks sent whose values will not come: not finished, or lost with a broken pool."""
        return [chunk for chunk in self._inflight if chunk.values is None and chunk.future is not None
                and (not chunk.future.done() or _broken(chunk.future))]

    def _split(self, chunks: list[_Chunk], probe: bool) -> None:
        """Each item of `chunks` becomes a chunk of its own, in its place, waiting to be sent."""
        split = {id(chunk) for chunk in chunks}
        self._inflight = deque(part for chunk in self._inflight for part in (
            [_Chunk([item], probe=probe) for item in chunk.items] if id(chunk) in split else [chunk]))

    def _count_death(self) -> None:
        self.deaths += 1
        if self.deaths >= 3 and not self.finished:
            raise WorkersDied()

    def _learn(self, seconds: float, items: int) -> None:
        """Size the next chunks from how long one took (a moving average per item)."""
        per_item = seconds / items
        if self.seconds_per_item is not None:
            per_item = 0.8 * self.seconds_per_item + 0.2 * per_item
        self.seconds_per_item = per_item
        self.chunk = max(1, min(self.max_chunk, int(_CHUNK_SECONDS / max(per_item, 1e-6))))


def _run_here(pool: OrderedPool) -> Iterator[tuple[Any, Any]]:
    """workers=0: each task in this process, as it is asked for."""
    for item in pool._items:
        if pool.stop.is_set():
            return
        if not pool._is_task(item):
            yield item, None
            continue
        value = _call(pool.task, item)
        pool.finished += 1
        yield item, value


def _broken(future: Future) -> bool:
    try:
        return isinstance(future.exception(timeout=0), BrokenProcessPool)
    except CancelledError:
        return False
