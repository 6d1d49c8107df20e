"""`vitembed encode --ray`: the run of `pipeline.run`, with Ray actors as its decoder processes.

    sources ─ plan_jobs (on the driver, as locally) ─> Job | Skipped | Failed
            ─ rows of jobs, a block per batch (a Ray dataset; with --shard-size a row is a shard)
            ─ map_batches(actors.JobActor, ActorPoolStrategy) ─> outcomes; files written by the actors
            ─ on_result, on the driver (manifest, report)

- **Outputs.** An actor decodes, embeds and writes each of its inputs as a local decoder process
  does (the same `WorkerTask` and sink), so the files are the same bytes, each written under a
  temporary name and renamed: a killed actor leaves no torn file. With shards, a row is a whole
  shard, written by its actor once all its inputs are done. The driver plans the names (so that
  collisions are settled once, in input order), writes the manifest and run.json, and after the
  run removes the temporaries of actors that were killed (`files.leave_temporaries`).
- **Faults.** A bad image is its input's `Failed` outcome, never a failed task. An actor that dies
  (killed, out of memory) is restarted by Ray and its task tried again, `RETRIES` times; the rows
  of a task that died every time are then run again one to a task, and an input that kills its
  actor even alone is reported failed, alone. A write that fails (a full disk) stops the run.
- **Stop.** When `stop` is set (Ctrl-C), the run ends after the batch of outcomes in hand; actors
  are stopped with the dataset, and every output on disk is whole. `--skip-existing` then finishes
  the job: outputs whose outcome never reached the manifest are whole files of this configuration.
- **What the user sees.** Ray's progress bars are off (the report's are the run's); its log lines
  go to stderr, never to stdout, which carries only `--json` lines.
- **Where.** With `RayOptions.address` (or $RAY_ADDRESS) the run joins that cluster; otherwise it
  starts a local one and stops it after, and on Linux a small reaper process (`_Reaper`) ends
  that cluster's agents should the driver die without stopping it (`kill -9`). In a program that has called `ray.init`, it uses that.
  Every node must see the inputs and outputs at the same paths (shared storage); actors work in
  the driver's current folder, so that relative paths mean the same everywhere. Inputs and -o
  given as URIs (s3://, gs://, hdfs://, file://) are listed by the driver and read and written by
  the actors through pyarrow's filesystems (`uris`); the driver writes -o URI's run.json and
  manifest (`folder.UriFolder`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable

from .actors import JobActor, actor_engine
from .encoder import Encoder
from .errors import ConfigError, OutputError
from .files import clean_stale_temporaries
from .outcomes import Failed, Job, Outcome, OutputFailed, Summary
from .outputs import OutputPlan, Resume, plan_jobs
from .pipeline import DECODE_TIMEOUT, EncodeOptions, RayOptions
from .pipeline import check as check_local

__all__ = ["RETRIES", "actor_arguments", "check", "refuse", "require_ray", "run"]

RETRIES = 1  # tries of a task again after its actor died, before its rows go one to a task
DIED = ("its Ray actor died each time it was given this input, {} times (killed, out of memory, or a "
        "crash in a decoder)")


def require_ray() -> None:
    """Raises ConfigError, with what to install, where Ray (with Ray Data) cannot be imported."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'vitembed[ray]' (or pip install 'ray[data]')") from None


def check(encoder: Encoder, plan: OutputPlan, options: EncodeOptions) -> None:
    """The local rules, and what a cluster cannot do (each refused with the reason)."""
    check_local(encoder, plan, options)
    refuse(plan, options)
    if encoder.token_shape is None:
        raise ConfigError("--ray: --resize native has not run on Ray yet (each image has its own "
                          "grid); give a fixed --image-size, or drop --ray")
    actor_engine(options.ray.engine, options.ray.gpus)


