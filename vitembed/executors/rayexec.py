"""Ray as an executor of `skeleton.run`: windows of jobs sent to `actors.JobActor`s, outcomes back in order.

    planned items ─> windows (a batch of inputs' jobs; with --shard-size one shard's items)
                  ─> JobActor.run, a few windows queued per actor ─> (job, outcome) in input order

- **Bounded.** Items are read from the plan only while fewer than `IN_FLIGHT` windows per actor
  are out, so the driver holds a few windows whatever the number of inputs; each actor has the
  next window queued when one ends. Items that need no task (skipped, known bad) come back at
  once, without waiting for the windows before them.
- **Actors.** Started when the first windows go, up to `RayOptions.actors` (else as many as the
  cluster's CPUs, or GPUs, hold), each window to the actor with the fewest queued. The layer's
  parameters are put once, and reach each actor by reference (`JobActor`). `close()` kills them.
- **Faults.** A bad image is its input's `Failed` outcome, never a failed task. An actor that dies
  (killed, out of memory) is restarted by Ray and its tasks tried again, `RETRIES` times; the rows
  of a window that died every time are then sent again one to a window, one window at a time with
  nothing else out, so that a death has one suspect, and a row that kills its actor even alone is
  reported failed (`DIED`): the run's rule (`pipeline.retry`, as in `pool.OrderedPool`), after Ray's restarts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import defaultdict
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .actors import JobActor, node_id
from ..files.writes import process_alive
from ..pipeline.outcomes import Failed, Job, Written, job_of
from ..pipeline.retry import Unit, after_failure, on_probation, to_send
from .poolworker import TaskFailed, failure

__all__ = ["DIED", "IN_FLIGHT", "RETRIES", "RayExecutor"]

RETRIES = 1  # tries of a task again after its actor died, before its rows go one to a window
IN_FLIGHT = 3  # windows queued per actor: the next is there when one ends
DIED = ("its Ray actor died each time it was given this input, {} times (killed, out of memory, or a "
        "crash in a decoder)").format(2 * (RETRIES + 1))
_POLL = 0.1  # seconds between looks at the stop event
_KILL_WAIT = 10.0  # seconds, at most, for killed actors to be gone
_READY = 1024  # items that need no task, held at most before they are given back


@dataclass(eq=False)
class _Window(Unit):
    """Rows sent together: `handle`, its task's reference while it runs; `results` once back."""

    actor: int = -1


@dataclass
class _Plan:
    """The planned items not yet in a window: the rows read so far, and the items that need no task."""

    items: Iterator[Any] = iter(())
    rows: list[list] = field(default_factory=list)
    ready: deque = field(default_factory=deque)
    ended: bool = False


