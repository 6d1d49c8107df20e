"""TEMPORARY scratch pool for local testing (replaced by the real pool)."""
from __future__ import annotations
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from .errors import VitembedError

_TASK = None

@dataclass(frozen=True)
class TaskFailed:
    reason: str

class WorkersDied(VitembedError):
    pass

def _init(task, initializer, initargs):
    global _TASK
    _TASK = task
    if initializer: initializer(*initargs)

def _call(item):
    try:
        return _TASK(item)
    except Exception as exc:
        return TaskFailed(f"the decoder failed: {type(exc).__name__}: {exc}")

class OrderedPool:
    def __init__(self, task, workers, *, window, timeout=None, stop=None, initializer=None, initargs=(), context=None):
        self.task, self.workers, self.window, self.stop = task, workers, window, stop
        self.initializer, self.initargs, self.context = initializer, initargs, context
        self.pool = None
    def start(self, items, is_task=lambda item: True):
        self.items, self.is_task = iter(items), is_task
        if self.workers:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=self.context, initializer=_init, initargs=(self.task, self.initializer, self.initargs))
        self.inflight = deque()
        if self.workers: self._fill()
    def _fill(self):
        while len(self.inflight) < self.window and not (self.stop and self.stop.is_set()):
            item = next(self.items, _END)
            if item is _END: return
            if not self.is_task(item): self.inflight.append((item, None)); continue
            self.inflight.append((item, self.pool.submit(_call, item) if self.pool else None))
    def __iter__(self):
        while True:
            if not self.workers:
                for item in self.items:
                    if self.stop and self.stop.is_set(): return
                    if not self.is_task(item): yield item, None; continue
                    try: yield item, self.task(item)
                    except Exception as exc: yield item, TaskFailed(str(exc))
                return
            self._fill()
            if not self.inflight: return
            item, fut = self.inflight.popleft()
            yield item, (fut.result() if fut else None)
    def close(self):
        if self.pool: self.pool.shutdown(cancel_futures=True)
        return []
_END = object()