def refuse(plan: OutputPlan, options: EncodeOptions) -> None:
    """Raises ConfigError, with the reason, for an option a cluster cannot follow."""
    reasons = [
        (plan.mode == "stdout", "-o - writes one tensor to this process's stdout; give -o DIR"),
        (plan.mode == "file", "-o FILE is one input's file; give -o DIR, or drop --ray"),
        (options.workers is not None, "--workers sets this machine's decoder processes; on Ray use "
                                      "--ray-cpus and --ray-actors"),
        (options.decode_timeout != DECODE_TIMEOUT, "--decode-timeout is not enforced on Ray (an actor's "
                                                    "decode cannot be stopped alone); drop it"),
        (options.decode == "gpu", "--decode gpu has not run on Ray yet; drop it (--ray-gpus runs the "
                                  "layer on the GPUs, JPEGs are decoded by Pillow)"),
    ]
    for refused, reason in reasons:
        if refused:
            raise ConfigError(f"--ray: {reason}")


def run(sources: Iterable, encoder: Encoder, plan: OutputPlan, options: EncodeOptions, *,
        on_result: Callable[[Outcome], None] | None = None, stop: threading.Event | None = None,
        stdout=None, made_from: dict | None = None) -> Summary:
    """Encode every source on a Ray cluster, as `pipeline.run` does here (same arguments and
    outcomes; `options.ray` says where and with how much)."""
    stop, on_result = stop or threading.Event(), on_result or (lambda outcome: None)
    check(encoder, plan, options)
    summary = Summary(device="Ray")

    def report(outcome: Outcome) -> None:
        summary.count(outcome)
        on_result(outcome)

    resume = Resume(options.skip_existing, options.overwrite, encoder.token_shape, encoder.dtype, made_from)
    rows = _Rows(options.shard_size, options.batch_size)
    start = time.perf_counter()
    try:
        for item in plan_jobs(sources, plan, resume, options.shard_size):
            rows.add(item) if _job(item) is not None else report(item)
        with _quiet(), _connected(options.ray):
            runs = _Runs(encoder, plan, options, rows, report, stop)
            runs.all()
            summary.device = runs.describe()
    except OutputError as exc:
        summary.stopped = str(exc)
    finally:
        for folder in rows.folders:  # the temporaries of actors killed while they wrote
            plan.store.clean(folder) if plan.store is not None else clean_stale_temporaries(folder)
        summary.elapsed = time.perf_counter() - start
    if stop.is_set() and not summary.stopped:
        summary.stopped = "interrupted"
    return summary


def _job(item) -> Job | None:
    """The job of a planned item that goes to the actors: a Job, or with shards a known failure
    in a shard (its row stays empty); None for what is final already."""
    return item if isinstance(item, Job) else getattr(item, "job", None)


class _Rows:
    """Planned jobs as Arrow tables of rows, a table a block: a row an input (a batch a block),
    or with shards a row a shard (its inputs' jobs together). Also the folders written into."""

    def __init__(self, shard_size: int | None, batch_size: int):
        self.shard_size, self.per_table = shard_size, 1 if shard_size else batch_size
        self.tables: list = []
        self.keys: list[int] = []
        self.jobs: list[list] = []
        self.folders: set = set()

    def add(self, item) -> None:
        job = _job(item)
        key = job.index // self.shard_size if self.shard_size else job.index
        if self.keys and self.keys[-1] == key:
            self.jobs[-1].append(item)
            return
        if len(self.keys) == self.per_table:
            self.flush()
        self.keys.append(key)
        self.jobs.append([item])
        self.folders.add(job.output.parent)

    def flush(self) -> None:
        import pyarrow as pa

        if self.keys:
            self.tables.append(pa.table({"key": pa.array(self.keys, pa.int64()),
                                         "job": pa.array([pickle.dumps(j) for j in self.jobs], pa.binary())}))
        self.keys, self.jobs = [], []


def actor_arguments(encoder: Encoder, plan: OutputPlan, options: EncodeOptions) -> dict:
    """`JobActor`'s constructor arguments: the driver's layer, preprocessing and token choice, so
    that every actor computes the tokens run.json records, and the plan with no names claimed."""
    engine, device = actor_engine(options.ray.engine, options.ray.gpus)
    return dict(params=encoder.params, prep=encoder.prep, dtype=encoder.dtype, engine=engine, device=device,
                tokens=encoder.tokens, pos_resample=encoder.pos_resample,
                plan=OutputPlan(plan.mode, plan.fmt, plan.target, plan.store), options=options, cwd=os.getcwd())


