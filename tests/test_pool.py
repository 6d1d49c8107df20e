"""OrderedPool: items in input order, a bounded window, chunks sized from their timing, and every
failure (a worker that dies, a task that hangs, raises or returns what cannot come back) costing
only its own item."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests import pool_tasks
from vitembed.executors.pool import _CHUNK_SECONDS, OrderedPool, TaskFailed, WorkersDied
from vitembed.executors.processes import decoder_context

DIED = TaskFailed("the decoder process died while reading this file")
RAISED = TaskFailed("the decoder failed: RuntimeError: broken on purpose")


def _is_task(item: str) -> bool:
    return not item.startswith("pass")  # `pass...` items go through in their place, as skipped inputs


@pytest.fixture
def sent(monkeypatch) -> list[list[str]]:
    """The chunks the pools send, in order."""
    chunks: list[list[str]] = []
    send = OrderedPool._send

    def recording_send(self, items):
        chunks.append(list(items))
        return send(self, items)

    monkeypatch.setattr(OrderedPool, "_send", recording_send)
    return chunks


def _run(items: list[str], chunk: int = 1, task=pool_tasks.name_of, **options) -> tuple[list, list]:
    """(what the pool yields, what close() returns), with 2 workers and a window of 24."""
    options.setdefault("window", 24)
    with OrderedPool(task, 2, context=decoder_context(), **options) as pool:
        pool.chunk = chunk
        pool.start(items, _is_task)
        out = list(pool)
        return out, pool.close()


def test_order_pass_through_and_chunks_that_grow(sent):
    names = [f"img{i:03d}" for i in range(200)]
    names[7:7] = ["pass-a"]
    names[120:120] = ["pass-b", "pass-c"]
    with OrderedPool(pool_tasks.name_of, 2, window=24, context=decoder_context()) as pool:
        pool.start(names, _is_task)
        assert all(len(chunk) == 1 for chunk in sent) and len(sent) == 23  # the first window, one per task
        out = list(pool)
    assert out == [(n, None if n.startswith("pass") else n) for n in names]
    assert not any(n.startswith("pass") for chunk in sent for n in chunk)
    # Once a chunk has been timed (these take microseconds), chunks are as large as the window
    # allows: 24 // (3 * 2 workers).
    assert pool.max_chunk == 4 and pool.chunk == 4
    assert max(map(len, sent)) == 4 and len(sent) < 24 + (200 - 24) // 3


def test_chunk_size_follows_the_time_per_item():
    pool = OrderedPool(pool_tasks.name_of, 2, window=96)
    assert pool.chunk == 1 and pool.max_chunk == 16
    pool._learn(8 * _CHUNK_SECONDS / 4, 8)  # a quarter of the target per item
    assert pool.chunk == 4
    pool._learn(_CHUNK_SECONDS / 100, 1)  # a moving average: one fast item moves it a little
    assert pool.chunk == 4
    for _ in range(20):
        pool._learn(_CHUNK_SECONDS / 100, 1)
    assert pool.chunk == 16  # capped
    assert OrderedPool(pool_tasks.name_of, 2, window=24).max_chunk == 4  # by the window too
    for _ in range(20):
        pool._learn(3 * _CHUNK_SECONDS, 1)  # slow items: one per chunk
    assert pool.chunk == 1


def test_the_window_bounds_the_items_taken_and_start_sends_it(tmp_path):
    taken = 0

    def items():
        nonlocal taken
        for i in range(40):
            taken += 1
            yield f"img{i:02d}"

    with OrderedPool(pool_tasks.Touch(str(tmp_path)), 2, window=8, context=decoder_context()) as pool:
        pool.start(items())
        assert taken == 8
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)  # the first window runs before anything is asked for
        assert len(list(tmp_path.iterdir())) == 8
        for done, (name, value) in enumerate(pool, 1):
            assert value == name
            assert taken - done <= 8
    assert done == 40


def test_a_worker_dying_in_a_chunk_costs_only_its_item(sent):
    names = [f"img{i:02d}" for i in range(12)]
    names[5] = "die05"
    out, killed = _run(names, chunk=4)
    assert out == [(n, DIED if n == "die05" else n) for n in names]
    assert sent[1] == ["img04", "die05", "img06", "img07"]  # sent in a chunk,
    assert ["die05"] in sent and ["img04"] in sent  # then its items alone
    assert killed.count("die05") == 2 and "img00" not in killed  # for the caller to clean up after


def test_a_worker_dying_with_the_channel_locked_stalls_nothing():
    """A worker that dies holding a lock of the queues it shares with the other workers (killed
    while it passes a message) would stall them; its pool is replaced at once."""
    names = ["slow00", "locked01"] + [f"img{i:02d}" for i in range(2, 12)]  # the head waits on the other worker
    start = time.monotonic()
    out, _ = _run(names)
    assert out == [(n, DIED if n == "locked01" else n) for n in names]
    assert time.monotonic() - start < 10


def test_an_exception_fails_only_its_item():
    names = ["a", "b", "raise-c", "d", "e"]
    out, killed = _run(names, chunk=4)
    assert out == [(n, RAISED if n == "raise-c" else n) for n in names]
    assert killed == []


def test_a_result_that_cannot_come_back_fails_only_its_item():
    names = ["a", "b", "unpicklable-c", "d", "e"]
    out, _ = _run(names, chunk=4)
    failure = TaskFailed("the decoder failed: AttributeError: Can't pickle local object 'name_of.<locals>.<lambda>'")
    assert out == [(n, failure if n == "unpicklable-c" else n) for n in names]


@pytest.mark.slow
def test_a_hang_in_a_chunk_times_out_alone():
    names = ["a", "b", "hang-c", "d", "e", "f"]
    out, killed = _run(names, chunk=4, timeout=1.0)
    stopped = TaskFailed("decoding took longer than 1 s; the decoder was stopped")
    assert out == [(n, stopped if n == "hang-c" else n) for n in names]
    assert "hang-c" in killed


def test_stop_returns_at_once_and_close_kills_and_returns_what_was_in_flight(tmp_path):
    stop = threading.Event()
    names = ["a", "hang-b", "pass-c", "hang-d", "e", "f"]
    pool = OrderedPool(pool_tasks.name_of, 2, window=24, stop=stop, context=decoder_context(),
                       initializer=pool_tasks.mark_started, initargs=(str(tmp_path),))
    pool.start(names, _is_task)
    threading.Timer(1.0, stop.set).start()
    out: list = []
    consumer = threading.Thread(target=lambda: out.extend(pool))
    consumer.start()
    consumer.join(3.0)  # the stop comes after 1 s
    assert not consumer.is_alive()
    start = time.monotonic()
    killed = pool.close()
    assert time.monotonic() - start < 1.0  # no waiting for the hung tasks
    assert out == [("a", "a")]
    assert {"hang-b", "hang-d"} <= set(killed) <= {"hang-b", "hang-d", "e", "f"}
    workers = [int(p.name) for p in tmp_path.iterdir()]
    assert len(workers) == 2
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_close_without_stop_lets_workers_finish_their_item_only():
    names = [f"slow{i:02d}" for i in range(80)]  # 50 ms each: 2 s of work for 2 workers
    pool = OrderedPool(pool_tasks.name_of, 2, window=80, context=decoder_context())
    pool.start(names)
    assert next(iter(pool)) == ("slow00", "slow00")
    start = time.monotonic()
    assert pool.close() == []
    assert time.monotonic() - start < 1.0


def test_the_task_travels_once_per_worker():
    pool_tasks.Counted.pickled = 0
    task = pool_tasks.Counted(b"x" * (4 << 20))  # a layer's worth of data
    names = [f"img{i:03d}" for i in range(100)]
    out, _ = _run(names, task=task)
    assert out == [(n, (n, 4 << 20)) for n in names]
    assert pool_tasks.Counted.pickled == 2  # once per worker, never per chunk


def test_no_workers_runs_here_with_the_same_results():
    names = ["a", "pass-b", "raise-c", "d"]
    with OrderedPool(pool_tasks.Suffix("!"), 0, window=1) as pool:
        pool.start(names, _is_task)
        out = list(pool)
    me = os.getpid()
    assert out == [("a", f"a!@{me}"), ("pass-b", None), ("raise-c", f"raise-c!@{me}"), ("d", f"d!@{me}")]
    with OrderedPool(pool_tasks.name_of, 0, window=1, timeout=0.01) as pool:
        pool.start(names, _is_task)
        assert list(pool) == [("a", "a"), ("pass-b", None), ("raise-c", RAISED), ("d", "d")]
        assert pool.close() == []


def test_three_deaths_before_any_task_finished_stop_the_run():
    with pytest.raises(WorkersDied, match=r"if __name__ == '__main__':.*workers=0"):
        _run(["die1", "die2", "die3", "die4", "a"])
    with pytest.raises(WorkersDied):  # workers that die before they take a task
        _run(["a", "b"], initializer=pool_tasks.exit_at_start)
    # After a task has finished, deaths are the items' own.
    names = ["a", "die1", "die2", "die3", "b"]
    out, _ = _run(names)
    assert out == [(n, DIED if n.startswith("die") else n) for n in names]
