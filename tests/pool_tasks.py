"""Tasks for tests/test_pool.py, in a module of their own so that worker processes import them
quickly."""

from __future__ import annotations

import os
import time


def name_of(name: str) -> str:
    """The item itself; an item with `die` kills its worker process, `hang` never returns, `raise`
    raises, `slow` takes 50 ms, `unpicklable` returns what cannot come back, `locked` exits holding
    the locks of the queues it shares with the other workers (as a worker killed while it passes a
    message)."""
    if "locked" in name:
        _exit_holding_the_channel_lock()
    if "die" in name:
        os._exit(1)
    if "hang" in name:
        time.sleep(3600)
    if "raise" in name:
        raise RuntimeError("broken on purpose")
    if "slow" in name:
        time.sleep(0.05)
    if "unpicklable" in name:
        return lambda: name
    return name


class Suffix:
    """A task object that carries data: each worker gets it once, when it starts."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def __call__(self, name: str) -> str:
        return name + self.suffix + f"@{os.getpid()}"


def exit_at_start() -> None:
    """An initializer after which the worker is gone: no worker can take a task."""
    os._exit(3)


def mark_started(folder: str) -> None:
    """An initializer that leaves a file per worker start, named by its pid."""
    open(os.path.join(folder, str(os.getpid())), "w").close()


class Touch:
    """A task that leaves a file named by its item in `folder`, then returns the item."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, name: str) -> str:
        open(os.path.join(self.folder, name), "w").close()
        return name


class Counted:
    """A task that counts, in the process that pickles it, how many times it was pickled."""

    pickled = 0

    def __init__(self, payload: bytes):
        self.payload = payload

    def __getstate__(self) -> dict:
        type(self).pickled += 1
        return self.__dict__

    def __call__(self, name: str) -> tuple[str, int]:
        return name, len(self.payload)


def _exit_holding_the_channel_lock() -> None:
    import gc
    from multiprocessing.queues import Queue, SimpleQueue

    # The stdlib's queues between an executor and its workers (this test's only reach into them),
    # and the locks a worker takes: the read lock of the queue it takes tasks from, the write lock
    # of the one it answers on. (The parent alone writes tasks: no worker holds that write lock.)
    for queue in (o for o in gc.get_objects() if isinstance(o, (Queue, SimpleQueue))):
        lock = queue._wlock if isinstance(queue, SimpleQueue) else queue._rlock
        if lock is not None:
            lock.acquire(timeout=0.5)  # another worker may wait for a task, holding the read lock
    os._exit(1)
