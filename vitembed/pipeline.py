"""Inputs -> batches (parallel decode) -> the layer on its device -> files, streaming.

    sources ──> decoder processes (decoders.py: Pillow) ──> batches of uint8 (B, S, S, C)
            ──> device: normalise, layer ──> writer threads (atomic files) ──> results

With the numpy engine the decoder processes also compute z0 and write the files; with
`--decode gpu` they pass plain JPEGs' bytes on, for the device to decode (devicedecode.py).
Every stage holds a bounded number of images, so memory stays flat however many inputs there
are; results are reported as they finish.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import LayerConfig
from .decoders import Decoder, Job, WriteFailed, Written, window_size
from .errors import ConfigError, OutputError, StdoutClosed
from .images import PlainJpeg, Preprocess, load_image
from .inputs import Source
from .kernel import LayerParams, cached_random_layer, remember_random_layer
from .writers import OutputPlan, atomic_write, tensor_bytes, write_tensor

__all__ = ["EncodeOptions", "LazyLayer", "Result", "Summary", "encode", "encode_images", "resolve_device"]

DTYPES = ("float32", "float16", "bfloat16")
ENGINES = ("auto", "numpy", "torch")
DECODES = ("auto", "cpu", "gpu")
_DEVICE_DECODE_TYPES = ("cuda",)  # devices whose JPEG decoder (nvJPEG) beats Pillow processes


@dataclass(frozen=True)
class LazyLayer:
    """A layer whose shape is known now and whose module is built later (see `encode`).

    `seed` marks a random layer, `build_layer(config, seed)`: its parameters are cached between
    runs (`kernel.cached_random_layer`), so that the numpy engine needs no torch.
    """

    config: LayerConfig
    build: Callable[[], Any]
    seed: int | None = None


@dataclass
class EncodeOptions:
    """How `encode` runs.

    Attributes:
        device: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.
        engine: where the layer runs. numpy: in the decoder processes, which also write the
            files (CPU); torch: batches in the main process, on `device`.
            auto: numpy where it applies, else torch. A random layer is drawn with torch once per
            machine and then cached (`kernel.layer_cache_dir`), so that later runs import no torch.
        dtype: of the outputs; the layer computes in float32 and the result is cast.
        decode: where JPEGs are decoded and resized. cpu: Pillow, in the decoder processes; gpu:
            on the layer's CUDA device with nvJPEG, in batches (the torch engine; the decoder
            processes then only read the files, and decode the other formats with Pillow);
            auto: cpu, until the gpu path has been checked on a GPU (it is meant to pick gpu on
            CUDA then).
        batch_size: images per call of the layer.
        workers: decoding processes; 0 decodes in this process.
        writers: threads writing files, so that disk I/O overlaps compute (None: one per core, 2
            to 16; a GPU outruns a few writers: one np.save of a vit-b16 z0 is about 0.5 ms).
        skip_existing: inputs whose output file exists are skipped (status `skipped`); with
            shards, inputs whose shard exists and is full.
        shard_size: K > 0 writes shards of K stacked tensors, (K, N+1, D) .npy files, instead of
            one file per image; input number i (counted from 0, failed ones included) is row
            i % K of shard i // K.
        decode_timeout: seconds one image may take to decode before its decoder process is
            killed and the image reported as an error (None: no limit; needs workers > 0).
        trusted_outputs: for `skip_existing`, output path -> the input it was made from (from
            the manifest of -o DIR); an existing output made from another input is re-encoded.
    """

    device: str = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    decode: str = "auto"
    batch_size: int = 32
    workers: int | None = None  # None: one per core
    writers: int | None = None
    skip_existing: bool = False
    shard_size: int | None = None
    decode_timeout: float | None = 120.0  # far above any sane decode; a hung decoder must not stall the run
    trusted_outputs: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose {', '.join(ENGINES)}")
        if self.decode not in DECODES:
            raise ConfigError(f"unknown decode {self.decode!r}; choose {', '.join(DECODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        if self.writers is not None and self.writers < 1:
            raise ConfigError(f"writers must be at least 1, got {self.writers}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {self.shard_size}")
        if self.decode_timeout is not None and self.decode_timeout <= 0:
            raise ConfigError(f"decode timeout must be positive, got {self.decode_timeout}")


@dataclass
class Result:
    """What became of one input (one JSON line of `--json`)."""

    input: Path
    output: Path | None
    status: str  # ok, error or skipped
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    error: str | None = None
    nbytes: int = 0
    row: int | None = None  # the row of `output` that holds this input, when outputs are shards


@dataclass
class Summary:
    """Counts of a finished (or stopped) run."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    bytes_written: int = 0
    elapsed: float = 0.0
    token_shape: tuple[int, ...] | None = None
    stopped: str | None = None  # why the run stopped early: "interrupted", an output error, ...
    pipe_closed: bool = False  # the reader of stdout went away (-o -)
    device: str = "cpu"

    @property
    def total(self) -> int:
        return self.ok + self.errors + self.skipped


