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
  - a result that cannot come back (it does not pickle): the same, for that item only;
  - a worker that dies: pebble knows which chunk it held. Its items are sent again, each alone,
    and one that kills its worker again, alone, is reported, "the decoder process died while
    reading this file";
  - a chunk that runs past `timeout` seconds, counted from the moment a worker took it: pebble
    kills and replaces that worker; the items are sent again alone, and an item alone past the
    timeout is reported, "decoding took longer than {timeout:g} s; the decoder was stopped".
A pool that loses a worker in any way (pebble replaced one: each worker says when it starts; or it
broke) is replaced at once, and every chunk it had not finished goes to the new pool as it was:
a worker that dies while it holds pebble's channel lock (killed from outside while it passes a
message) would otherwise stall the other workers for 60 s (pebble issue #163), and a broken pebble
pool can leave tasks unanswered. Three deaths before any task has finished (items dying alone, or
pools whose workers all die before they take a task) raise `WorkersDied`: the workers cannot
start, most often a script that calls vitembed without an `if __name__ == '__main__':` guard.

Stop and close. When `stop` is set, iteration returns within 0.1 s, and `close()` kills the
workers at once (pebble's public `stop()`; a worker's SIGTERM is left at its default, so that one
stuck in C code dies too). `close()` without a stop lets each worker finish the item it is on and
drop the rest. `close()` returns the task items whose worker was killed, or died, while it held
them (stop, timeout, death, replaced pool), for the caller to clean up after (a killed task may
leave a temporary file); an item may come twice.

workers=0 runs each task in this process, when it is asked for: the same results, TaskFailed for a
task that raises, no timeout, no initializer.

The task travels once per worker: it rides in the worker's initializer arguments, never in a chunk.

Why pebble (a library), and what it costs. pebble's ProcessPool (loky was glanced at: one dead
worker breaks its whole executor, and it has no per-task timeout) gives per-task timeouts counted
from the moment a worker takes the task, blames a death on the one task its worker held (the pool
over concurrent.futures lost every task in flight and had to retry them one at a time), and stops
its workers through a public API (that pool killed them through the executor's private
`_processes`, which is no longer allowed). Measured on 2 cores (AMD EPYC, KVM guest, shared with
other jobs), 2 workers, this revision (B) against the ProcessPoolExecutor pool of 9189685 (A):
  - the main process's CPU per image, 1024 small JPEGs, medians of 3 runs of 3 turns
    (`env -u OPENBLAS_CORETYPE python benchmarks/pool_cost.py --work /tmp/vb`, at each revision):
    read for the device, chunks: A 55, B 51 us (one per task: A 199, B 180 us);
    decoded to pixels, chunks: A 209, B 212 us (one per task: A 496, B 412 us). Equal.
  - end to end, numpy engine writing .npy (`python benchmarks/ab.py 9189685 HEAD --turns 10 --
    /tmp/vb/small1024 --preset vit-b16`, and with A and B swapped): B/A = 1.116 and 1/0.905
    (medians 4.39 vs 3.94 s, 4.12 vs 3.73 s); earlier runs 1.07-1.13. On 48 images, +43 ms
    (0.593 vs 0.550 s): importing pebble (it imports asyncio) costs about 25 ms.
    The pool alone (1024 images, tasks timed in the workers) is equal within the noise, and the
    main process's CPU too: the cause of the gap is not found. By the project's rule it counts
    against pebble; pebble stays until a pool of our own in this shape (ProcessPoolExecutor,
    killed through public APIs) is measured against it, since the old one cannot stay as it was.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
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


