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
  - a worker that dies in a chunk: each of the chunk's items is sent again alone, and only the one
    whose worker dies again is reported, "the decoder process died while reading this file";
  - a chunk that runs past `timeout` seconds (from the moment a worker took it): its worker is
    killed and replaced, and the items are sent again alone; an item alone past the timeout is
    reported, "decoding took longer than {timeout:g} s; the decoder was stopped";
  - a result that cannot come back (it does not pickle): as a task that raised, once alone.
Three worker deaths before any task has finished (items dying alone, or workers dying before they
could take a task) raise `WorkersDied`: the workers cannot start, most often a script that calls
vitembed without an `if __name__ == '__main__':` guard.

Stop and close. When `stop` is set, iteration returns within 0.1 s and `close()` kills the workers
at once (pebble's `stop()`, with the workers' SIGTERM left at its default, so that a worker stuck in
C code dies too) and returns the task items that were in flight, for the caller to clean up after
(a killed task may leave a temporary file). `close()` without a stop lets each worker finish the
item it is on, drops the rest of its chunk, and kills nothing.

workers=0 runs each task in this process, when it is asked for: the same results, TaskFailed for a
task that raises, no timeout, no initializer.

Why pebble (a library) and not our own pool over concurrent.futures: pebble's ProcessPool gives
per-task timeouts (counted from the moment a worker takes the task), replaces a worker that dies
or times out and fails only that worker's task, and stops its workers through a public API; the
pool over ProcessPoolExecutor needed the executor's private `_processes` to kill a hung worker,
lost every task in flight when one worker died, and timed chunks from the parent. Measured on 2
cores (AMD EPYC, KVM), 1024 small JPEGs, 2 workers, medians of 3 turns, main process's CPU per
image (`env -u OPENBLAS_CORETYPE python benchmarks/pool_cost.py --work /tmp/vb`, run at this
revision and at the one before it):
    POOL_COST_NUMBERS
