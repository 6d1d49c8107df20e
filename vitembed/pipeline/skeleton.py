"""A run: inputs -> decode -> encode -> sink -> outcomes, streaming, one bounded window at a time.

    sources ─ plan_jobs ─> Job | Skipped | Failed
            ─ an Executor ─> (job, Decoded | Encoded | Written | Failed | TaskFailed)
            ─ Encoder, in batches of Decoded ─> Encoded
            ─ Sink (per-image files | stdout | shards) ─> Written | Failed | Skipped ─> on_result

`run` is the one run of every executor: it checks, plans, resumes, counts, reports, stops and
cleans up; the executor only runs jobs. What an executor does with a unit of jobs that came back
without results (retry its inputs one at a time, or report the one that fails alone) is the rule
in `retry`, beside this module. Executors: `pool.OrderedPool` (decoder processes, or
this process with workers=0; `local_executor`) and `rayexec.RayExecutor` (Ray actors, which
decode, encode and write, so that what comes back is final; `raydriver`).

Where the numpy engine runs, the decoder processes encode (and write per-image files) themselves,
so their outcomes skip the stages they have done. Every stage holds a bounded number of inputs
(the executor's window, one batch, the sink's pending writes), so memory stays flat however many
inputs there are; outcomes are reported as they become final.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol

from ..choices import DATASET_FORMATS, DECODES, suggest
from ..encoder import Encoder
from ..errors import ConfigError, InputError, OutputError, StdoutClosed
from ..files.writes import clean_stale_temporaries
from ..images.decode import pillow_limit
from .outcomes import Decoded, Encoded, Failed, Job, Outcome, OutputFailed, Skipped, Summary, Written
from .plan import OutputPlan, Resume, plan_jobs
from ..executors.pool import OrderedPool, TaskFailed
from ..executors.processes import decoder_context
from .runoptions import DECODE_TIMEOUT, EncodeOptions, RayOptions
from .sinks import FileSink, FileWriter, ShardSink, Sink, StdoutSink
from ..executors.decoder import WorkerTask, init_worker

__all__ = ["DECODES", "DECODE_TIMEOUT", "EncodeOptions", "Executor", "RayOptions", "check", "execute", "local_executor",
           "run"]

_DEVICE_DECODE_TYPES = ("cuda",)  # devices whose JPEG decoder (nvJPEG) beats Pillow processes


def run(sources: Iterable, encoder: Encoder, plan: OutputPlan, options: EncodeOptions | None = None, *,
        on_result: Callable[[Outcome], None] | None = None, stop: threading.Event | None = None,
        stdout: BinaryIO | None = None, made_from: dict | None = None,
        executor: ExecutorFactory | None = None) -> Summary:
    """Encode every source with `encoder` and put each z0 where `plan` says.

    Args:
        sources: `inputs.Source`s, consumed lazily (see `inputs.iter_sources`).
        on_result: called with each input's outcome, in this thread, as it becomes final.
        stop: when set (a signal handler, say), the run stops promptly; every output written is
            whole, and `summary.stopped` is "interrupted".
        stdout: binary stream for `-o -` (default: sys.stdout.buffer).
        made_from: what an -o DIR's manifest says each output was made from (`folder.read_manifest`).
        executor: what runs the jobs, and the sink for what it leaves to this process
            (`ExecutorFactory`; default `local_executor`: decoder processes, or this process).

    Returns:
        The run's Summary. A failed input is an outcome; an output that cannot be written stops
        the run (`summary.stopped` says why).
    """
    options = with_shard_size(options or EncodeOptions(), encoder, plan)
    check(encoder, plan, options)
    return execute(sources, encoder, plan, options, on_result=on_result, stop=stop, stdout=stdout,
                   made_from=made_from, executor=executor)


def execute(sources: Iterable, encoder: Encoder, plan: OutputPlan, options: EncodeOptions, *,
            on_result: Callable[[Outcome], None] | None = None, stop: threading.Event | None = None,
            stdout: BinaryIO | None = None, made_from: dict | None = None,
            executor: ExecutorFactory | None = None) -> Summary:
    """`run`, once `check` has passed (`job.encode_request` checks before it opens the -o folder)."""
    stop, on_result = stop or threading.Event(), on_result or (lambda o: None)
    summary = Summary(device=encoder.device)
    shape = encoder.token_shape or (None, encoder.config.emb_dim)  # native: any number of rows
    max_rows = None if encoder.token_shape else encoder.config.num_prefix_tokens + encoder.prep.max_patches
    resume = Resume(options.skip_existing, options.overwrite, shape, encoder.dtype, made_from, max_rows)
    jobs, sink = (executor or local_executor)(encoder, plan, options, stdout, stop)
    start = time.perf_counter()
    try:
        jobs.start(plan_jobs(sources, plan, resume, options.shard_size), is_task=lambda item: isinstance(item, Job))
        in_process = executor is None and options.workers == 0  # else the decoders (or actors) set their own
        with pillow_limit(encoder.prep.max_pixels if in_process else 0):
            for outcome in outcomes(jobs, encoder, sink, options.batch_size, stop):
                _report(outcome, summary, on_result)
        if stop.is_set():  # the files the decoders wrote while the run stopped are counted too
            for _, result in jobs.drain():
                if isinstance(result, Written):
                    _report(result, summary, on_result)
    except OutputError as exc:
        summary.stopped, summary.pipe_closed = str(exc), isinstance(exc, StdoutClosed)
        for outcome in sink.salvage():
            _report(outcome, summary, on_result)
    finally:
        _remove_temporaries(jobs.close(), plan.store)
        sink.close()
        summary.elapsed = time.perf_counter() - start
    if stop.is_set() and not summary.stopped:
        summary.stopped = "interrupted"
    return summary


class Executor(Protocol):
    """What runs a run's jobs (`OrderedPool`: decoder processes or this process; `rayexec.RayExecutor`).

    `start(items, is_task)` takes the planned items lazily (the items for which `is_task` is
    false need no task); iterating gives (item, result) pairs, each item once, in input order or
    not (the outcomes are the same), with a pass-through item as (item, None); after a stop,
    `drain()` gives the (item, result) pairs of what finished while stopping; `close()` stops it
    and returns jobs whose output folders may hold a killed writer's temporaries."""

    def start(self, items: Iterable, is_task: Callable[[object], bool]) -> None: ...

    def __iter__(self) -> Iterator[tuple]: ...

    def drain(self) -> Iterable[tuple]: ...

    def close(self) -> list: ...