class RayExecutor:
    """Runs windows of jobs on Ray actors (see the module docstring); an `skeleton.Executor`.

    Args:
        actor_arguments: `JobActor`'s (`raydriver.actor_arguments`).
        ray_options: the run's `RayOptions` (resources and number of actors).
        rows_per_window: inputs per window (the batch size); with shards, 1 (a row is a shard).
        shards: whether a row is a shard (the consecutive items with one output) or an input.
        stop: when set, iteration returns within `_POLL` seconds.
        actor_class: the actors' class (`JobActor`; one with its `run`, in tests).
    """

    def __init__(self, actor_arguments: dict, ray_options: Any, rows_per_window: int, shards: bool, stop, *,
                 actor_class: type = JobActor) -> None:
        import ray

        self.cwd = os.getcwd()  # where the driver's relative paths start (`absolute`)
        self.local_outputs = getattr(actor_arguments.get("plan"), "store", None) is None  # else a store's paths
        self.ray, self.stop = ray, stop
        self.rows_per_window, self.shards = rows_per_window, shards
        self.resources = dict(num_cpus=ray_options.cpus, num_gpus=ray_options.gpus or None)
        cluster = ray.cluster_resources()
        held = cluster.get("GPU", 0) / ray_options.gpus if ray_options.gpus else cluster.get("CPU", 0) / ray_options.cpus
        self.count = ray_options.actors or max(1, math.floor(held))
        self.device = "cuda" if ray_options.gpus else "cpu"
        self._arguments, self.actor_class = actor_arguments, actor_class
        self._reference: list | None = None
        self.actors: list = []
        self._pids: list = []  # per actor, a reference to (its node, its process id)
        self.queued: list[int] = []  # windows out, per actor
        self.nodes: set[str] = set()
        self.folders: dict = {}  # one job per output folder: where killed actors may leave temporaries
        self._windows: deque[_Window] = deque()
        self._plan = _Plan()

    def start(self, items: Iterable, is_task: Callable[[Any], bool] | None = None) -> None:
        """Take the planned items, lazily. A job goes to an actor, and with shards so does a known
        bad input's `Failed` (its shard's row stays empty); what else needs no task comes back as is."""
        self._plan = _Plan(iter(items))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """(item, its outcome) for every item; an item that needed no task as (item, None)."""
        while not self.stop.is_set():
            self._fill()
            while self._plan.ready:
                yield self._plan.ready.popleft(), None
            if not self._windows:
                if self._plan.ended:
                    return
                continue
            head = self._windows[0]
            if head.results is None:
                self._settle()
                continue
            self._windows.popleft()
            yield from head.results

    def close(self) -> list:
        """Kill the actors, and wait (a few seconds at most) until Ray has them for dead: the
        temporary file of one killed mid-write is removed only once its process is gone. Returns a
        job of every output folder written into (where such files may be)."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        if self.actors:  # a call to a killed actor fails once it is dead
            self.ray.wait([actor.__ray_ready__.options(max_task_retries=0).remote() for actor in self.actors], num_returns=len(self.actors),
                          timeout=_KILL_WAIT)
        self.actors, self.queued = [], []
        self._wait_for_processes()
        return list(self.folders.values())

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """After a stop: nothing more comes back. The windows still out are abandoned (`close` kills
        their actors); whole files they wrote stay for a resume, which skips them."""
        return iter(())

    def describe(self) -> str:
        """Where the run went, for the report: "Ray: 2 nodes, 4 actors, cpu"."""
        nodes, actors = len(self.nodes), self.count
        return f"Ray: {nodes} node{'s' * (nodes != 1)}, {actors} actor{'s' * (actors != 1)}, {self.device}"

    # --- sending -----------------------------------------------------------------------------

    def _fill(self) -> None:
        """Send windows while there is room; while rows are on probation, one alone at a time."""
        out = sum(self.queued)
        if on_probation(self._windows):  # the run's rule (`retry.to_send`): one window alone at a time
            for window in to_send(self._windows, out):
                self._send(window)
            return
        while out < IN_FLIGHT * self.count and len(self._windows) < 2 * IN_FLIGHT * self.count:
            rows = self._read()
            if not rows:
                return
            window = _Window(rows)
            self._windows.append(window)
            self._send(window)
            out += 1

    def _read(self) -> list[list]:
        """The next window's rows from the plan ([] at its end, or while too many items wait to go back)."""
        plan = self._plan
        while not plan.ended and len(plan.ready) < _READY:
            if len(plan.rows) > self.rows_per_window:
                break
            item = next(plan.items, None)
            if item is None:
                plan.ended = True
                break
            job = job_of(item)
            if job is None or (not self.shards and not isinstance(item, Job)):
                plan.ready.append(item)
            elif self.shards and plan.rows and job_of(plan.rows[-1][0]).output == job.output:
                plan.rows[-1].append(item)  # the same shard
            else:
                plan.rows.append([item])
                self.folders.setdefault(job.output.parent, job)
        # with shards the last row may still grow: it goes once another has begun, or the plan ended
        take = len(plan.rows) if plan.ended else min(len(plan.rows) - self.shards, self.rows_per_window)
        rows, plan.rows = plan.rows[:take], plan.rows[take:]
        return rows

    def _send(self, window: _Window) -> None:
        if min(self.queued, default=1) > 0 and len(self.actors) < self.count:
            self._start_actor()
        actor = min(range(len(self.actors)), key=self.queued.__getitem__)
        rows = [[absolute(item, self.cwd, self.local_outputs) for item in row] for row in window.rows]
        window.actor, window.handle = actor, self.actors[actor].run.remote(self._reference, rows)
        self.queued[actor] += 1

    def _wait_for_processes(self) -> None:
        """Wait (`_KILL_WAIT` at most) until this node's killed actor processes have ended: Ray has
        an actor for dead a moment before its process is gone, and until then it may still write
        a temporary file that the clean-up after `close` would take for a live writer's."""
        ready, _ = self.ray.wait(self._pids, num_returns=len(self._pids), timeout=0) if self._pids else ([], [])
        here, pids = node_id(), []
        for ref in ready:
            try:
                node, pid = self.ray.get(ref)
            except Exception:  # noqa: BLE001 - an actor that died before it answered writes nothing more
                continue
            if node == here:
                pids.append(pid)
        deadline = time.monotonic() + _KILL_WAIT
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pids = []

    def _start_actor(self) -> None:
        if self._reference is None:  # put once, for every actor
            self._reference = [self.ray.put(self._arguments)]
        remote = self.ray.remote(self.actor_class).options(max_restarts=-1, max_task_retries=RETRIES, **self.resources)
        self.actors.append(remote.remote())
        if hasattr(self.actor_class, "where"):  # JobActor's; a test's stand-in writes no files
            self._pids.append(self.actors[-1].where.remote())  # before any window: the actor's first call
        self.queued.append(0)

    # --- receiving ---------------------------------------------------------------------------

    def _settle(self) -> None:
        """Wait a moment for windows to come back, and take what has."""
        out = {w.handle: w for w in self._windows if w.handle is not None and w.results is None}
        if not out:
            return
        done, _ = self.ray.wait(list(out), num_returns=1, timeout=_POLL)
        for ref in done:
            self._back(out[ref])

    def _back(self, window: _Window) -> None:
        """A window's results; or, when its task died, its rows again alone, or reported."""
        from ray.exceptions import RayActorError, RayTaskError

        self.queued[window.actor] -= 1
        try:
            node, outcomes = self.ray.get(window.handle)
        except RayActorError:
            self._died(window, DIED)
            return
        except RayTaskError as exc:
            self._died(window, failure(exc.cause if exc.cause is not None else exc))
            return
        self.nodes.add(node)
        outcomes = _as_planned(outcomes, [item for row in window.rows for item in row], self.cwd, self.local_outputs)
        window.results = [(job_of(outcome) or outcome, outcome) for outcome in outcomes]

    def _died(self, window: _Window, reason: str) -> None:
        """A window whose task failed every time: the run's rule (`retry.after_failure`) sends its
        rows again one to a window, on probation, or reports a row that failed alone, each of its
        items."""
        window.handle = None
        self._windows, blamed = after_failure(self._windows, [window], death=True, alone=window.probe)
        if blamed is not None:
            blamed.results = [(item, TaskFailed(reason) if isinstance(item, Job) else None)
                              for row in blamed.rows for item in row]


