"""What a decoder process is and does: its set-up, and its task for one input.

A decoder opens the file and decodes it with Pillow (`decode.load_image`). Where the layer runs
in numpy (the CPU's engine) it also computes z0 (`kernel.Kernel`), and for one-file-per-image
outputs writes the file itself (`sinks.FileWriter`): an image is then decoded, embedded and
written by one process, and only a short `Written` record crosses back. Otherwise it returns the
pixels (`Decoded`), or the tokens for a shard or stdout (`Encoded`). With `--decode gpu` it only
reads plain JPEGs' bytes, for the device to decode.

The ordered, crash- and timeout-proof pool that runs these tasks is `pool.OrderedPool`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, OutputError
from ..files.formats import cast
from ..images.decode import Preprocess, keep_pixel_blocks, load_image, read_plain_jpeg, set_pillow_limit
from ..layer.kernel import Kernel
from ..pipeline.outcomes import Decoded, Encoded, Failed, Job, OutputFailed, Written
from ..pipeline.sinks import FileWriter

__all__ = ["WorkerTask", "init_worker", "limit_memory", "tune_process"]


def init_worker(max_pixels: int = 0, numpy_engine: bool = False, run_pid: int | None = None) -> None:
    """Set up a decoder process (its own: nothing here reaches a program that imports vitembed)."""
    from .processes import exit_with

    if run_pid is not None:
        exit_with(run_pid)  # a killed run leaves no decoder behind
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
    tune_process(max_pixels, numpy_engine)


def tune_process(max_pixels: int = 0, numpy_engine: bool = False) -> None:
    """What a process that decodes and embeds images for a run sets for itself (a decoder, or a
    Ray actor, which keeps Ray's own signal handling, stderr and memory management)."""
    from ..layer.blas import set_blas_threads
    from .processes import keep_heap

    if max_pixels:
        set_pillow_limit(max_pixels)  # this process's Pillow: vitembed checks --max-pixels itself
    keep_pixel_blocks()
    keep_heap()
    if numpy_engine:
        set_blas_threads(1)  # one decoder per core already; see blas.py


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


@dataclass(frozen=True)
class WorkerTask:
    """A decoder's work for one job: decode; then encode with `kernel`, and write with `writer`,
    where given. Sent to each decoder process once (the kernel is megabytes).

    Attributes:
        kernel: the numpy engine's layer; None: return the pixels.
        dtype: of the tokens the kernel returns.
        writer: writes one file per image; None: return the tokens.
        device_jpegs: return plain JPEGs' bytes for the device to decode (`--decode gpu`).
        gate: shared by the run's decoders, so that their memory stays within one large image
            (up to about 8 bytes a pixel of --max-pixels) plus 16 megapixels' worth per decoder.
    """

    prep: Preprocess
    kernel: Kernel | None = None
    dtype: str = "float32"
    writer: FileWriter | None = None
    device_jpegs: bool = False
    gate: Any = None  # a multiprocessing lock: one large image decoded at a time (images.LARGE_PIXELS)

    def __call__(self, job: Job) -> Decoded | Encoded | Written | Failed | OutputFailed:
        path = job.source.path
        if self.device_jpegs:
            jpeg = read_plain_jpeg(path, self.prep)
            if jpeg is not None:
                return Decoded(job, jpeg)
        strains: list[str] = []
        try:
            pixels = load_image(path, self.prep, self.gate, strains)
        except InputError as exc:
            return Failed(job.source, str(exc), job)
        if strains:  # told with the outcome, for the run's one note
            job = dataclasses.replace(job, source=dataclasses.replace(job.source, strain=strains[0]))
        if self.kernel is None:
            return Decoded(job, pixels)
        tokens = cast(self.kernel(pixels), self.dtype)
        grid = self.kernel.grid_of(pixels.shape) if self.kernel.grids is not None else None  # native: its own
        if self.writer is None:
            return Encoded(job, tokens, grid)
        try:
            return self.writer.write(job, tokens, grid)
        except OutputError as exc:  # a full disk, say: it stops the run, in the parent
            return OutputFailed(str(exc))