def resolve_device(name: str):
    """A torch.device for --device, checking that it exists."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def encode(
    sources: Iterable[Source],
    layer,
    prep: Preprocess,
    plan: OutputPlan,
    options: EncodeOptions | None = None,
    on_result: Callable[[Result], None] | None = None,
    stop: threading.Event | None = None,
    stdout: object | None = None,
    on_layer: Callable[[object], None] | None = None,
) -> Summary:
    """Encode every source with `layer` and write each z0 where `plan` says.

    Args:
        sources: inputs, consumed lazily (see `inputs.iter_sources`).
        layer: a `VitInputLayer`, or a `LazyLayer` built once decoding has started, so that
            building it (importing torch) overlaps the first decodes.
        prep: how files become pixels; its image size must be the layer's.
        plan: where outputs go (`writers.OutputPlan`).
        options: device, dtype, batch size, workers.
        on_result: called once per input, in the calling thread, as each one finishes.
        stop: when set (by a signal handler, say), the run finishes the batch in flight and
            returns with `summary.stopped = "interrupted"`.
        stdout: binary stream for `-o -` (default: sys.stdout.buffer).
        on_layer: called with the layer once it is built, before any output is written (the CLI
            checks and records the output folder's configuration there).

    Returns:
        The run's Summary. Errors of single inputs are reported through `on_result`; an output
        that cannot be written stops the run (`summary.stopped` names it).
    """
    options = options or EncodeOptions()
    run = _Run(layer, prep, plan, options, on_result or (lambda r: None), stop or threading.Event(), stdout, on_layer)
    run._check_layer(layer.config)
    return run.execute(sources)


def encode_images(images, layer, prep: Preprocess | None = None, device: str = "cpu"):
    """z0 for in-memory images: a list of (S, S, C) uint8 arrays or file paths -> (B, N+1, D)."""
    import torch

    prep = prep or Preprocess(image_size=layer.config.image_size, channels=layer.config.in_channels)
    arrays = [load_image(x, prep) if isinstance(x, (str, os.PathLike)) else np.asarray(x, np.uint8) for x in images]
    dev = resolve_device(device)
    layer = layer.to(dev).eval()
    with torch.inference_mode():
        return _forward(layer, _stack(arrays), prep, dev).cpu()


# --- the run -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A batch whose outputs are being written."""

    jobs: list[Job]
    futures: list[Future]
    shape: tuple[int, ...]
    rows: list[int] | None = None  # a shard: its one future writes every job's row


@dataclass
class _Shard:
    """A shard being filled: rows of finished inputs, NaN rows for failed ones."""

    path: Path
    size: int  # rows expected: K, or fewer for the last shard
    rows: np.ndarray | None = None  # (K, N+1, D), allocated with the first finished row
    jobs: list[tuple[int, Job]] = field(default_factory=list)
    resolved: int = 0  # rows filled or failed


class _Run:
    def __init__(self, layer, prep, plan, options, on_result, stop, stdout, on_layer):
        self.layer_source = layer
        self.on_layer = on_layer
        self.prep = prep
        self.plan = plan
        self.options = options
        self.on_result = on_result
        self.stop = stop
        self.stdout = stdout
        self.device = None
        if plan.fmt == "npy" and options.dtype == "bfloat16":
            raise ConfigError("bfloat16 cannot be stored in .npy files; use --format pt or --dtype float16")
        self.shard_size = options.shard_size
        if self.shard_size is not None and (plan.mode != "dir" or plan.fmt != "npy"):
            raise ConfigError("--shard-size writes .npy shards into an -o folder; give -o DIR and --format npy")
        self.shards: dict[int, _Shard] = {}
        self.full_shards: dict[int, bool] = {}
        self.count = 0  # inputs seen, for the shard rows
        self.summary = Summary()
        self.layer = None
        self.saved_threads: int | None = None
        self.writes: deque[_Pending] = deque()
        self.max_pending_batches = 2  # batches being written while the next one computes

    def execute(self, sources: Iterable[Source]) -> Summary:
        start = time.perf_counter()
        self.workers = workers = self.options.workers if self.options.workers is not None else (os.cpu_count() or 1)
        writers = self.options.writers or max(2, min(16, os.cpu_count() or 1))
        writer = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vitembed-write")
        self.writer = writer
        try:
            params = self._numpy_params()
            device_jpegs = self._decode_on_device(numpy_engine=params is not None)  # before any output
            kernel = None
            if params is not None:  # the numpy engine: decoders embed, and write the files themselves
                kernel = params.fold(self.prep.mean, self.prep.std)
                self.summary.device = "cpu"
                if self.on_layer is not None:
                    self.on_layer(params)  # before the first decoder writes
        except BaseException:
            writer.shutdown(wait=False, cancel_futures=True)
            raise
        window = window_size(self.prep, self.options.batch_size, workers, kernel, device_jpegs)
        decoder = Decoder(self.prep, workers, window=window, stop=self.stop, timeout=self.options.decode_timeout,
                          kernel=kernel, device_jpegs=device_jpegs,
                          encode_args=(self.plan.fmt, self.options.dtype, self.plan.mode != "stdout" and not self.shard_size))
        batch: list[tuple[Job, np.ndarray]] = []
        try:
            decoder.start(self._jobs(sources))
            if kernel is None:
                self._setup_layer()  # imports torch and builds the layer while the workers decode
        except BaseException:
            decoder.close()
            writer.shutdown(wait=False, cancel_futures=True)
            self._restore_threads()
            raise

        try:
            with _inference_mode(kernel is None):
                for job, item in decoder:
                    if isinstance(job, Result):
                        self._report(job)
                    elif isinstance(item, str):
                        self._failed(job, item, writer)
                    elif isinstance(item, Written):
                        self._written(job, item.nbytes, kernel.table.shape)
                    elif isinstance(item, WriteFailed):
                        raise OutputError(item.message)
                    elif kernel is not None:  # tokens for a shard or stdout
                        self._take_tokens(job, item, writer)
                    else:
                        batch.append((job, item))
                        if len(batch) == self.options.batch_size:
                            self._run_batch(batch, writer)
                            batch = []
                    self._drain_writes(block=False)
                    if self.stop.is_set():
                        break
                if batch:  # the last, partial batch; after a stop, the images already decoded
                    self._run_batch(batch, writer)
                if self.shard_size and not self.stop.is_set():
                    # The last shard has fewer rows; after a stop, unfinished shards are not written.
                    for index in sorted(self.shards):
                        self._write_shard(index, writer, last=True)
            self._drain_writes(block=True)
        except OutputError as exc:
            self.summary.stopped = str(exc)
            self.summary.pipe_closed = isinstance(exc, StdoutClosed)
            self._drain_writes(block=True, quiet=True)
        finally:
            decoder.close()
            writer.shutdown(wait=True, cancel_futures=True)
            self._restore_threads()
            self.summary.elapsed = time.perf_counter() - start
        if self.stop.is_set() and not self.summary.stopped:
            self.summary.stopped = "interrupted"
        return self.summary

    def _numpy_params(self) -> LayerParams | None:
        """The layer's parameters when the numpy engine runs it, else None (the torch engine)."""
        engine, options = self.options.engine, self.options
        if engine == "torch":
            return None
        on_cpu = options.device == "cpu" or (options.device == "auto" and not _accelerator_present())
        if not on_cpu:
            if engine == "numpy":
                raise ConfigError(f"--engine numpy runs on the CPU, not on --device {options.device}; "
                                  "use --device cpu or --engine torch")
            return None
        source = self.layer_source
        if not isinstance(source, LazyLayer):
            return LayerParams.from_module(source)
        if source.seed is None:
            return LayerParams.from_module(source.build())  # loaded weights: torch is imported already
        params = cached_random_layer(source.config, source.seed)
        if params is None:  # the first run of this layer on this machine draws it with torch, once
            params = LayerParams.from_module(source.build())
            remember_random_layer(params, source.seed)
        return params

    def _decode_on_device(self, numpy_engine: bool) -> bool:
        """Whether JPEGs are decoded on the layer's device (`EncodeOptions.decode`)."""
        if self.options.decode in ("cpu", "auto"):
            # auto: Pillow, for now. The nvJPEG path has run on the CPU device only (the tests); auto
            # is to pick it on CUDA once a GPU machine has checked it (benchmarks/gpu_check.py).
            return False
        from .devicedecode import unsupported

        reason = unsupported(self.prep)
        if reason is not None:
            raise ConfigError(f"--decode gpu: {reason}")
        if numpy_engine or not self._device_decodes():
            raise ConfigError("--decode gpu decodes with nvJPEG on a CUDA device: use --device cuda "
                              "(with the torch engine), or --decode cpu")
        return True

    def _device_decodes(self) -> bool:
        device = resolve_device(self.options.device)  # imports torch: a GPU is evident, or asked for
        if device.type == "cuda":
            import torch

            if torch.version.hip is not None:
                return False  # ROCm: torchvision decodes JPEGs on NVIDIA GPUs only
        return device.type in _DEVICE_DECODE_TYPES

    def _failed(self, job: Job, error: str, writer: ThreadPoolExecutor) -> None:
        self._report(Result(job.source.path, None, "error", error=error))
        if self.shard_size:
            self._resolve(job, None, writer)  # its row stays NaN

    def _written(self, job: Job, nbytes: int, shape: tuple[int, ...]) -> None:
        self.summary.bytes_written += nbytes
        self.summary.token_shape = tuple(shape)
        self._report(Result(job.source.path, job.output, "ok", tuple(shape), self.options.dtype, nbytes=nbytes))

    def _take_tokens(self, job: Job, z: np.ndarray, writer: ThreadPoolExecutor) -> None:
        """Tokens a decoder computed but did not write: a shard's row, or the tensor for stdout."""
        if self.shard_size:
            self._resolve(job, z, writer)
        else:
            future = writer.submit(_write_stream, self.stdout or sys.stdout.buffer, z, self.plan.fmt, self.options.dtype)
            self.writes.append(_Pending([job], [future], tuple(z.shape)))
        self._bound_writes()

    def _setup_layer(self) -> None:
        import torch

        source = self.layer_source
        layer = source.build() if isinstance(source, LazyLayer) else source
        self.device = resolve_device(self.options.device)
        self.summary.device = str(self.device)
        self.layer = layer.to(self.device).eval()
        self.out_dtype = getattr(torch, self.options.dtype)
        if self.device.type == "cpu" and self.workers and "OMP_NUM_THREADS" not in os.environ:
            # The decoding processes keep most cores busy: a few layer threads then beat one per
            # core, whose barriers stall while decoders hold the cores (measured on 2 cores:
            # 1 thread is about 10% faster end to end; see benchmarks/).
            self.saved_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 4))
        if self.on_layer is not None:
            self.on_layer(self.layer)

    def _restore_threads(self) -> None:
        if self.saved_threads is not None:
            import torch

            torch.set_num_threads(self.saved_threads)
            self.saved_threads = None

    def _check_layer(self, config) -> None:
        if self.prep.image_size != config.image_size:
            raise ConfigError(f"images are resized to {self.prep.image_size} but the layer takes {config.image_size}")
        if self.prep.channels != config.in_channels:
            raise ConfigError(f"the layer takes {config.in_channels} channels; images can be read with 1 or 3")

    def _jobs(self, sources: Iterable[Source]) -> Iterator[Job | Result]:
        if self.shard_size:
            yield from self._shard_jobs(sources)
            return
        for source in sources:
            output = self.plan.assign(source)
            if source.error:
                yield Result(source.path, None, "error", error=source.error)
            elif self.options.skip_existing and output is not None and self._made_from(output, source):
                yield Result(source.path, output, "skipped", tuple(self.layer_source.config.token_shape), self.options.dtype)
            else:
                yield Job(source, output)

    def _shard_jobs(self, sources: Iterable[Source]) -> Iterator[Job | Result]:
        k = self.shard_size
        for index, source in enumerate(sources):
            self.count = index + 1
            shard, row = divmod(index, k)
            path = self.plan.target / f"shard-{shard:05d}.npy"
            job = Job(source, path, index)
            if self.options.skip_existing and self._shard_full(shard, path):
                yield Result(source.path, path, "skipped", row=row)
            elif source.error:
                yield Result(source.path, None, "error", error=source.error)
                self._resolve(job, None, self.writer)
            else:
                yield job

    def _shard_full(self, shard: int, path: Path) -> bool:
        """Whether `path` holds a complete shard of K rows (a shorter last shard is redone)."""
        if shard not in self.full_shards:
            try:
                rows = np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
            except (OSError, ValueError, IndexError):
                rows = 0
            self.full_shards[shard] = rows == self.shard_size
        return self.full_shards[shard]

    def _resolve(self, job: Job, z, writer: ThreadPoolExecutor) -> None:
        """Account for one input of a shard: its row (z) or a failure (None)."""
        index, row = divmod(job.index, self.shard_size)
        shard = self.shards.get(index)
        if shard is None:
            shard = self.shards[index] = _Shard(job.output, self.shard_size)
        if z is not None:
            if shard.rows is None:
                shard.rows = np.full((self.shard_size, *z.shape), np.nan, dtype=z.dtype)
            shard.rows[row] = z
            shard.jobs.append((row, job))
        shard.resolved += 1
        if shard.resolved == shard.size:
            self._write_shard(index, writer)

    def _write_shard(self, index: int, writer: ThreadPoolExecutor, last: bool = False) -> None:
        shard = self.shards.pop(index)
        if not shard.jobs:
            return  # every input of it failed: nothing to write, as for single files
        rows = shard.rows
        if last:  # the last shard: rows up to the last input, (n, N+1, D)
            rows = rows[: min(self.shard_size, self.count - index * self.shard_size)]
        future = writer.submit(atomic_write, shard.path, lambda f: write_tensor(f, rows, "npy"))
        jobs = [job for _, job in shard.jobs]
        self.writes.append(_Pending(jobs, [future], tuple(rows.shape[1:]), rows=[row for row, _ in shard.jobs]))

    def _made_from(self, output: Path, source: Source) -> bool:
        """Whether `output` exists and holds `source`'s tokens (as far as the manifest knows)."""
        if not output.exists():
            return False
        known = self.options.trusted_outputs
        if known is None or self.plan.target is None:
            return True
        try:
            key = str(output.relative_to(self.plan.target))
        except ValueError:
            return True
        # An output the manifest gives to another input (an input set that changed between runs
        # moves collision names) is re-encoded, never taken for this input's.
        name = os.fsencode(source.path).decode("utf-8", "backslashreplace")  # as the manifest writes it
        return known.get(key, name) == name

    def _run_batch(self, batch: list[tuple[Job, Any]], writer: ThreadPoolExecutor) -> None:
        if any(isinstance(item, PlainJpeg) for _, item in batch):
            batch = self._decode_jpegs(batch, writer)
            if not batch:
                return
        jobs = [job for job, _ in batch]
        z = _forward(self.layer, _stack([a for _, a in batch], self.device), self.prep, self.device)
        z = z.to(self.out_dtype).cpu()
        shape = tuple(z.shape[1:])
        if self.shard_size:
            array = z.numpy()
            for i, job in enumerate(jobs):
                self._resolve(job, array[i], writer)
            self._bound_writes()
            return
        if self.plan.mode == "stdout":
            out = self.stdout or sys.stdout.buffer
            futures = [writer.submit(_write_stream, out, z[0], self.plan.fmt)]
        else:
            futures = [writer.submit(_write_file, job.output, z[i], self.plan.fmt) for i, job in enumerate(jobs)]
        self.writes.append(_Pending(jobs, futures, shape))
        self._bound_writes()

    def _decode_jpegs(self, batch: list[tuple[Job, Any]], writer: ThreadPoolExecutor) -> list[tuple[Job, Any]]:
        """Decode the batch's JPEG bytes on the device; report the files that fail, keep the rest."""
        from .devicedecode import decode_jpegs

        at = [i for i, (_, item) in enumerate(batch) if isinstance(item, PlainJpeg)]
        decoded = dict(zip(at, decode_jpegs([batch[i][1] for i in at], self.prep, self.device)))
        kept = []
        for i, (job, item) in enumerate(batch):
            item = decoded.get(i, item)
            if isinstance(item, str):
                self._failed(job, item, writer)
            else:
                kept.append((job, item))
        return kept

    def _bound_writes(self) -> None:
        """Wait for the oldest writes while more than `max_pending_batches` are in flight."""
        while len(self.writes) > self.max_pending_batches:
            self._finish_oldest()

    def _drain_writes(self, block: bool, quiet: bool = False) -> None:
        while self.writes and (block or all(f.done() for f in self.writes[0].futures)):
            try:
                self._finish_oldest()
            except OutputError:
                if not quiet:
                    raise

    def _finish_oldest(self) -> None:
        pending = self.writes.popleft()
        if pending.rows is not None:
            self._finish_shard(pending)
            return
        failure = None
        for job, future in zip(pending.jobs, pending.futures):
            try:
                nbytes = future.result()
            except OutputError as exc:
                failure = failure or exc
                continue
            self._written(job, nbytes, pending.shape)
        if failure is not None:
            raise failure

    def _finish_shard(self, pending: _Pending) -> None:
        nbytes = pending.futures[0].result()  # an OutputError stops the run, as for single files
        self.summary.bytes_written += nbytes
        self.summary.token_shape = pending.shape
        for row, job in zip(pending.rows, pending.jobs):
            self._report(Result(job.source.path, job.output, "ok", pending.shape, self.options.dtype, row=row))

    def _report(self, result: Result) -> None:
        if result.status == "ok":
            self.summary.ok += 1
        elif result.status == "skipped":
            self.summary.skipped += 1
        else:
            self.summary.errors += 1
        self.on_result(result)


