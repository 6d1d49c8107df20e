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

Failures. Each costs only its own item, which gets `TaskFailed(reason)`; what is sent again and
what is reported is the run's rule (`pipeline.retry`), which this pool applies to its chunks:
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

Why a pool of its own over the stdlib's ProcessPoolExecutor rather than a library: pebble's
ProcessPool has per-task timeouts, blames a death on its one task and stops publicly, but it costs
more per task in the main process and its import (asyncio) adds to start-up; loky breaks its whole
executor when one worker dies and has no per-task timeout. The project keeps hand-written
machinery only where an A/B run (`benchmarks/ab.py`) shows it better; this pool is. What it
gives up against pebble: a timeout counts from the moment the main process waits for the chunk
(it is then the oldest in flight), not from the moment a worker took it; and after a death the
suspects run one at a time (a death breaks the whole executor, which cannot say which task its
worker held). Both only matter on inputs that hang or crash a decoder.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from ..pipeline.retry import Unit, after_failure, on_probation, to_send
from .poolworker import DIED, TIMED_OUT, TaskFailed, Workers, WorkersDied, call, failure

__all__ = ["OrderedPool", "TaskFailed", "WorkersDied"]

# --- in the main process ---------------------------------------------------------------------


def _everything(item: Any) -> bool:
    return True


_CHUNK_SECONDS = 0.02  # a chunk's work: far above the cost of its messages (about 0.1 ms)
_MAX_CHUNK = 16
_POLL = 0.1  # seconds between looks at the stop event
_DRAIN_SECONDS = 1.0  # after a stop, for the workers to finish the item each is on (`_drain`)


@dataclass(eq=False)
class _Chunk(Unit):
    """Consecutive items sent together (`rows`). `results`: their values once known (at once, None
    each, for a pass-through item); `handle`: its Future, None while it waits to be sent."""

    seq: int = 0  # the number it was last sent with


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
        self._workers: Workers | None = None
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
            if head.results is None:
                self._settle(head)
                continue
            self._inflight.popleft()
            self._held -= len(head.rows)
            yield from zip(head.rows, head.results)

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """After a stop: (item, result) of what the workers finished while stopping (`_drain`)."""
        return _drain(self)

    def close(self) -> list[Any]:
        """Shut the workers down: after a stop, kill them at once; else let each finish the item it
        is on. Returns the task items whose worker was killed, or died, while it held them (the
        caller cleans up after them; an item may come twice)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            if self.stop.is_set() or not self._finish(workers):
                workers.kill()
                self._killed.extend(item for chunk in self._lost() if workers.took(chunk.seq) for item in chunk.rows)
            workers.close(wait=True)
        killed, self._killed = self._killed, []
        return killed

    def _finish(self, workers: Workers) -> bool:
        """Ask the workers to drop what they hold, and wait for each to finish its item; False if
        a stop, or the timeout, comes first."""
        workers.drop.value = 1
        pending = [chunk.handle for chunk in self._lost()]
        for future in pending:
            future.cancel()  # those no worker has been given yet
        return _wait(pending, self.stop, self.timeout)

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
                self._inflight.append(_Chunk([item], results=[None]))
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
        chunk.seq, chunk.handle = self._seq, self._send(chunk.rows)

    def _send(self, items: list[Any]) -> Future:
        """Send `items` as chunk number `self._seq`."""
        if self._workers is None:
            self._workers = Workers(self.workers, self.context, 4 * self.window + 16, self.task,
                                     self.initializer, self.initargs)
        try:
            return self._workers.submit(self._seq, items)
        except RuntimeError as exc:  # the pool broke since the last look
            future: Future = Future()
            future.set_exception(BrokenProcessPool(str(exc)))
            return future

    def _dispatch(self) -> None:
        """Send the chunks that wait, as the run's rule says (`retry.to_send`: one at a time while
        items are on probation)."""
        self._probing = on_probation(self._inflight)
        out = sum(chunk.handle is not None and not chunk.handle.done() for chunk in self._inflight)
        for chunk in to_send(self._inflight, out):
            self._submit(chunk)

    # --- receiving ---------------------------------------------------------------------------

    def _settle(self, chunk: _Chunk) -> None:
        """Wait for the head chunk, and set its values; or send its items again (alone, to find
        the one that fails, or as they were)."""
        if not _wait([chunk.handle], self.stop, self.timeout):
            if not self.stop.is_set():
                self._ran_over(chunk)
            return
        try:
            values, seconds = chunk.handle.result()
        except BrokenProcessPool:
            self._broken(chunk)
            return
        except Exception as exc:  # the result could not come back
            self._failed(chunk, TaskFailed(failure(exc)))
            return
        self._learn(seconds, max(len(values), 1))
        self.finished += len(values)
        chunk.results = values
        if self._probing:
            self._dispatch()

    def _failed(self, chunk: _Chunk, failure: TaskFailed) -> None:
        """`failure` for an item alone; a chunk's items are sent again, each alone, to find which
        (`retry.after_failure`)."""
        self._inflight, blamed = after_failure(self._inflight, [chunk], death=False)
        if blamed is not None:
            blamed.results = [failure]
            self.finished += 1
        self._dispatch()

    def _ran_over(self, chunk: _Chunk) -> None:
        """The head chunk ran past the timeout: the pool is killed and replaced; an item alone is
        reported, a chunk's items go again alone."""
        if chunk in self._retire():
            self._inflight, blamed = after_failure(self._inflight, [chunk], death=False)
            if blamed is not None:
                blamed.results = [TaskFailed(TIMED_OUT.format(timeout=self.timeout))]
        self._dispatch()

    def _broken(self, chunk: _Chunk) -> None:
        """A worker died, and the pool with it. The chunks a worker had taken are the suspects
        (`retry.after_failure`): one item alone in the pool is to blame, else each goes on
        probation. A death that took nothing counts towards `WorkersDied`."""
        alone = self._probing  # the head was the only chunk in the pool
        taken = self._retire()
        self._inflight, blamed = after_failure(self._inflight, taken, death=True, alone=alone)
        if blamed is not None:
            blamed.results = [TaskFailed(DIED)]
        if blamed is not None or not taken:
            self._count_death()
        self._dispatch()

    def _retire(self) -> list[_Chunk]:
        """Kill the pool (it broke, or a chunk ran past the timeout); every chunk it had not
        finished waits to be sent again, to a new pool, as it was. Returns those a worker had
        taken: their items are among the killed."""
        workers, self._workers = self._workers, None
        workers.kill()
        lost = self._lost()
        taken = [chunk for chunk in lost if workers.took(chunk.seq)]
        workers.close(wait=False)
        for chunk in lost:
            chunk.handle = None
        self._killed.extend(item for chunk in taken for item in chunk.rows)
        return taken

    def _lost(self) -> list[_Chunk]:
        """The chunks sent whose values will not come: not finished, or lost with a broken pool."""
        return [chunk for chunk in self._inflight if chunk.results is None and chunk.handle is not None
                and (not chunk.handle.done() or _broken(chunk.handle))]

    def _learn(self, seconds: float, items: int) -> None:
        """Size the next chunks from how long one took."""
        self.seconds_per_item = _per_item(self.seconds_per_item, seconds, items)
        self.chunk = max(1, min(self.max_chunk, int(_CHUNK_SECONDS / max(self.seconds_per_item, 1e-6))))

    def _count_death(self) -> None:
        self.deaths += 1
        if self.deaths >= 3 and not self.finished:
            raise WorkersDied()


