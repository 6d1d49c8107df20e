"""What runs inside a Ray actor: one `Encoder`, built once per actor, called on batches of rows.

Ray Data runs a model over a dataset with a callable class that `map_batches` constructs once per
actor and calls once per batch. Two such classes stand on `EncoderActor` (which sets the actor's
process up as a local decoder process is, and builds the Encoder from the layer's parameters, so
that a random layer is the driver's to the bit):

- `JobActor` (here), for `vitembed encode --ray` (`raydriver`): rows of planned jobs -> each
  input's outcome. It runs the local run's own stages (`pipeline.stages`: the decoder's task, then
  the sink), so an actor decodes, embeds and writes each file as a local decoder process does, and
  the files are the same bytes.
- `vitembed.ray.TokenEncoder`, for pipelines of one's own: rows of image bytes -> rows of tokens.

Nothing here imports Ray at the top: these are plain classes, which Ray ships to its workers.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
from typing import Any

from .errors import ConfigError, OutputError, one_line
from .outcomes import Failed, Job, OutputFailed
from .pool import TaskFailed

__all__ = ["EncoderActor", "JobActor", "actor_engine", "node_id"]


def actor_engine(engine: str, gpus: float) -> tuple[str, str]:
    """(engine, device) of an actor: torch on CUDA where it holds a GPU (or a share of one), else
    `engine` (auto, numpy or torch) on its CPU."""
    if gpus <= 0:
        return engine, "cpu"
    if engine == "numpy":
        raise ConfigError("--engine numpy runs on the CPU, not on the GPUs of --ray-gpus; drop one of them")
    return "torch", "cuda"


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - only a label for the report
        return ""


class EncoderActor:
    """An actor's Encoder, from the layer's parameters (`Encoder.params`) and preprocessing.

    Args:
        params: `LayerParams` (the driver's `Encoder.params`), or any layer an Encoder takes.
        prep: the driver's `Encoder.prep`.
        dtype, engine, device, tokens, pos_resample: as `Encoder`'s (see `actor_engine`); the
            driver's, so that the actor computes the tokens the run records.
    """

    def __init__(self, params: Any, prep: Any = None, *, dtype: str = "float32", engine: str = "auto",
                 device: str = "cpu", tokens: str = "z0", pos_resample: str = "timm"):
        from .encoder import Encoder
        from .workers import tune_process

        self.encoder = Encoder(params, prep, engine=engine, device=device, dtype=dtype, tokens=tokens,
                               pos_resample=pos_resample)
        tune_process(self.encoder.prep.max_pixels, self.encoder.engine == "numpy")
        self.node = node_id()


class JobActor(EncoderActor):
    """`vitembed encode --ray`'s actor: a batch of rows of jobs -> a table of their outcomes.

    A row is `key` (an input's index; with shards, the shard's number) and `job` (a pickled list:
    the row's `Job`, or with shards every input of the shard, a `Failed` for those known bad). The
    result has a row per outcome: `key`, `outcome` (a pickled `Written` or `Failed`; an
    `OutputFailed` with key -1 when an output could not be written, which stops the run) and
    `node`. Files are written here, by the local run's sink; this process never removes other
    processes' temporary files (`files.leave_temporaries`).

    Args:
        plan: the driver's `OutputPlan` (mode, format, folder), with no names claimed.
        options: the run's `EncodeOptions`.
        cwd: the driver's folder, where relative paths start (every node must see it).
    """

    def __init__(self, params: Any, prep: Any, *, plan: Any, options: Any, cwd: str, **encoder):
        from .files import leave_temporaries
        from .pipeline import stages

        super().__init__(params, prep, **encoder)
        leave_temporaries()
        self.broken = None
        try:
            os.chdir(cwd)
        except OSError as exc:
            self.broken = (f"the Ray node {self.node[:8]} cannot see the folder the run started in, {cwd} "
                           f"({exc.strerror}): every node must see the inputs and outputs at the same paths")
        self.options = dataclasses.replace(options, workers=0, ray=None)
        self.task, self.sink = stages(self.encoder, plan, self.options, None)

    def __call__(self, batch):
        import pyarrow as pa

        key_of, items = {}, []
        for key, blob in zip(batch.column("key").to_pylist(), batch.column("job").to_pylist()):
            for item in pickle.loads(blob):
                key_of[_job(item).output] = key
                items.append(item)
        keys, outcomes = [], []
        for outcome in self._outcomes(items):
            job = _job(outcome)
            keys.append(key_of.get(job.output if job is not None else getattr(outcome, "output", None), -1))
            outcomes.append(pickle.dumps(outcome))
        return pa.table({"key": pa.array(keys, pa.int64()), "outcome": pa.array(outcomes, pa.binary()),
                         "node": pa.array([self.node] * len(keys), pa.string())})

    def _outcomes(self, items: list):
        from .pipeline import outcomes

        if self.broken is not None:
            yield from (Failed(item.source, self.broken, _job(item)) for item in items)
            return
        results = ((item, self._task(item)) for item in items)
        try:
            yield from outcomes(results, self.encoder, self.sink, self.options.batch_size, threading.Event())
        except OutputError as exc:
            yield OutputFailed(str(exc))
            yield from self.sink.salvage()

    def _task(self, item):
        if not isinstance(item, Job):
            return None  # a Failed, for the sink (a shard's empty row)
        try:
            return self.task(item)
        except Exception as exc:  # noqa: BLE001 - a bug costs this input, as in a local decoder
            return TaskFailed(f"the decoder failed: {type(exc).__name__}: {one_line(exc)}")


def _job(item) -> Job | None:
    """The job of a planned item or an outcome (a `Written` has none: its output names it)."""
    return item if isinstance(item, Job) else getattr(item, "job", None)