def _start_worker(task: Callable[[Any], Any], drop: Any, started: Connection,
                  initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker's start: the task arrives here, once, however large it is."""
    global _TASK, _DROP
    _TASK, _DROP = task, drop
    started.send_bytes(b"")  # one write of 4 bytes: atomic, no lock a death could leave held
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
        if _DROP.value:
            break  # close(): the items left are not wanted
        values.append(_sendable(_call(_TASK, item)))
    return values, time.perf_counter() - start


# --- in the main process ---------------------------------------------------------------------


def _everything(item: Any) -> bool:
    return True


_CHUNK_SECONDS = 0.02  # a chunk's work: far above the cost of its messages (about 0.1 ms)
_MAX_CHUNK = 16


@dataclass
class _Chunk:
    """Consecutive items sent together (future None: one pass-through item, sent nowhere)."""

    items: list[Any]
    future: Future | None = None
    generation: int = 0  # the pool it went to
    retry: bool = False  # sent again, alone, after its worker died


class _Workers:
    """One pebble pool, and what tells that it lost a worker: each worker says when it starts."""

    def __init__(self, workers: int, context, worker_args: tuple):
        self.workers = workers
        self.drop = context.RawValue("b", 0)
        self.starts, started = context.Pipe(duplex=False)
        self.started = 0
        self.pool = ProcessPool(workers, initializer=_start_worker, context=context,
                                initargs=(worker_args[0], self.drop, started, *worker_args[1:]))
        self._started_end = started

    def failing(self) -> bool:
        """Whether pebble replaced a worker (one died, or ran past the timeout) or the pool broke."""
        while self.starts.poll(0):
            self.starts.recv_bytes()
            self.started += 1
        return self.started > self.workers or not self.pool.active

    def stop(self, wait: bool = True) -> None:
        """Stop the workers (killed, those still busy); without `wait`, in the background (pebble's
        join takes up to 0.1 s, the period of its loops)."""
        self.pool.stop()
        if wait:
            self._join()
        else:
            threading.Thread(target=self._join, name="vitembed-pool-join", daemon=True).start()

    def _join(self) -> None:
        self.pool.join()
        self.starts.close()
        self._started_end.close()


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
        self._generation = 0
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
            values: list[Any] | None = [None]
            if head.future is not None:
                if not self._wait(head):
                    return  # stopped
                values = self._settle(head)
                if values is None:
                    continue  # its items went back to the workers
            self._inflight.popleft()
            self._held -= len(head.items)
            yield from zip(head.items, values)

    def close(self) -> list[Any]:
        """Shut the workers down: after a stop, kill them at once; else let each finish the item it
        is on. Returns the task items whose worker was killed, or died, while it held them (the
        caller cleans up after them; an item may come twice)."""
        workers, self._workers = self._workers, None
        if workers is not None:
            idle = not self.stop.is_set() and self._drain(workers)
            self._killed.extend(item for chunk in self._inflight if chunk.future is not None
                                and not chunk.future.done() for item in chunk.items)
            workers.stop(wait=not idle)
        killed, self._killed = self._killed, []
        return killed

    def _drain(self, workers: _Workers) -> bool:
        """Ask the workers to drop what they hold, and wait for each to finish its item (not for a
        pool that lost a worker: a task it lost would never finish). True: they are all idle."""
        workers.drop.value = 1
        pending = [chunk.future for chunk in self._inflight if chunk.future is not None]
        while not all(future.done() for future in pending):
            if workers.failing():
                return False
            wait(pending, timeout=0.1)
        return True

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
            self._inflight.append(_Chunk(items, self._send(items), self._generation))
            self._held += len(items)

    def _send(self, items: list[Any]) -> Future:
        if self._workers is None:
            self._workers = _Workers(self.workers, self.context, (self.task, self.initializer, self.initargs))
        try:
            return self._workers.pool.schedule(_run_chunk, args=(items,), timeout=self.timeout)
        except RuntimeError as exc:  # the pool broke since the last look
            future: Future = Future()
            future.set_exception(BrokenProcessPool(str(exc)))
            return future

    # --- receiving ---------------------------------------------------------------------------

    def _wait(self, chunk: _Chunk) -> bool:
        """Wait for `chunk` to finish, replacing a pool that lost a worker; False if stopped first."""
        while not chunk.future.done():
            if self.stop.is_set():
                return False
            if chunk.generation == self._generation and self._workers.failing():
                self._retire(broken=not self._workers.pool.active)
                continue
            wait([chunk.future], timeout=0.1)
        return True

    def _settle(self, chunk: _Chunk) -> list[Any] | None:
        """A finished chunk's values (TaskFailed for a failed item alone), or None when its items
        went back to the workers: alone, to find the one that fails, or as they were."""
        try:
            values, seconds = chunk.future.result()
        except BrokenProcessPool:  # every worker died before it could take a task: not this chunk's fault
            if chunk.generation == self._generation:
                self._retire(broken=True)  # sends it again, as it was
            return None
        except ProcessExpired:
            return self._died(chunk)
        except FutureTimeout:  # pebble killed its worker
            self._killed.extend(chunk.items)
            return self._alone(chunk, TaskFailed(TIMED_OUT.format(timeout=self.timeout)))
        except Exception as exc:  # the result could not come back
            return self._alone(chunk, TaskFailed(_failure(exc)), ran=True)
        self._learn(seconds, max(len(values), 1))
        self.finished += len(values)
        return values

    def _died(self, chunk: _Chunk) -> list[Any] | None:
        """The head chunk's worker died while it ran it: each item goes again alone, and one that
        dies again is to blame."""
        self._killed.extend(chunk.items)
        if chunk.generation == self._generation:
            self._retire()
        if not chunk.retry:
            self._resend_alone(chunk, retry=True)
            return None
        self._count_death()
        return [TaskFailed(DIED)]

    def _alone(self, chunk: _Chunk, failure: TaskFailed, ran: bool = False) -> list[Any] | None:
        """`failure` for an item alone; a chunk's items are sent again, each alone, to find which."""
        if len(chunk.items) > 1:
            self._resend_alone(chunk, retry=chunk.retry)
            return None
        if ran:
            self.finished += 1
        return [failure]

    def _resend_alone(self, chunk: _Chunk, retry: bool) -> None:
        """Send the head chunk's items again, each alone, in its place."""
        assert self._inflight[0] is chunk
        self._inflight.popleft()
        alone = [_Chunk([item], self._send([item]), self._generation, retry) for item in chunk.items]
        self._inflight.extendleft(reversed(alone))

    def _retire(self, broken: bool = False) -> None:
        """Replace the pool, which lost a worker (broken: all of them, before they took a task).
        A worker that died holding pebble's channel lock would stall the others (pebble issue
        #163), and a broken pebble pool can leave tasks unanswered: every chunk not finished goes
        to a new pool, as it was."""
        self._killed.extend(item for chunk in self._inflight if chunk.future is not None
                            and not chunk.future.done() for item in chunk.items)
        self._workers.stop()
        self._workers = None
        self._generation += 1
        for chunk in self._inflight:
            if chunk.future is not None and (not chunk.future.done() or _broken(chunk.future)):
                chunk.future, chunk.generation = self._send(chunk.items), self._generation
        if broken:
            self._count_death()

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
    return isinstance(future.exception(), BrokenProcessPool)