# (encoder, plan, options, stdout, stop) -> (the executor, the sink for its results in this process)
ExecutorFactory = Callable[[Encoder, OutputPlan, "EncodeOptions", "BinaryIO | None", threading.Event],
                           tuple[Executor, Sink]]


def local_executor(encoder: Encoder, plan: OutputPlan, options: EncodeOptions, stdout: BinaryIO | None,
                   stop: threading.Event) -> tuple[OrderedPool, Sink]:
    """The run on this machine: decoder processes (`options.workers`; 0: this process)."""
    task, sink = stages(encoder, plan, options, stdout)
    workers = options.workers if options.workers is not None else (os.cpu_count() or 1)
    pool = OrderedPool(task, workers, window=window_size(encoder, task, options.batch_size, workers),
                       timeout=options.decode_timeout, stop=stop, initializer=init_worker,
                       initargs=(encoder.prep.max_pixels, task.kernel is not None, os.getpid()),
                       context=decoder_context())
    return pool, sink


def outcomes(results: Iterable[tuple], encoder: Encoder, sink: Sink, batch_size: int,
             stop: threading.Event) -> Iterator[Outcome]:
    """The stages after decoding, each item in input order to the stage it has reached.

    Args:
        results: (item, what its task returned) pairs from an `Executor`, or a Ray actor's own;
            (item, None) for an item that needed no task.
    """
    batch: list[Decoded] = []
    for item, result in results:
        match item if result is None else result:
            case Decoded() as decoded:
                batch.append(decoded)
                if len(batch) == batch_size:
                    yield from _encode(batch, encoder, sink)
                    batch = []
            case Encoded() as encoded:
                yield from sink.put(encoded)
            case Failed() as failed:
                yield from sink.failed(failed)
            case TaskFailed(reason=reason):
                yield from sink.failed(Failed(item.source, reason, item))
            case OutputFailed(reason=reason):
                raise OutputError(reason)
            case Written() | Skipped() as final:
                yield final
        if stop.is_set():
            break
    if batch:  # the last, partial batch; after a stop, the images already decoded
        yield from _encode(batch, encoder, sink)
    yield from sink.finish(complete=not stop.is_set())


def _encode(batch: list[Decoded], encoder: Encoder, sink: Sink) -> Iterator[Outcome]:
    for decoded, tokens in zip(batch, encoder.encode_items([d.pixels for d in batch])):
        job = decoded.job
        if isinstance(tokens, InputError):
            yield from sink.failed(Failed(job.source, str(tokens), job))
        else:
            yield from sink.put(Encoded(job, tokens, encoder.grid_of(decoded.pixels)))


def _report(outcome: Outcome, summary: Summary, on_result: Callable[[Outcome], None]) -> None:
    summary.count(outcome)
    on_result(outcome)


