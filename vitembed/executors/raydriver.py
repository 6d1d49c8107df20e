"""`vitembed encode --ray`: the run of `skeleton.run`, with Ray actors as its executor.

    sources ─ plan_jobs (on the driver, as locally, streaming) ─> Job | Skipped | Failed
            ─ rayexec.RayExecutor: windows of jobs (with --shard-size a shard) to actors.JobActor
              ─> outcomes; files written by the actors
            ─ on_result, on the driver (manifest, report)

- **Outputs.** An actor decodes, embeds and writes each of its inputs as a local decoder process
  does (the same `WorkerTask` and sink), so the files are the same bytes, each written under a
  temporary name and renamed: a killed actor leaves no torn file. With shards, a window is a whole
  shard, written by its actor once all its inputs are done. The driver plans the names (so that
  collisions are settled once, in input order), writes the manifest and run.json, and after the
  run removes the temporaries of actors that were killed (`writes.leave_temporaries`).
- **Faults.** See `rayexec`: an actor that dies is restarted and its tasks tried again; an input
  that kills its actor even alone is reported failed, alone. A write that fails (a full disk)
  stops the run.
- **Stop.** When `stop` is set (Ctrl-C), the run ends after the outcomes in hand; the actors are
  killed before Ray is shut down, and every output on disk is whole. `--skip-existing` then finishes
  the job: outputs whose outcome never reached the manifest are whole files of this configuration.
- **What the user sees.** Ray's log lines
  go to stderr, never to stdout, which carries only `--json` lines.
- **Where.** With `RayOptions.address` (or $RAY_ADDRESS) the run joins that cluster; otherwise it
  starts a local one and stops it after, and on Linux a small reaper process (`_Reaper`) ends
  that cluster's agents should the driver die without stopping it (`kill -9`). In a program that has called `ray.init`, it uses that.
  Every node must see the inputs and outputs at the same paths (shared storage); the driver sends
  the actors absolute paths, made from its own current folder (`rayexec.absolute`), so that
  relative paths mean the same everywhere. Inputs and -o
  given as URIs (s3://, gs://, hdfs://, file://) are listed by the driver and read and written by
  the actors through pyarrow's filesystems (`uris`); the driver writes -o URI's run.json and
  manifest (`folder.UriFolder`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable

from ..pipeline import skeleton
from ..encoder import Encoder
from ..errors import ConfigError
from ..pipeline.outcomes import Outcome, Summary
from ..pipeline.plan import OutputPlan
from ..pipeline.request import actor_engine
from ..pipeline.runoptions import EncodeOptions, RayOptions
from .rayexec import RayExecutor
from ..pipeline.sinks import Sink

__all__ = ["actor_arguments", "check", "execute", "refuse", "require_ray", "run"]


def require_ray() -> None:
    """Raises ConfigError, with what to install, where Ray (with Ray Data) cannot be imported."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'vitembed[ray]' (or pip install 'ray[data]')") from None


def check(encoder: Encoder, plan: OutputPlan, options: EncodeOptions) -> None:
    """The local rules (`skeleton.check`), and what a cluster cannot do that only the output plan
    or the encoder shows (the options' own are the request's, `request._check_ray`)."""
    skeleton.check(encoder, plan, options)
    refuse(plan)
    if encoder.token_shape is None:
        raise ConfigError("--ray: --resize native has not run on Ray yet (each image has its own "
                          "grid); give a fixed --image-size, or drop --ray")


def refuse(plan: OutputPlan) -> None:
    """Raises ConfigError for an output that a cluster cannot write: -o FILE (a folder named
    like one is a folder); before the layer is loaded."""
    if plan.mode == "file":
        raise ConfigError("--ray: -o FILE is one input's file; give -o DIR, or drop --ray")


def run(sources: Iterable, encoder: Encoder, plan: OutputPlan, options: EncodeOptions, **arguments) -> Summary:
    """Encode every source on a Ray cluster: `check`, then `execute`."""
    check(encoder, plan, options)
    return execute(sources, encoder, plan, options, **arguments)


def execute(sources: Iterable, encoder: Encoder, plan: OutputPlan, options: EncodeOptions, *,
            on_result: Callable[[Outcome], None] | None = None, stop: threading.Event | None = None,
            stdout=None, made_from: dict | None = None) -> Summary:
    """`skeleton.execute` with a `rayexec.RayExecutor` (same arguments and outcomes; `options.ray`
    says where and with how much), once `check` has passed."""
    executors: list[RayExecutor] = []

    def executor(encoder: Encoder, plan: OutputPlan, options: EncodeOptions, stdout, stop) -> tuple:
        ray_executor = RayExecutor(actor_arguments(encoder, plan, options), options.ray,
                                   1 if options.shard_size else options.batch_size, bool(options.shard_size), stop)
        executors.append(ray_executor)
        return ray_executor, Sink()  # an actor's outcomes are final: the driver's sink passes them on

    with _quiet(), _connected(options.ray):
        summary = skeleton.execute(sources, encoder, plan, options, on_result=on_result, stop=stop,
                                   made_from=made_from, executor=executor)
    summary.device = executors[0].describe() if executors else "Ray"
    return summary


def actor_arguments(encoder: Encoder, plan: OutputPlan, options: EncodeOptions) -> dict:
    """`JobActor`'s arguments: the driver's layer, preprocessing and token choice, so that every
    actor computes the tokens run.json records, and the plan with no names claimed."""
    engine, device = actor_engine(options.ray.engine, options.ray.gpus)
    target = plan.target if plan.store is not None or plan.target is None else plan.target.absolute()
    return dict(params=encoder.params, prep=encoder.prep, dtype=encoder.dtype, engine=engine, device=device,
                tokens=encoder.tokens, pos_resample=encoder.pos_resample,
                plan=OutputPlan(plan.mode, plan.fmt, target, plan.store, record=plan.record), options=options,
                cwd=os.getcwd())


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


# Run by the reaper (a bare Python: no site, no vitembed). At once, then twice a second, it notes the processes
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
    procs = {pid: stat(pid) for pid in os.listdir("/proc") if pid.isdigit()}
    roots = {pid for pid, (name, ppid, _) in procs.items() if ppid == driver and name in ("raylet", "gcs_server")}
    while roots:
        seen.update((pid, procs[pid][2]) for pid in roots)
        roots = {pid for pid, (_, ppid, _) in procs.items() if ppid in roots and pid not in seen}
    if select.select([0], [], [], 0.5)[0]:
        chunk = os.read(0, 64)
        if not chunk:
            break
        said += chunk
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


@contextlib.contextmanager
def _quiet():
    """While the run goes: what Ray prints to stdout (the raylet's messages about dead workers and
    tasks retried) sent to stderr, so that stdout carries only data."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
