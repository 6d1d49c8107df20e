"""Decoder processes: each input file -> pixels (or, with the numpy engine, z0 written to disk).

    jobs ──> Decoder (a pool of processes, in input order, a bounded window ahead)
         ──> (job, pixels | error message | Written | WriteFailed | PlainJpeg | tokens)

A decoder process that dies costs only the images it held: the images in flight are retried one
at a time, and only the one that kills its process again is reported as an error. An image that
decodes for longer than the timeout has its process killed and is reported. Everything a job
returns is small (a path, a result), except pixels and tokens when the main process needs them.

Jobs travel in chunks of consecutive images, sized so that a chunk is about 20 ms of a decoder's
work: each task costs the main process about 0.1 ms of pool bookkeeping, whatever it holds, and
on a GPU machine the main process is the one that sets the pace.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, OutputError, VitembedError
from .images import PlainJpeg, Preprocess, keep_pixel_blocks, load_image, read_plain_jpeg
from .inputs import Source
from .kernel import Kernel, set_blas_threads, single_blas_thread
from .processes import decoder_context, keep_heap, start_decoder_server
from .writers import atomic_write, cast, clean_stale_temporaries, write_tensor

__all__ = ["Decoder", "Job", "WriteFailed", "Written", "window_size"]


@dataclass
class Job:
    """One input to encode: where it comes from, where its output goes."""

    source: Source
    output: Path | None
    index: int = 0  # position among all inputs; picks the shard and row with --shard-size


_KERNEL: Kernel | None = None  # a decoder process's layer, with the numpy engine


def worker_init(max_pixels: int = 0, kernel: Kernel | None = None) -> None:
    global _KERNEL
    # The parent decides when to stop: a terminal's Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # C decoders (libtiff, ...) print their complaints straight to stderr; each bad file is
    # reported once, by the parent, as a result.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    if max_pixels:
        limit_memory(max_pixels)
    keep_pixel_blocks()
    keep_heap()
    if kernel is not None:
        _KERNEL = kernel
        set_blas_threads(1)  # one decoder per core already; and see kernel.single_blas_thread


def limit_memory(max_pixels: int) -> None:
    """Cap a decoder's address space, so that no file, whatever it claims, exhausts the machine.

    --max-pixels already refuses large images from their header; this catches the allocations a
    header does not announce. A decode of the largest allowed image needs about 24 bytes per
    pixel at its peak (16-bit input scaled to 8 bits); an allocation beyond the cap is a
    MemoryError, which fails that one file.
    """
    try:
        import resource

        limit = _BASE_ADDRESS_SPACE + 32 * max_pixels
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # not on this platform: --max-pixels still holds
        pass


_BASE_ADDRESS_SPACE = 4 << 30  # the interpreter, numpy and Pillow mapped, with room to spare


def _decode(path: Path, prep: Preprocess) -> np.ndarray | str:
    try:
        return load_image(path, prep)
    except InputError as exc:
        return str(exc)


def _read_for_device(path: Path, prep: Preprocess) -> PlainJpeg | np.ndarray | str:
    """A plain JPEG's bytes, for the device to decode; any other file decoded here, by Pillow."""
    jpeg = read_plain_jpeg(path, prep)
    return _decode(path, prep) if jpeg is None else jpeg


@dataclass(frozen=True)
class Written:
    nbytes: int


@dataclass(frozen=True)
class WriteFailed:
    message: str


def _encode(path: Path, prep: Preprocess, output: Path | None, fmt: str, dtype: str,
            kernel: Kernel | None = None) -> np.ndarray | str | Written | WriteFailed:
    """The numpy engine's work for one image: decode, embed, and write `output` (or return z0)."""
    try:
        pixels = load_image(path, prep)
    except InputError as exc:
        return str(exc)
    z = cast((kernel or _KERNEL)(pixels), dtype)
    if output is None:
        return z
    try:
        return Written(atomic_write(output, lambda f: write_tensor(f, z, fmt, dtype)))
    except OutputError as exc:  # a full disk, say: it stops the run, in the parent
        return WriteFailed(str(exc))


def _run_chunk(task: Callable, calls: list[tuple]) -> tuple[list[Any], float]:
    """One decoder task: `task` on each of a chunk's images; returns what each gave, and the seconds
    the chunk took (for the parent to size the next chunks)."""
    start = time.perf_counter()
    values = []
    for args in calls:
        try:
            values.append(task(*args))
        except Exception as exc:  # this file only; the rest of the chunk goes on
            values.append(_failure(exc))
    return values, time.perf_counter() - start


def _failure(exc: Exception) -> str:
    """The report for a file whose task raised (rather than returning its error)."""
    return f"the decoder failed: {type(exc).__name__}: {exc}"


