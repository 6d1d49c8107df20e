"""Where tokens go: one file per image, stdout, or shards of K images. One interface for all three.

A sink takes `Encoded` tokens (`put`) and the failures that pass it by (`failed`: a shard leaves
that input's row NaN), and yields each input's final outcome once it is final: `Written` when its
file is complete on disk. Outcomes come out in the order their writes were handed in. Writes run
in writer threads (a GPU outruns a few), at most `max_pending` batches' worth at once, so memory
stays bounded; `finish` waits for the rest, and writes nothing partial after a stop.

The one per-image write is `FileWriter.write`: the main process's writer threads call it, and so
do the decoder processes when they compute the tokens themselves (the numpy engine), so that no
tokens cross between processes for nothing. Either way the file appears atomically.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import OutputError, StdoutClosed
from ..files.writes import Cleaner, atomic_write, describe_os_error, silence_stream
from ..files.formats import tensor_bytes, write_tensor
from .outcomes import Encoded, Failed, Job, Outcome, Written, display_path
from .plan import shard_path

__all__ = ["FileSink", "FileWriter", "ShardSink", "Sink", "StdoutSink", "writer_threads"]

NAME_MAX = 255  # bytes of a file name on every common file system


def writer_threads(requested: int | None = None) -> int:
    """Writer threads: one per core, 2 to 16, unless set (one np.save of a vit-b16 z0 is ~0.5 ms)."""
    return requested or max(2, min(16, os.cpu_count() or 1))


@dataclass(frozen=True)
class FileWriter:
    """Writes one input's tokens to its own file, atomically. Small and picklable: it runs in the
    writer threads, or in a decoder process.

    Attributes:
        root: with -o DIR, the folder every output must stay inside (resolved, links followed).
        store: with -o URI, the `uris.Store` that writes the files.
        cleaner: the run's (`writes.Cleaner`): one writer per run.
        inside: the folders checked to be inside `root`, and the answers: a folder holds many
            outputs. This run's and this process's, as a link may be planted between runs.
    """

    fmt: str
    dtype: str
    root: Path | None = None
    store: Any = None
    cleaner: Cleaner = field(default_factory=Cleaner, repr=False, compare=False)
    inside: dict = field(default_factory=dict, repr=False, compare=False)

    def write(self, job: Job, tokens: np.ndarray, grid: tuple[int, int] | None = None) -> Written | Failed:
        """The input's file written; Failed when this input's output cannot be (its name is too
        long, or its folder leads outside -o DIR). `grid`: the image's own (native), for its record.

        Raises:
            OutputError: a failure every output would meet (full disk, read-only folder): the run stops.
        """
        path = job.output
        if len(os.fsencode(path.name)) > NAME_MAX:
            return Failed(job.source, f"its output name is too long ({len(os.fsencode(path.name))} bytes, "
                                      f"at most {NAME_MAX}): {path.name[:40]}...", job)
        if self.root is not None and not _inside(path.parent, self.root, self.inside):
            return Failed(job.source, f"its output folder {path.parent} leads outside {self.root} "
                                      "(a symbolic link?); nothing was written", job)
        nbytes = write_file(path, lambda f: write_tensor(f, tokens, self.fmt, self.dtype), self.store, self.cleaner)
        return Written(job.source, path, tuple(tokens.shape), self.dtype, nbytes, grid=grid)


def write_file(path: Path, data, store=None, cleaner: Cleaner | None = None) -> int:
    """A whole file, atomically: `writes.atomic_write` (with the run's `cleaner`), or the
    `uris.Store` of -o URI."""
    return atomic_write(path, data, cleaner) if store is None else store.write(path, data)


def _inside(folder: Path, root: Path, checked: dict[Path, bool]) -> bool:
    """Whether `folder` (made if missing) resolves to `root` or below it. Its nearest existing
    folder is checked before anything is made, so that no folder is created through a link that
    leads outside. Checked once per folder in `checked` (a run's)."""
    if folder not in checked:
        # Without DIR yet, all below it is new (another writer may make it meanwhile: looked at first).
        rooted = os.path.lexists(root)
        existing = folder
        while not os.path.lexists(existing) and existing.parent != existing:
            existing = existing.parent
        if rooted and not _resolves_inside(existing, root):
            checked[folder] = False
            return False
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return True  # atomic_write reports why it cannot be made
        checked[folder] = _resolves_inside(folder, root)
    return checked[folder]


def _resolves_inside(folder: Path, root: Path) -> bool:
    resolved = folder.resolve()
    return resolved == root or root in resolved.parents



class Sink:
    """The interface; see the module docstring."""

    def put(self, item: Encoded) -> Iterator[Outcome]:
        raise NotImplementedError

    def failed(self, outcome: Failed) -> Iterator[Outcome]:
        yield outcome

    def finish(self, complete: bool = True) -> Iterator[Outcome]:
        return iter(())

    def salvage(self) -> Iterator[Outcome]:
        """After a write failed and stopped the run: the outcomes of the writes that did complete."""
        writes = getattr(self, "writes", None)
        return writes.salvage() if writes is not None else iter(())

    def close(self) -> None:
        pass


class _Writes:
    """Writes in threads, their outcomes taken back in the order they were handed in."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vitembed-write")
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, fn, *args) -> Iterator[Outcome]:
        self.pending.append(self.pool.submit(fn, *args))
        yield from self._take(lambda: len(self.pending) > self.max_pending)

    def done(self, block: bool = False) -> Iterator[Outcome]:
        """Outcomes of the writes that are finished, oldest first (all of them when `block`)."""
        return self._take(lambda: block)

    def _take(self, wait) -> Iterator[Outcome]:
        while self.pending and (wait() or self.pending[0].done()):
            result = self.pending.popleft().result()  # an OutputError stops the run
            yield from result if isinstance(result, list) else [result]

    def salvage(self) -> Iterator[Outcome]:
        """After a failed write stopped the run: the outcomes of the other writes that completed."""
        while self.pending:
            try:
                yield from self._take(lambda: True)
            except OutputError:
                continue

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class FileSink(Sink):
    """One file per input (`FileWriter`), written by writer threads."""

    def __init__(self, writer: FileWriter, threads: int | None = None, max_pending: int = 64):
        self.writer = writer
        self.writes = _Writes(writer_threads(threads), max_pending)

    def put(self, item: Encoded) -> Iterator[Outcome]:
        return self.writes.submit(self.writer.write, item.job, item.tokens, item.grid)

    def finish(self, complete: bool = True) -> Iterator[Outcome]:
        return self.writes.done(block=True)

    def close(self) -> None:
        self.writes.close()


class StdoutSink(Sink):
    """The one tensor of `-o -`, as .npy or .pt bytes on a binary stream."""

    def __init__(self, fmt: str, dtype: str, stream: BinaryIO | None = None):
        self.fmt, self.dtype = fmt, dtype
        self.stream = stream or sys.stdout.buffer

    def put(self, item: Encoded) -> Iterator[Outcome]:
        data = memoryview(tensor_bytes(item.tokens, self.fmt, self.dtype))
        try:
            # A write cut short by the reader leaving returns a partial count instead of raising:
            # loop, so that the next write reports the closed pipe.
            while data:
                data = data[self.stream.write(data):]
            self.stream.flush()
        except BrokenPipeError:
            raise StdoutClosed("stdout was closed before the tensor was fully written") from None
        except OSError as exc:  # a full disk behind a redirection, say
            silence_stream(self.stream)
            raise OutputError(f"stdout: {describe_os_error(exc)}") from None
        yield Written(item.job.source, None, tuple(item.tokens.shape), self.dtype, len(data.obj), grid=item.grid)


class ShardSink(Sink):
    """Shards of K inputs: input i is row i % K of shard i // K. A shard is a `(K, N+1, D)` .npy
    file (a failed input leaves a NaN row), a Parquet table (a failed input's row holds its
    error) or a WebDataset tar (a failed input has no sample): `files.tables`.

    A shard is written once every one of its inputs is done, by a writer thread, atomically; its
    rows are held until then, as a dict of the rows received (so a large K with few inputs costs
    only what arrived). The last shard has only the rows it needs.

    Args:
        fmt: npy, parquet or wds.
        shape: a row's tokens, (N+1, D), or (None, D) where each image has its own (native).
        record: the run's record (run.json), for a Parquet shard's schema metadata.
    """

    def __init__(self, folder: Path, size: int, dtype: str, threads: int | None = None, store=None, *,
                 fmt: str = "npy", shape: tuple | None = None, record: dict | None = None):
        self.folder, self.size, self.dtype, self.store = folder, size, dtype, store
        self.fmt, self.shape, self.record = fmt, shape, record
        self.cleaner = Cleaner()
        self.writes = _Writes(writer_threads(threads), max_pending=2)
        self.shards: dict[int, _Shard] = {}
        self.last_index = -1  # the largest input index seen, for the last shard's length

    def path(self, shard: int) -> Path:
        return shard_path(self.folder, shard, self.fmt)

    def put(self, item: Encoded) -> Iterator[Outcome]:
        return self._resolve(item.job, (item.tokens, item.grid))

    def failed(self, outcome: Failed) -> Iterator[Outcome]:
        if outcome.job is None:
            yield outcome
            return
        index, row = divmod(outcome.job.index, self.size)
        yield replace(outcome, output=self.path(index), row=row)  # the manifest says where its row is
        yield from self._resolve(outcome.job, outcome.error)

    def _resolve(self, job: Job, result: tuple | str) -> Iterator[Outcome]:
        """Take one row: (tokens, grid), or the input's error."""
        index, row = divmod(job.index, self.size)
        self.last_index = max(self.last_index, job.index)
        shard = self.shards.setdefault(index, _Shard())
        shard.resolved += 1
        (shard.failed if isinstance(result, str) else shard.rows)[row] = (job, result)
        if shard.resolved == self.size:
            yield from self._write(index, self.size)
        else:
            yield from self.writes.done()

    def _write(self, index: int, rows: int) -> Iterator[Outcome]:
        shard = self.shards.pop(index)
        if not shard.rows and self.fmt != "parquet":  # every input failed: nothing to write, as for single
            _remove_file(self.path(index), self.store)  # files, and no earlier run's rows left looking current
            return
        yield from self.writes.submit(_write_shard, self.path(index), rows, shard, self, self.cleaner)

    def finish(self, complete: bool = True) -> Iterator[Outcome]:
        if complete:  # the last shard has fewer rows; after a stop, unfinished shards are not written
            for index in sorted(self.shards):
                yield from self._write(index, min(self.size, self.last_index + 1 - index * self.size))
        yield from self.writes.done(block=True)

    def close(self) -> None:
        self.writes.close()


def _remove_file(path: Path, store=None) -> None:
    """Remove an earlier run's output, if there (a link itself, never its target)."""
    if store is not None:
        store.delete(path)
        return
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass
class _Shard:
    resolved: int = 0  # rows filled or failed
    rows: dict[int, tuple[Job, tuple]] = field(default_factory=dict)  # row -> (job, (tokens, grid))
    failed: dict[int, tuple[Job, str]] = field(default_factory=dict)  # row -> (job, its error)


def _write_shard(path: Path, length: int, shard: _Shard, sink: ShardSink, cleaner: Cleaner | None = None) -> list[Outcome]:
    """Write a shard in the sink's format, and report each row written."""
    if sink.fmt == "npy":  # stacked, NaN where an input failed
        first = next(iter(shard.rows.values()))[1][0]
        array = np.full((length, *first.shape), np.nan, dtype=first.dtype)
        for row, (_, (tokens, _)) in shard.rows.items():
            array[row] = tokens
        write = lambda f: write_tensor(f, array, "npy")  # noqa: E731
    else:
        from ..files.tables import write_parquet, write_tar

        rows = [_table_row(job, result) for _, (job, result) in sorted({**shard.rows, **shard.failed}.items())]
        write = ((lambda f: write_parquet(f, rows, sink.shape, sink.dtype, sink.record)) if sink.fmt == "parquet"
                 else (lambda f: write_tar(f, rows)))
    nbytes = write_file(path, write, sink.store, cleaner)
    return [Written(job.source, path, tuple(tokens.shape), sink.dtype, nbytes if i == 0 else 0, row, grid)
            for i, (row, (job, (tokens, grid))) in enumerate(sorted(shard.rows.items()))]


def _table_row(job: Job, result: tuple | str):
    """A dataset shard's row (`tables.Row`) of an input's (tokens, grid), or of its error."""
    from ..files.tables import Row

    source = job.source
    common = dict(index=job.index, key=input_key(source), input=display_path(source.path), meta=source.meta)
    if isinstance(result, str):
        return Row(**common, error=result)
    return Row(**common, tokens=result[0], grid=result[1])


def input_key(source) -> str:
    """An input's name in a dataset output: its path under the inputs' folder, without an image's
    suffix (`photos/cat.png` -> `cat`; a dataset sample's rel, `SHARD.tar/KEY`, as it is)."""
    from ..images.decode import image_extensions

    rel = source.rel
    return display_path(rel.with_suffix("") if rel.suffix.lower() in image_extensions() else rel)