class _Runs:
    """The actors' runs over the rows: all of them, then the rows of tasks that died, one to a task."""

    def __init__(self, encoder: Encoder, plan: OutputPlan, options: EncodeOptions, rows: _Rows,
                 report: Callable[[Outcome], None], stop: threading.Event):
        import ray

        rows.flush()
        ray_options: RayOptions = options.ray
        engine, device = actor_engine(ray_options.engine, ray_options.gpus)
        self.options, self.ray_options, self.report, self.stop = options, ray_options, report, stop
        self.tables = rows.tables
        self.actor_args = actor_arguments(encoder, plan, options)
        resources = ray.cluster_resources()
        held = resources.get("GPU", 0) / ray_options.gpus if ray_options.gpus else \
            resources.get("CPU", 0) / ray_options.cpus
        self.actors = ray_options.actors or max(1, math.floor(held))
        self.nodes: set[str] = set()
        self.device = device

    def all(self) -> None:
        """Run every row, reporting each input's outcome."""
        pending = {key for table in self.tables for key in table.column("key").to_pylist()}
        if pending:  # else every input was skipped, or known bad
            self._collect(self._dataset(self.tables, self.options.batch_size), pending)
        if pending and not self.stop.is_set():  # tasks that killed their actor each time: one row a task
            alone = [table.slice(i, 1) for table in self.tables
                     for i, key in enumerate(table.column("key").to_pylist()) if key in pending]
            self._collect(self._dataset(alone, 1), pending)
        if not self.stop.is_set():
            self._failed(pending)

    def describe(self) -> str:
        """Where the run went, for the report: "Ray: 2 nodes, 4 actors, cpu"."""
        nodes, actors = len(self.nodes), self.actors
        return f"Ray: {nodes} node{'s' * (nodes != 1)}, {actors} actor{'s' * (actors != 1)}, {self.device}"

    def _dataset(self, tables: list, batch_size: int):
        """The actors' run over `tables`: Ray Data's way, a callable class on an actor pool."""
        import ray

        size = min(self.actors, len(tables))
        least = size if self.ray_options.actors else 1  # --ray-actors: a pool of that size
        with warnings.catch_warnings():
            # Ray 2.60 deprecates remote arguments such as max_task_retries in map_batches and has
            # no other way to bound the retries yet: by default a task that kills its actor is
            # retried forever.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_arrow(tables).map_batches(
                JobActor, fn_constructor_kwargs=self.actor_args,
                batch_size=1 if self.options.shard_size else batch_size, batch_format="pyarrow",
                # One row a task (the rows of tasks that died): one task at a time in an actor, so that
                # an input that kills its actor costs no other input a try.
                compute=ray.data.ActorPoolStrategy(min_size=least, max_size=size, initial_size=size,
                                                   max_tasks_in_flight_per_actor=1 if batch_size == 1 else None),
                num_cpus=self.ray_options.cpus, num_gpus=self.ray_options.gpus or None,
                max_restarts=-1, max_task_retries=RETRIES)
        context = ds.context
        context.max_errored_blocks = -1  # a task whose actor died every time: its rows are retried alone
        context.enable_progress_bars = False  # the report's progress, not Ray's (not both at once)
        context.print_on_execution_start = False
        return ds

    def _collect(self, ds, pending: set[int]) -> None:
        """Report each outcome as it arrives, until the end or `stop`."""
        if not pending:
            return
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            columns = (table.column(name).to_pylist() for name in ("key", "outcome", "node"))
            for key, blob, node in zip(*columns):
                outcome = pickle.loads(blob)
                if isinstance(outcome, OutputFailed):
                    raise OutputError(outcome.reason)
                pending.discard(key)
                self.nodes.add(node)
                self.report(outcome)
            if self.stop.is_set():
                return

    def _failed(self, pending: set[int]) -> None:
        """The inputs of rows that killed their actor every time, even alone."""
        for table in self.tables:
            for key, blob in zip(table.column("key").to_pylist(), table.column("job").to_pylist()):
                if key in pending:
                    for item in pickle.loads(blob):
                        job = _job(item)
                        self.report(item if isinstance(item, Failed) else
                                    Failed(item.source, DIED.format(2 * (RETRIES + 1)), job))