def _inference_mode(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def _accelerator_present() -> bool:
    """Whether --device auto may find a GPU; judged without importing torch where possible."""
    if "torch" in sys.modules:  # imported already (--weights): ask it, as --device auto does
        return resolve_device("auto").type != "cpu"
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # Apple silicon: MPS
    if sys.platform.startswith("linux"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        nvidia = visible not in ("", "-1") and (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl"))
        return nvidia or os.path.exists("/dev/kfd")  # /dev/kfd: ROCm
    return True  # elsewhere torch decides


def _stack(arrays: list, device=None):
    """B x (S, S, C) uint8 -> (B, S, S, C): numpy arrays on the CPU, or tensors decoded on `device`."""
    import torch

    if all(isinstance(a, np.ndarray) for a in arrays):
        return torch.from_numpy(np.stack(arrays))
    return torch.stack([torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a for a in arrays])


def _forward(layer, pixels, prep: Preprocess, device):
    """uint8 (B, S, S, C) on the CPU -> z0 (B, N+1, D) float32 on `device`."""
    import torch

    if device.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()  # page-locked, so that the copy below is asynchronous
    pixels = pixels.to(device, non_blocking=True)  # (B, S, S, C) uint8
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=device)
    # (x / 255 - mean) / std folded into the patch embedding; channels-last convolution, which
    # CPUs run about 3x faster than NCHW (same math; float32 rounding may differ in the last bits).
    with _ieee_float32():
        return layer.forward_pixels(pixels, mean, std)


@contextlib.contextmanager
def _ieee_float32():
    """Full float32 convolutions for a while. cuDNN on Ampere and later GPUs convolves float32 in
    TF32 (a 10-bit mantissa) by default, which would put z0 about 1e-3 off; the layer is far too
    small for that to buy any speed. The settings change nothing off CUDA."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _write_file(path: Path, tensor, fmt: str) -> int:
    return atomic_write(path, lambda f: write_tensor(f, tensor, fmt))


def _write_stream(stream, tensor, fmt: str, dtype: str | None = None) -> int:
    data = memoryview(tensor_bytes(tensor, fmt, dtype))
    try:
        # A write cut short by the reader leaving returns a partial count instead of raising:
        # loop, so that the next write reports the closed pipe.
        while data:
            data = data[stream.write(data):]
        stream.flush()
    except BrokenPipeError:
        raise StdoutClosed("stdout was closed before the tensor was fully written") from None
    return len(data.obj)