def _drain(pool: OrderedPool, seconds: float = _DRAIN_SECONDS) -> Iterator[tuple[Any, Any]]:
    """After `pool`'s stop: its workers take nothing more and finish the item each is on, for up to
    `seconds`; (item, result) for each item whose result came back and was not yet yielded,
    in input order. What a worker finished (a file it wrote) is so told, not lost with its
    chunk; the chunks still running stay, for `OrderedPool.close()` to kill."""
    workers = pool._workers
    if workers is None:
        return
    workers.drop.value = 1  # each worker ends its chunk after the item it is on
    # Chunks no worker has taken yet come back at once, empty (the drop flag). None is cancelled:
    # a cancelled future that the executor later finds broken makes its manager thread raise.
    wait([chunk.handle for chunk in pool._inflight if chunk.results is None and chunk.handle is not None],
         timeout=seconds)
    left: deque[_Chunk] = deque()
    for chunk in pool._inflight:
        future = chunk.handle
        if chunk.results is None and future is not None and future.done():
            try:
                chunk.results = future.result()[0]  # the items done before the drop
            except Exception:  # a broken pool, a result that could not come back: nothing to tell
                pass
        if chunk.results is not None:
            yield from zip(chunk.rows, chunk.results)
        elif future is not None:
            left.append(chunk)
    pool._inflight, pool._held = left, sum(len(chunk.rows) for chunk in left)


def _run_here(pool: OrderedPool) -> Iterator[tuple[Any, Any]]:
    """workers=0: each task in this process, as it is asked for."""
    for item in pool._items:
        if pool.stop.is_set():
            return
        if not pool._is_task(item):
            yield item, None
            continue
        value = call(pool.task, item)
        pool.finished += 1
        yield item, value


def _broken(future: Future) -> bool:
    try:
        return isinstance(future.exception(timeout=0), BrokenProcessPool)
    except CancelledError:
        return False


def _wait(futures: list[Future], stop: threading.Event, timeout: float | None) -> bool:
    """Wait until `futures` are done: True; False if `stop` is set, or `timeout` seconds pass, first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set():
        if not wait(futures, timeout=_POLL).not_done:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
    return False


def _per_item(average: float | None, seconds: float, items: int) -> float:
    """Seconds per item, a moving average (0.8 old + 0.2 new), from a chunk of `items` that took `seconds`."""
    return seconds / items if average is None else 0.8 * average + 0.2 * seconds / items