def stages(encoder: Encoder, plan: OutputPlan, options: EncodeOptions,
           stdout: BinaryIO | None) -> tuple[WorkerTask, Sink]:
    """What the decoder processes do, and the sink for what they leave to this process (a Ray
    actor builds its own, with workers=0)."""
    numpy_engine = encoder.engine == "numpy"
    task = WorkerTask(encoder.prep, encoder.kernel if numpy_engine else None, encoder.dtype,
                      device_jpegs=decodes_on_device(encoder, options),
                      gate=decoder_context().Lock() if options.workers != 0 else None)
    if plan.mode == "stdout":
        return task, StdoutSink(plan.fmt, encoder.dtype, stdout)
    if options.shard_size:
        return task, ShardSink(plan.target, options.shard_size, encoder.dtype, options.writers, plan.store,
                               fmt=plan.fmt, shape=encoder.token_shape or (None, encoder.config.emb_dim),
                               record=plan.record)
    local = plan.mode == "dir" and (plan.store is None or plan.store.kind == "local")
    writer = FileWriter(plan.fmt, encoder.dtype, plan.target.resolve() if local else None, plan.store)
    if numpy_engine:  # the numpy engine writes where the tokens are: in the decoder processes
        task = dataclasses.replace(task, writer=writer)
    return task, FileSink(writer, options.writers)


def check(encoder: Encoder, plan: OutputPlan, options: EncodeOptions) -> None:
    """The rules between the encoder, the outputs and the options (before anything is written)."""
    if plan.fmt == "npy" and encoder.dtype == "bfloat16":
        raise ConfigError("bfloat16 cannot be stored in .npy files; use --format pt or --dtype float16")
    if plan.fmt in DATASET_FORMATS:
        check_dataset_output(encoder, plan)
    elif options.shard_size is not None and (plan.mode != "dir" or plan.fmt != "npy"):
        raise ConfigError("--shard-size writes shards into an -o folder; give -o DIR and --format npy, parquet or wds")
    if options.shard_size is not None and encoder.token_shape is None and plan.fmt == "npy":
        raise ConfigError("--shard-size stacks tokens of one shape, but with --resize native each image has a "
                          "grid (and a shape) of its own: drop --shard-size (one file per image), or pick a size "
                          "with --image-size HxW --resize squash")
    decodes_on_device(encoder, options)


def check_dataset_output(encoder: Encoder, plan: OutputPlan) -> None:
    """The rules of Parquet and WebDataset outputs (`files.tables`)."""
    if plan.mode != "dir":
        raise ConfigError(f"--format {plan.fmt} writes shards into a folder; give -o DIR")
    if plan.fmt == "wds" and encoder.dtype == "bfloat16":
        raise ConfigError("--format wds stores .npy members, which cannot hold bfloat16; use --format parquet "
                          "or --dtype float16")
    if plan.fmt == "parquet":
        from ..files.tables import require_pyarrow

        require_pyarrow()


def with_shard_size(options: EncodeOptions, encoder: Encoder, plan: OutputPlan) -> EncodeOptions:
    """The options, with a Parquet or WebDataset output's default --shard-size where none is given
    (`tables.default_shard_size`: 1024 rows, fewer where a shard would pass 256 MiB of tokens)."""
    if options.shard_size is not None or plan.fmt not in DATASET_FORMATS:
        return options
    from ..files.tables import default_shard_size

    rows = encoder.token_shape or (encoder.config.num_prefix_tokens + encoder.prep.max_patches, encoder.config.emb_dim)
    return dataclasses.replace(options, shard_size=default_shard_size(rows, encoder.dtype))


def decodes_on_device(encoder: Encoder, options: EncodeOptions) -> bool:
    """Whether JPEGs are decoded on the encoder's device (`EncodeOptions.decode`)."""
    if options.decode in ("cpu", "auto"):
        # auto: Pillow, for now. The nvJPEG path has run on the CPU device only (the tests); auto
        # is to pick it on CUDA once a GPU machine has checked it (benchmarks/gpu_check.py).
        return False
    from ..images.device import unsupported

    reason = unsupported(encoder.prep)
    if reason is not None:
        raise ConfigError(f"--decode gpu: {reason}")
    device = encoder.torch.device if encoder.torch is not None else None
    if device is None or device.type not in _DEVICE_DECODE_TYPES or _rocm():
        raise ConfigError("--decode gpu decodes with nvJPEG on a CUDA device: use --device cuda "
                          "(with the torch engine), or --decode cpu")
    return True


def _rocm() -> bool:
    import torch

    return torch.version.hip is not None  # torchvision decodes JPEGs on NVIDIA GPUs only


def window_size(encoder: Encoder, task: WorkerTask, batch_size: int, workers: int) -> int:
    """Images decoded ahead: enough to cover start-up and a few batches, about 64 MB of pixels
    (of tokens, when the decoders compute them). Files whose bytes go to the device are as large
    as they come (megabytes for a photo): a few batches of them."""
    if task.device_jpegs:
        return max(4 * batch_size, 4 * workers)
    per_image = encoder.kernel.table.nbytes if task.kernel is not None else (
        encoder.prep.size[0] * encoder.prep.size[1] * encoder.prep.channels)
    return max(2 * batch_size, 4 * workers, min(1024, (64 << 20) // per_image))


def _remove_temporaries(killed: list, store=None) -> None:
    """Writers killed while writing leave temporary files: remove them (their outputs are absent)."""
    for folder in {job.output.parent for job in killed if isinstance(job, Job) and job.output is not None}:
        store.clean(folder) if store is not None else clean_stale_temporaries(folder)