End to end, POOL_AB_NUMBERS.
One pebble hazard is handled here: a worker that dies while it holds pebble's channel lock (a
kill from outside while it passes a message) would stall the other workers for 60 s (pebble
issue #163). So a dead worker retires its whole pool: a new one takes every chunk not finished,
and only a kill in the few microseconds a worker takes a task from the channel can still stall.
"""

from __future__ import annotations

import io
import itertools
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

from pebble import ProcessExpired, ProcessPool

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


def _sendable(value: Any) -> Any:
    """`value`, or TaskFailed if it cannot come back: pebble reports a result that fails to pickle
    with a TypeError, but one that fails otherwise (AttributeError for a local object, say) kills
    the worker and its chunk. Large buffers (numpy arrays) are pickled out of band, not copied: a
    few microseconds each."""
    try:
        ForkingPickler(io.BytesIO(), 5, True, _ignore).dump(value)  # its __init__ takes no keywords
    except Exception as exc:
        return TaskFailed(_failure(exc))
    return value


def _ignore(buffer: Any) -> None:
    pass


# --- in a worker process ---------------------------------------------------------------------

_TASK: Callable[[Any], Any] | None = None
_DROP: Any = None  # a shared byte: 1 once close() asks the workers to drop what they hold


def _start_worker(task: Callable[[Any], Any], drop: Any, initializer: Callable[..., None] | None,
                  initargs: tuple) -> None:
    """A worker's start: the task arrives here, once, however large it is."""
    global _TASK, _DROP
    _TASK, _DROP = task, drop
    # pebble's SIGTERM handler exits through Python, which a worker stuck in C never reaches: a
    # stop or a timeout must kill at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer(*initargs)


def _run_chunk(items: list[Any]) -> tuple[list[Any], float]:
    """The task on each of a chunk's items, and the seconds they took (to size the next chunks)."""
    start = time.perf_counter()
    values = []
    for item in items:
        if _DROP is not None and _DROP.value:
            break  # close(): the items left are not wanted
        values.append(_sendable(_call(_TASK, item)))
    return values, time.perf_counter() - start


# --- in the main process ---------------------------------------------------------------------

_CHUNK_SECONDS = 0.02  # a chunk's work: far above the cost of its messages (about 0.1 ms)
_MAX_CHUNK = 16


@dataclass
class _Chunk:
    """Consecutive items sent together (future None: one pass-through item, sent nowhere)."""

    items: list[Any]
    future: Future | None = None
    generation: int = 0  # the pool it went to
    retry: bool = False  # sent again, alone, after its chunk failed


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
        self.context = context
        self.finished = 0  # task items that came back from a worker, TaskFailed included
        self.deaths = 0  # workers that died on an item alone, or before taking any task
        self.chunk = 1  # items per chunk: one until chunks have been timed
        self.max_chunk = max(1, min(_MAX_CHUNK, self.window // (3 * max(workers, 1))))
        self.seconds_per_item: float | None = None
        self._pool: ProcessPool | None = None
        self._generation = 0
        self._drop: Any = None
        self._items: Iterator[Any] = iter(())
        self._is_task: Callable[[Any], bool] = lambda item: True
        self._inflight: deque[_Chunk] = deque()
        self._held = 0  # items in _inflight
        self._killed: list[Any] = []  # task items whose worker was killed, or died, while it held them

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, items: Iterable[Any], is_task: Callable[[Any], bool] = lambda item: True) -> None:
        """Take `items` (lazily) and send the first window now, before anything is asked for."""
        self._items, self._is_task = iter(items), is_task
        self._inflight.clear()
        self._held = 0
        if self.workers:
            self._fill()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """(item, task(item) or TaskFailed) in input order; pass-through items as (item, None)."""
        if self.workers == 0:
            yield from self._run_here()
            return
        while not self.stop.is_set():
            self._fill()
            if not self._inflight:
                return
            head = self._inflight[0]
            if head.future is not None:
                if not self._wait(head.future):
                    return  # stopped
                values = self._settle(head)
                if values is None:
                    continue  # its items went back to the workers, alone
            else:
                values = [None]
            self._inflight.popleft()
            self._held -= len(head.items)
            yield from zip(head.items, values)

    def close(self) -> list[Any]:
        """Shut the workers down (after a stop, kill them at once). Returns the task items whose
        worker was killed, or died, while it held them, the stop's included (the caller cleans up
        after them; an item may come twice)."""
        pool, self._pool = self._pool, None
        if pool is not None and self.stop.is_set():
            self._killed.extend(item for chunk in self._inflight if chunk.future is not None
                                and not chunk.future.done() for item in chunk.items)
            pool.stop()
            pool.join()
        elif pool is not None:
            self._drop.value = 1  # each worker finishes the item it is on
            pool.close()
            pool.join()
        killed, self._killed = self._killed, []
        return killed

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
                self._inflight.append(_Chunk([item]))
                self._held += 1
            self._hold(run)
            if len(items) < self.chunk:
                return  # no more items

    def _hold(self, items: list[Any]) -> None:
        if items:
            self._inflight.append(self._send(items))
            self._held += len(items)

    def _send(self, items: list[Any]) -> _Chunk:
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            future = self._pool.schedule(_run_chunk, args=(items,), timeout=self.timeout)
        except RuntimeError as exc:  # the pool broke since the last look
            future = Future()
            future.set_exception(BrokenProcessPool(str(exc)))
        return _Chunk(items, future, self._generation)

    def _new_pool(self) -> ProcessPool:
        context = self.context
        if context is None:
            import multiprocessing as context
        self._drop = context.RawValue("b", 0)
        return ProcessPool(self.workers, initializer=_start_worker, context=context,
                           initargs=(self.task, self._drop, self.initializer, self.initargs))

    # --- receiving ---------------------------------------------------------------------------

    def _wait(self, future: Future) -> bool:
        """Wait for `future`; False if stopped first."""
        while not future.done():
            if self.stop.is_set():
                return False
            wait([future], timeout=0.1)
        return True

    def _settle(self, chunk: _Chunk) -> list[Any] | None:
        """A finished chunk's values (TaskFailed for a failed item alone), or None when its items
        went back to the workers: alone, to find the one that fails, or as they were."""
        assert chunk.future is not None
        try:
            values, seconds = chunk.future.result()
        except (ProcessExpired, BrokenProcessPool) as exc:
            return self._died(chunk, broken=isinstance(exc, BrokenProcessPool))
        except FutureTimeout:  # pebble killed its worker
            self._killed.extend(chunk.items)
            return self._alone(chunk, TaskFailed(TIMED_OUT.format(timeout=self.timeout)))
        except Exception as exc:  # the result could not come back
            return self._alone(chunk, TaskFailed(_failure(exc)), ran=True)
        self._learn(seconds, max(len(values), 1))
        self.finished += len(values)
        return values

    def _died(self, chunk: _Chunk, broken: bool) -> list[Any] | None:
        """The head chunk's worker died (broken: every worker died before it could take a task)."""
        if chunk.generation == self._generation:
            self._retire()  # see the module docstring: pebble issue #163
            if broken:
                self._count_death()
        if broken:  # not this chunk's fault: it goes again as it was
            self._resend(chunk, alone=False)
            return None
        self._killed.extend(chunk.items)
        if not chunk.retry:  # an item dies twice, alone the second time, before it is blamed
            self._resend(chunk, alone=True)
            return None
        self._count_death()
        return [TaskFailed(DIED)]

    def _alone(self, chunk: _Chunk, failure: TaskFailed, ran: bool = False) -> list[Any] | None:
        """`failure` for an item alone; a chunk's items are sent again, each alone, to find which."""
        if len(chunk.items) > 1:
            self._resend(chunk, alone=True)
            return None
        if ran:
            self.finished += 1
        return [failure]

    def _resend(self, chunk: _Chunk, alone: bool) -> None:
        """Send the head chunk's items again: each alone (a new chunk each, in its place), or together."""
        assert self._inflight[0] is chunk
        self._inflight.popleft()
        parts = [[item] for item in chunk.items] if alone else [chunk.items]
        chunks = [self._send(part) for part in parts]
        for part in chunks:
            part.retry = alone or chunk.retry
        self._inflight.extendleft(reversed(chunks))

    def _retire(self) -> None:
        """Replace the pool: a worker died, and may hold pebble's channel lock. Every chunk the old
        pool had not finished goes to the new one as it was."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None
        self._generation += 1
        for chunk in list(self._inflight)[1:]:
            if chunk.future is not None and (not chunk.future.done() or _broken(chunk.future)):
                if not chunk.future.done():
                    self._killed.extend(chunk.items)
                chunk.future = self._send(chunk.items).future
                chunk.generation = self._generation

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

    def _run_here(self) -> Iterator[tuple[Any, Any]]:
        """workers=0: each task in this process, as it is asked for."""
        for item in self._items:
            if self.stop.is_set():
                return
            if not self._is_task(item):
                yield item, None
                continue
            value = _call(self.task, item)
            self.finished += 1
            yield item, value


def _broken(future: Future) -> bool:
    return isinstance(future.exception(), BrokenProcessPool)