@contextlib.contextmanager
def _connected(options: RayOptions):
    """Ray, connected: the program's (it called ray.init), a cluster to join, or a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    local = {} if address else {"include_dashboard": False}
    # ray.init gives a driver Ray's own SIGTERM handler (sys.exit mid-run); the process's own
    # (the CLI's: stop cleanly, exit 143, whole files only) is put back.
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, **local)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--ray: cannot join the Ray cluster at {address}: {exc}") from None
    if on_term is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    reaper = _Reaper.start() if not address else None
    try:
        yield
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.done()


# Run by the reaper (a bare Python: no site, no vitembed). Once a second it notes the processes
# under the driver's raylet and gcs_server, each with its start time (so that a reused PID is never
# taken for one of them); when the driver closes the pipe unsaid (it died), it SIGKILLs those left.
_REAPER_CODE = """
import os, select
driver = str(os.getppid())

def stat(pid):
    try:
        with open("/proc/" + pid + "/stat") as f:
            name, rest = f.read().rsplit(")", 1)
        fields = rest.split()
        return name.split("(", 1)[1], fields[1], fields[19]
    except (OSError, IndexError):
        return None, None, None

seen, said = {}, b""
while True:
    if select.select([0], [], [], 1.0)[0]:
        chunk = os.read(0, 64)
        if not chunk:
            break
        said += chunk
        continue
    procs = {pid: stat(pid) for pid in os.listdir("/proc") if pid.isdigit()}
    roots = {pid for pid, (name, ppid, _) in procs.items() if ppid == driver and name in ("raylet", "gcs_server")}
    while roots:
        seen.update((pid, procs[pid][2]) for pid in roots)
        roots = {pid for pid, (_, ppid, _) in procs.items() if ppid in roots and pid not in seen}
if said != b"done":
    for pid, started in seen.items():
        if stat(pid)[2] == started:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
"""


class _Reaper:
    """Ends the processes of the local cluster a driver started, when the driver dies unstopped.

    The driver's gcs_server and raylet die with it (Ray ties them to its life), but the raylet's
    agents (DashboardAgent, RuntimeEnvAgent: about 170 MB) then spend a minute reporting the
    death to the GCS that is gone. The reaper, a bare Python in a session of its own, holds the
    read end of a pipe and keeps a list of the processes under the raylet and the gcs_server: a
    stopped run writes "done" (nothing to do); a driver killed with `kill -9` closes the pipe
    unsaid, and the reaper kills those processes at once.
    """

    def __init__(self, process) -> None:
        self.process = process

    @classmethod
    def start(cls) -> _Reaper | None:
        if not sys.platform.startswith("linux"):  # /proc: the processes under the raylet
            return None
        import subprocess

        try:
            process = subprocess.Popen([sys.executable, "-S", "-c", _REAPER_CODE], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return None  # no reaper: the agents would only outlive a killed driver for a minute
        return cls(process)

    def done(self) -> None:
        """The cluster was stopped: the reaper leaves without killing anything."""
        try:
            self.process.communicate(b"done", timeout=10)
        except Exception:  # noqa: BLE001 - the reaper is a courtesy; never fail a finished run for it
            self.process.kill()


class _Nothing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False  # Ray Data's log file keeps it; what stops the run reaches the driver as an exception


@contextlib.contextmanager
def _quiet():
    """While the run goes: Ray Data's log lines kept off the console (its log file keeps them:
    progress, tasks retried), and what Ray prints to stdout (the raylet's messages about dead workers) sent to
    stderr, so that stdout carries only data."""
    consoles = [h for h in logging.getLogger("ray.data").handlers if hasattr(h, "stream")]
    quiet = _Nothing()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)
