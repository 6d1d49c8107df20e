"""What becomes of each input on its way through a run: small records, one kind per stage.

    Job ──decode──> Decoded ──encode──> Encoded ──sink──> Written
     └──────────────────────────────────────────────────> Failed | Skipped

A decoder process may go further than decoding (the numpy engine encodes, and writes per-image
files, where the pixels are): it then returns `Encoded` or `Written` itself. `Written`, `Failed`
and `Skipped` are final: they are what a run reports, one per input (`Outcome`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..images.inputs import Source

__all__ = ["Decoded", "Encoded", "Failed", "Job", "Outcome", "OutputFailed", "Skipped", "Summary", "Written", "job_of"]


@dataclass(frozen=True)
class Job:
    """One input to encode, and where its output goes.

    Attributes:
        output: the output file (a shard with --shard-size), or None for stdout.
        index: position among all inputs, counted from 0; picks the shard and row.
    """

    source: Source
    output: Path | None
    index: int = 0


@dataclass(frozen=True)
class Decoded:
    """Pixels to encode: (H, W, C) uint8, or a plain JPEG's bytes for the device to decode."""

    job: Job
    pixels: Any  # np.ndarray | images.PlainJpeg


@dataclass(frozen=True)
class Encoded:
    """Tokens to write, in the run's output dtype (bfloat16 as its uint16 bits), and their patch
    grid where each image has its own (`--resize native`)."""

    job: Job
    tokens: np.ndarray
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputFailed:
    """A write that failed in a decoder process (a full disk): it stops the run."""

    reason: str


class Outcome:
    """What a run reports for one input: Written, Failed or Skipped (one JSON line of --json)."""

    status: ClassVar[str]
    source: Source
    output: Path | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    row: int | None = None
    error: str | None = None
    grid: tuple[int, int] | None = None

    @property
    def input(self) -> Path:
        return self.source.path

    def record(self, output: str | None = None) -> dict[str, Any]:
        """The JSON line of this outcome; `output` as given, else the output path as text."""
        record = {
            "input": display_path(self.input),
            "output": output if output is not None else display_path(self.output),
            "shape": list(self.shape) if self.shape else None,
            "dtype": self.dtype,
            "status": self.status,
            "error": self.error,
        }
        if self.row is not None:  # --shard-size: the input's row in the shard `output`
            record["row"] = self.row
        if self.grid is not None:  # --resize native: the image's patch grid, rows x columns
            record["grid"] = list(self.grid)
        return record


@dataclass(frozen=True)
class Written(Outcome):
    status: ClassVar[str] = "ok"
    source: Source
    output: Path | None
    shape: tuple[int, ...]
    dtype: str
    nbytes: int = 0  # of the file; for a shard, on its first row only
    row: int | None = None
    grid: tuple[int, int] | None = None  # the image's own patch grid (--resize native)


@dataclass(frozen=True)
class Failed(Outcome):
    status: ClassVar[str] = "error"
    source: Source
    error: str
    job: Job | None = None  # for a shard: the row to leave empty
    output: Path | None = None  # for a shard: the shard that row is in (NaN in .npy; the error in Parquet, wds)
    row: int | None = None


def job_of(item: Any) -> Job | None:
    """The job of a planned item or an outcome: a Job itself, a `Failed`'s (with shards, a known
    bad input's row, which stays empty); None for what has none (a `Skipped`, a `Written`)."""
    return item if isinstance(item, Job) else getattr(item, "job", None)


@dataclass(frozen=True)
class Skipped(Outcome):
    status: ClassVar[str] = "skipped"
    source: Source
    output: Path | None
    shape: tuple[int, ...] | None
    dtype: str | None
    row: int | None = None


@dataclass
class Summary:
    """Counts of a finished (or stopped) run."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    bytes_written: int = 0
    elapsed: float = 0.0
    token_shape: tuple[int, ...] | None = None  # the last output's
    token_rows: tuple[int, int] | None = None  # the fewest and most rows written (--resize native: per image)
    stopped: str | None = None  # why the run stopped early: "interrupted", an output error, ...
    pipe_closed: bool = False  # the reader of stdout went away (-o -)
    device: str = "cpu"
    layer: str | None = None  # where the layer came from, for the user: random (seed N, preset), weights

    @property
    def total(self) -> int:
        return self.ok + self.errors + self.skipped

    def count(self, outcome: Outcome) -> None:
        if isinstance(outcome, Written):
            self.ok += 1
            self.bytes_written += outcome.nbytes
            self.token_shape = outcome.shape
            rows = outcome.shape[-2] if len(outcome.shape) >= 2 else None
            if rows is not None:
                low, high = self.token_rows or (rows, rows)
                self.token_rows = (min(low, rows), max(high, rows))
        elif isinstance(outcome, Skipped):
            self.skipped += 1
        else:
            self.errors += 1


def display_path(path: Path | str | None) -> str | None:
    """A path as text that any terminal or JSON reader can take: undecodable bytes as \\xNN.

    Two paths never share a text (the manifest tells inputs apart by it): a name that holds
    undecodable bytes, or the text \\x itself, has its backslashes doubled as well, so that the
    byte 0xE9 reads \\xe9 and the four characters \\xe9 read \\\\xe9. Every other name (plain
    UTF-8 without \\x) is its own text.
    """
    if path is None:
        return None
    raw = os.fsencode(os.fspath(path))
    text = raw.decode("utf-8", "backslashreplace")
    if "\\x" not in text:
        return text
    doubled = raw.decode("utf-8", "surrogateescape").replace("\\", "\\\\")
    return doubled.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
