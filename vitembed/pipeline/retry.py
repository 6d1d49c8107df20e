"""Retry, then isolate: the run's one rule for a unit of work that came back without results.

An executor sends its inputs in units (the local pool's chunks, Ray's windows), keeps them in a
queue in input order, and reports here a unit that gave nothing back (its worker died, it ran
past the timeout, it raised, or its results could not come back), with its rows. The rule is the
same for every executor:

- a unit of one row that failed with no other suspect is reported failed (the executor sets its
  results, with its own reason), and the rest of the run goes on. A raise, a timeout or a result that
  cannot come back has no other suspect; a death does only when its unit was out alone;
- any other failed unit is split: each of its rows is sent again as a unit of its own, in its
  place in the queue;
- after a death (which any unit out at that moment may have caused) those units go on probation:
  while one waits, units are sent one at a time with nothing else out (`to_send`), so that a
  second death has one suspect.

A row is what must go together: one input for the pool, one input or one shard's inputs on Ray.
The executors own how a unit is sent and what its results are; the decision is made here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Unit", "after_failure", "on_probation", "to_send"]


@dataclass(eq=False)
class Unit:
    """Rows sent together. `handle`: the executor's (a future, an object reference) while the unit
    is out, None while it waits to be sent; `results` once known."""

    rows: list[Any]
    probe: bool = False  # on probation: sent with nothing else out
    results: list[Any] | None = None
    handle: Any = None


U = TypeVar("U", bound=Unit)


def after_failure(queue: deque[U], failed: list[U], *, death: bool, alone: bool = False) -> tuple[deque[U], U | None]:
    """Apply the rule to `failed`, the units of `queue` that failed together.

    Args:
        death: a worker or actor died (every unit it held is a suspect), as opposed to one unit's
            own raise, timeout or unreturnable result.
        alone: the failed unit was the only one out (a death then has one suspect).

    Returns:
        (the queue, with the failed units' rows each a unit of its own in their place, None); or
        (the queue as it was, the one failed unit: the executor reports it failed).
    """
    if len(failed) == 1 and len(failed[0].rows) == 1 and (alone or not death):
        return queue, failed[0]
    split = {id(unit) for unit in failed}
    return deque(part for unit in queue for part in (
        [type(unit)([row], probe=death or unit.probe) for row in unit.rows] if id(unit) in split else [unit])), None


def on_probation(queue: Iterable[Unit]) -> bool:
    """Whether a unit on probation has not come back yet."""
    return any(unit.probe and unit.results is None for unit in queue)


def to_send(queue: Iterable[U], out: int) -> list[U]:
    """The waiting units to send now: all of them; or, while units are on probation, the first
    (in input order) once nothing is out (`out`: units sent and not back)."""
    units = list(queue)
    waiting = [unit for unit in units if unit.results is None and unit.handle is None]
    if not on_probation(units):
        return waiting
    return waiting[:1] if out == 0 else []
