"""The run's retry-then-isolate rule (`pipeline.retry`), which the local pool and Ray both apply."""

from collections import deque

from vitembed.pipeline.retry import Unit, after_failure, to_send


def _queue(*rows_per_unit):
    return deque(Unit(list(rows)) for rows in rows_per_unit)


def test_a_death_splits_the_suspects_in_place_on_probation():
    queue = _queue("ab", "c", "de")
    dead = [queue[0], queue[2]]
    queue, blamed = after_failure(queue, dead, death=True, alone=False)
    assert blamed is None
    assert [(u.rows, u.probe) for u in queue] == [(["a"], True), (["b"], True), (["c"], False),
                                                  (["d"], True), (["e"], True)]


def test_a_row_that_dies_alone_is_blamed_and_one_that_dies_with_others_is_tried_alone():
    queue = _queue("a", "b")
    same, blamed = after_failure(queue, [queue[0]], death=True, alone=True)
    assert blamed is queue[0] and same is queue
    queue, blamed = after_failure(queue, [queue[0]], death=True, alone=False)
    assert blamed is None and queue[0].probe


def test_a_raise_splits_without_probation_and_blames_a_single_row_at_once():
    queue = _queue("ab")
    queue, blamed = after_failure(queue, [queue[0]], death=False)
    assert blamed is None and [(u.rows, u.probe) for u in queue] == [(["a"], False), (["b"], False)]
    queue, blamed = after_failure(queue, [queue[1]], death=False)
    assert blamed is queue[1]


def test_on_probation_one_unit_goes_at_a_time_with_nothing_else_out():
    queue = _queue("a", "b", "c")
    queue, _ = after_failure(queue, [queue[1]], death=True)
    assert to_send(queue, out=1) == []
    assert to_send(queue, out=0) == [queue[0]]
    queue[1].results = ["done"]
    assert to_send(queue, out=0) == [queue[0], queue[2]]