def absolute(item: Any, cwd: str, local_outputs: bool = True) -> Any:
    """A planned item (`Job`, or a known bad input's `Failed`) with its local paths made absolute
    from the driver's folder `cwd`, so that an actor, wherever it runs, reads and writes the
    driver's files. URIs and absolute paths stay as they are, and so do outputs in a store (-o
    URI: not `local_outputs`), whose paths are the store's."""
    job = job_of(item)
    if job is None:
        return item
    source = dataclasses.replace(job.source, path=_from(job.source.path, cwd))
    job = dataclasses.replace(job, source=source, output=_from(job.output, cwd) if local_outputs else job.output)
    return job if isinstance(item, Job) else dataclasses.replace(item, source=source, job=job)


def _from(path: Any, cwd: str) -> Any:
    """A local path made absolute from `cwd` (a `Path` stays one; a URI, an absolute path or None as is)."""
    if isinstance(path, os.PathLike) and not isinstance(path, str) and not os.path.isabs(path):
        return type(path)(cwd, path)
    return path


def _as_planned(outcomes: list, items: list, cwd: str, local_outputs: bool = True) -> list:
    """The actor's outcomes of `items` (sent as `absolute` made them) with the planned items'
    own paths again, as reports and the manifest show them."""
    planned: dict = defaultdict(list)  # (absolute input, absolute output) -> the planned jobs, in order
    for item in items:
        job = job_of(item)
        if job is not None:
            sent = absolute(job, cwd, local_outputs)
            planned[(sent.source.path, sent.output)].append(job)
    back = []
    for outcome in outcomes:
        if isinstance(outcome, Failed) and outcome.job is not None:
            jobs = planned.get((outcome.job.source.path, outcome.job.output))
            if jobs:
                own = jobs.pop(0)
                outcome = dataclasses.replace(outcome, source=own.source, job=own)
        elif isinstance(outcome, Written):
            jobs = planned.get((outcome.source.path, outcome.output))
            if jobs:
                own = jobs.pop(0)
                # the actor's source (with what its decoder found: `Source.strain`) at the planned path
                source = dataclasses.replace(outcome.source, path=own.source.path)
                outcome = dataclasses.replace(outcome, source=source, output=own.output)
        back.append(outcome)
    return back
