"""What runs inside a Ray actor: one `Encoder`, built once per actor, called on batches of rows.

Two classes stand on `EncoderActor` (which sets the actor's
process up as a local decoder process is, and builds the Encoder from the layer's parameters, so
that a random layer is the driver's to the bit):

- `JobActor` (here), for `vitembed encode --ray` (`rayexec`): windows of planned jobs -> each
  input's outcome. It runs the local run's own stages (`skeleton.stages`: the decoder's task, then
  the sink), so an actor decodes, embeds and writes each file as a local decoder process does, and
  the files are the same bytes.
- `vitembed.ray.TokenEncoder`, for pipelines of one's own: rows of image bytes -> rows of tokens.

Nothing here imports Ray at the top: these are plain classes, which Ray ships to its workers.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from ..errors import OutputError
from ..files.reads import files_kept_open
from ..pipeline.outcomes import Failed, Job, OutputFailed, job_of
from .poolworker import call

__all__ = ["EncoderActor", "JobActor", "node_id"]


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray: asking Ray's runtime context there would
    start a local cluster)."""
    try:
        import ray

        if not ray.is_initialized():
            return ""
        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - only a label for the report
        return ""


class EncoderActor:
    """An actor's Encoder, from the layer's parameters (`Encoder.params`) and preprocessing.

    Args:
        params: `LayerParams` (the driver's `Encoder.params`), or any layer an Encoder takes.
        prep: the driver's `Encoder.prep`.
        dtype, engine, device, tokens, pos_resample: as `Encoder`'s (see `request.actor_engine`); the
            driver's, so that the actor computes the tokens the run records.
    """

    def __init__(self, params: Any, prep: Any = None, *, dtype: str = "float32", engine: str = "auto",
                 device: str = "cpu", tokens: str = "z0", pos_resample: str = "timm"):
        from ..encoder import Encoder
        from .decoder import tune_process

        self.encoder = Encoder(params, prep, engine=engine, device=device, dtype=dtype, tokens=tokens,
                               pos_resample=pos_resample)
        tune_process(self.encoder.prep.max_pixels, self.encoder.engine == "numpy")
        self.node = node_id()


class JobActor(EncoderActor):
    """`vitembed encode --ray`'s actor (`rayexec.RayExecutor`): windows of planned items -> their outcomes.

    A window is a list of rows; a row is an input's `Job`, or with shards every item of one shard
    (a `Failed` for those known bad: their row stays empty). `run` gives back each input's
    outcome: a `Written` or a `Failed`, or an `OutputFailed` when an output could not be written
    (it stops the run). Files are written here, by the local run's own stages (`skeleton.stages`
    and `skeleton.outcomes`), so they are a local run's bytes; this process never removes other
    processes' temporary files (`writes.leave_temporaries`).

    The actor is set up by its first window (`run`), from `arguments`: the layer's parameters are
    put in the object store once for all actors and go to each by reference, and an actor that Ray
    restarts sets itself up again the same way. (Constructor arguments that large would sit in the
    object store too, and Ray warns on every run that a restart then depends on them.)
    """

    def __init__(self) -> None:
        self.encoder = None

    def _start(self, params: Any, prep: Any, *, plan: Any, options: Any, cwd: str, **encoder) -> None:
        """plan: the driver's `OutputPlan` with no names claimed; options: the run's `EncodeOptions`;
        cwd: the driver's folder, from which the driver made every path it sends absolute (every
        node must see it); this process's own folder is never changed."""
        from ..files.writes import leave_temporaries
        from ..pipeline.skeleton import stages

        super().__init__(params, prep, **encoder)
        leave_temporaries()
        self.broken = None
        try:
            os.stat(cwd)  # the paths this actor is sent are absolute, from here (`rayexec.absolute`)
        except OSError as exc:
            self.broken = (f"the Ray node {self.node[:8]} cannot see the folder the run started in, {cwd} "
                           f"({exc.strerror}): every node must see the inputs and outputs at the same paths")
        self.options = dataclasses.replace(options, workers=0, ray=None)
        self.task, self.sink = stages(self.encoder, plan, self.options, None)

    def where(self) -> tuple[str, int]:
        """(this actor's node, its process id): the driver waits for a killed actor's process."""
        return node_id(), os.getpid()

    def run(self, arguments: list, rows: list[list]) -> tuple[str, list]:
        """(this actor's node, the outcome of every input of the window's rows).

        Args:
            arguments: a list of one ObjectRef of `_start`'s keyword arguments
                (`raydriver.actor_arguments`); in a list, Ray passes the reference as it is.
        """
        if self.encoder is None:
            import ray

            self._start(**ray.get(arguments[0]))
        items = [item for row in rows for item in row]
        with files_kept_open():  # a shard's members in the window, read with one open
            return self.node, list(self._outcomes(items))

    def _outcomes(self, items: list):
        from ..pipeline.skeleton import outcomes

        if self.broken is not None:
            yield from (Failed(item.source, self.broken, job_of(item)) for item in items)
            return
        results = ((item, call(self.task, item) if isinstance(item, Job) else None) for item in items)
        try:
            yield from outcomes(results, self.encoder, self.sink, self.options.batch_size, threading.Event())
        except OutputError as exc:
            yield OutputFailed(str(exc))
            yield from self.sink.salvage()