# A decoder task's work: far above the pool's cost per task (about 0.1 ms of the main process),
# and short enough that the decoders still finish a run together.
_CHUNK_SECONDS = 0.02
_MAX_CHUNK = 16


class Decoder:
    """Ordered, bounded parallel decoding that survives decoder processes dying."""

    def __init__(self, prep: Preprocess, workers: int, window: int, stop: threading.Event,
                 timeout: float | None = None, kernel: Kernel | None = None, device_jpegs: bool = False,
                 encode_args: tuple[str, str, bool] = ("npy", "float32", True)):
        self.prep = prep
        self.device_jpegs = device_jpegs  # pass plain JPEGs on as bytes (see devicedecode)
        self.kernel = kernel  # the numpy engine: decoders return tokens, or write them
        self.encode_args = encode_args  # format, dtype, whether decoders write the outputs
        self.workers = workers
        self.window = max(window, 1)
        self.stop = stop
        self.timeout = timeout
        self.pool: ProcessPoolExecutor | None = None
        self.decoded = 0  # images that came back from a worker, errors included
        self.deaths = 0  # workers that died on an image tried alone
        # Images per task: one until the first chunks have been timed, then about _CHUNK_SECONDS
        # of work, with each decoder still holding a few tasks of the window.
        self.chunk = 1
        self.max_chunk = max(1, min(_MAX_CHUNK, self.window // (3 * max(workers, 1))))
        self.seconds_per_image: float | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        start_decoder_server()
        return ProcessPoolExecutor(self.workers, mp_context=decoder_context(), initializer=worker_init,
                                   initargs=(self.prep.max_pixels, self.kernel))

    def _learn(self, seconds: float, images: int) -> None:
        """Size the next chunks from how long one took (a moving average per image)."""
        per_image = seconds / images
        if self.seconds_per_image is not None:
            per_image = 0.8 * self.seconds_per_image + 0.2 * per_image
        self.seconds_per_image = per_image
        self.chunk = max(1, min(self.max_chunk, int(_CHUNK_SECONDS / max(per_image, 1e-6))))

    def _task(self, job: Job) -> tuple[Callable, tuple]:
        if self.device_jpegs:
            return _read_for_device, (job.source.path, self.prep)
        if self.kernel is None:
            return _decode, (job.source.path, self.prep)
        fmt, dtype, write = self.encode_args
        return _encode, (job.source.path, self.prep, job.output if write else None, fmt, dtype)

    def close(self) -> None:
        if self.pool is not None:
            killed = self.stop.is_set()
            if killed:
                self._kill_workers()  # a stop must not wait for a slow or hung decode
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            if killed and self.kernel is not None:
                self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Decoders killed while writing leave temporary files: remove them (their outputs are absent)."""
        held = [job for jobs, _ in getattr(self, "_inflight", ()) for job in jobs]
        jobs = held + list(getattr(self, "_suspects", ()))
        for folder in {j.output.parent for j in jobs if isinstance(j, Job) and j.output is not None}:
            clean_stale_temporaries(folder)

    def _kill_workers(self) -> None:
        assert self.pool is not None
        processes = getattr(self.pool, "_processes", None) or {}
        for process in list(processes.values()):
            try:
                process.kill()
            except (OSError, ValueError, AttributeError):
                pass

    def start(self, jobs: Iterable[Job | Any]) -> None:
        """Begin decoding: the first `window` jobs go to the workers at once, before any result is
        asked for, so that decoding overlaps whatever the caller does next (importing torch)."""
        self._jobs = iter(jobs)
        # Chunks of jobs with their task, in input order; an item that is not a Job is alone, with
        # no task. `_held` counts the items.
        self._inflight: deque[tuple[list[Job | Any], Future | None]] = deque()
        self._held = 0
        self._suspects: deque[Job | Any] = deque()  # in flight when a decoder died: retried alone
        if self.workers:
            self._fill()

    def _fill(self) -> None:
        """Submit chunks while the window has room for a whole one."""
        while not self.stop.is_set() and (self._held == 0 or self.window - self._held >= self.chunk):
            items = list(itertools.islice(self._jobs, self.chunk))
            jobs: list[Job] = []
            for item in items:
                if isinstance(item, Job):
                    jobs.append(item)
                    continue
                self._hold(jobs)  # what came before it goes first
                jobs = []
                self._inflight.append(([item], None))
                self._held += 1
            self._hold(jobs)
            if len(items) < self.chunk:
                return  # no more jobs

    def _hold(self, jobs: list[Job]) -> None:
        if jobs:
            self._inflight.append((jobs, self._submit(jobs)))
            self._held += len(jobs)

    def _release(self) -> list[Job | Any]:
        """Everything in flight, in order, taken back (to be retried alone)."""
        items = [item for items, _ in self._inflight for item in items]
        self._inflight.clear()
        self._held = 0
        return items

    def __iter__(self) -> Iterator[tuple[Job | Any, np.ndarray | str | None]]:
        """Yield (job, what its task returned) in input order; anything that is not a Job (the
        caller's results for inputs that need no decoding) passes through as (item, None)."""
        if self.workers == 0:
            for job in self._jobs:
                if self.stop.is_set():
                    return
                if not isinstance(job, Job):
                    yield job, None
                    continue
                task, args = self._task(job)
                if self.kernel is None:
                    yield job, task(*args)
                    continue
                with single_blas_thread():
                    value = task(*args, kernel=self.kernel)
                yield job, value
            return
        inflight, suspects = self._inflight, self._suspects
        while True:
            if suspects:
                job = suspects.popleft()
                if not isinstance(job, Job):
                    yield job, None
                    continue
                value = self._result(self._submit([job]))
                if value is _STOPPED:
                    return
                if value is _BROKEN:
                    self._restart()
                    self.deaths += 1
                    if self.deaths >= 3 and not self.decoded:
                        raise VitembedError(
                            "decoder processes die before decoding anything; a script that calls "
                            "vitembed.encode must guard it with `if __name__ == '__main__':` "
                            "(or pass EncodeOptions(workers=0))"
                        )
                    value = "the decoder process died while reading this file"
                elif value is _TIMEOUT:
                    self._restart(kill=True)
                    value = self._timeout_message()
                else:
                    self.decoded += 1
                    if not isinstance(value, str):
                        value = value[0][0]
                yield job, value
                continue
            self._fill()
            if not inflight:
                return
            jobs, future = inflight.popleft()
            self._held -= len(jobs)
            if future is None:
                yield jobs[0], None
                continue
            value = self._result(future)
            if value is _STOPPED:
                return
            if value is _BROKEN:
                # Whichever image killed its decoder, every image in flight lost its task.
                self._restart()
                suspects.extend(jobs)
                suspects.extend(self._release())
                continue
            if value is _TIMEOUT:
                self._restart(kill=True)
                rest = self._release()
                if len(jobs) == 1:
                    # The oldest job in flight has been decoding alone for the whole timeout: it is
                    # the one that hangs. The others lose their decoder with it and are retried.
                    suspects.extend(rest)
                    yield jobs[0], self._timeout_message()
                else:  # one image of the chunk hangs: each is tried alone, to find which
                    suspects.extend(jobs)
                    suspects.extend(rest)
                continue
            if isinstance(value, str):  # the task's result could not come back
                if len(jobs) == 1:
                    self.decoded += 1
                    yield jobs[0], value
                else:
                    suspects.extend(jobs)  # to find the image whose result cannot
                continue
            values, seconds = value
            self._learn(seconds, len(values))
            self.decoded += len(values)
            yield from zip(jobs, values)

    def _submit(self, jobs: list[Job]) -> Future:
        if self.pool is None:
            self.pool = self._new_pool()
        try:
            calls = [self._task(job) for job in jobs]
            return self.pool.submit(_run_chunk, calls[0][0], [args for _, args in calls])
        except (BrokenProcessPool, RuntimeError) as exc:  # a decoder died since the last look
            future: Future = Future()
            future.set_exception(exc if isinstance(exc, BrokenProcessPool) else BrokenProcessPool(str(exc)))
            return future

    def _restart(self, kill: bool = False) -> None:
        if self.pool is not None:
            if kill:
                self._kill_workers()
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def _timeout_message(self) -> str:
        return f"decoding took longer than {self.timeout:g} s; the decoder was stopped"

    def _result(self, future: Future):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            done, _ = wait([future], timeout=0.2, return_when=FIRST_COMPLETED)
            if done:
                try:
                    return future.result()
                except BrokenProcessPool:
                    return _BROKEN
                except Exception as exc:  # a result that cannot come back costs this file only
                    return _failure(exc)
            if self.stop.is_set():
                return _STOPPED
            if deadline is not None and time.monotonic() > deadline:
                return _TIMEOUT


def window_size(prep: Preprocess, batch_size: int, workers: int, kernel: Kernel | None = None,
            device_jpegs: bool = False) -> int:
    """Images decoded ahead: enough to cover start-up and a few batches, about 64 MB of pixels
    (of tokens, when the decoders compute them). Files whose bytes go to the device are as large
    as they come (megabytes for a photo): a few batches of them."""
    if device_jpegs:
        return max(4 * batch_size, 4 * workers)
    per_image = prep.image_size * prep.image_size * prep.channels
    if kernel is not None:
        per_image = kernel.table.nbytes
    return max(2 * batch_size, 4 * workers, min(1024, (64 << 20) // per_image))


_BROKEN = object()
_STOPPED = object()
_TIMEOUT = object()
