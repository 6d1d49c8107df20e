"""An output folder's manifest.jsonl: opened for appending past a torn last line, and read a line
at a time (see `folder` for what its lines say).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError
from ..files.writes import describe_os_error
from .outcomes import display_path
from .plan import MadeFrom
from ..files.reads import NotRegularFile, open_record

__all__ = ["manifest_lines", "manifest_records", "open_manifest", "read_manifest"]

_LINE_LIMIT = 1 << 20  # bytes of one manifest line: far above any a run writes (a path, an error)


def open_manifest(path: Path):
    """Open manifest.jsonl for appending (a regular file, never through a link), first dropping
    a last line torn by a killed run, and a run of NUL bytes a crash left at its end."""
    try:
        fd = open_record(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    except NotRegularFile as exc:
        raise OutputError(f"{display_path(path)}: {exc}") from None
    except OSError as exc:
        raise OutputError(f"{display_path(path)}: {describe_os_error(exc)}") from None
    try:
        cut = _whole_end(fd, os.fstat(fd).st_size)
        if cut is not None:
            os.ftruncate(fd, cut)
            if cut and os.pread(fd, 1, cut - 1) != b"\n":  # a torn line too long to look back over
                os.write(fd, b"\n")
        return os.fdopen(fd, "a", encoding="utf-8")
    except OSError as exc:
        os.close(fd)
        raise OutputError(f"{display_path(path)}: {describe_os_error(exc)}") from None


def _whole_end(fd: int, size: int, block: int = 1 << 16) -> int | None:
    """Where a manifest's whole lines end (None: at its end already): past a trailing run of NUL
    bytes, and the torn line before it. Reads backwards a block at a time: bounded memory."""
    end = size
    while end:  # the NUL run
        chunk = os.pread(fd, min(block, end), end - min(block, end))
        kept = len(chunk.rstrip(b"\0"))
        end -= len(chunk) - kept
        if kept:
            break
    start, searched = end, 0
    while start and searched <= _LINE_LIMIT:  # the torn line: back to the last newline
        chunk = os.pread(fd, min(block, start), start - min(block, start))
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            start -= len(chunk) - newline - 1
            break
        start -= len(chunk)
        searched += len(chunk)
    else:
        if start:  # a torn "line" longer than any a run writes: passed over by readers as it is
            start = end
    return None if start == size else start


def read_manifest(path: Path) -> MadeFrom:
    """What each output was last made from, per a manifest.jsonl: output (relative to DIR) ->
    input, and for shards (shard, row) -> input. Unreadable lines (a torn last line, a NUL run)
    are passed over; a missing manifest gives {}. Read a line at a time (each at most
    `_LINE_LIMIT` bytes): memory follows the records, not the file.

    Raises:
        OutputError: it is a link, a FIFO, a folder, or cannot be read.
    """
    if not os.path.lexists(path):
        return MadeFrom()
    try:
        with os.fdopen(open_record(path, os.O_RDONLY), "rb") as f:
            return manifest_records(manifest_lines(f))
    except NotRegularFile as exc:
        raise OutputError(f"{display_path(path)}: {exc}") from None
    except OSError as exc:
        raise OutputError(f"{display_path(path)}: {describe_os_error(exc)}") from None


_BREAKS = re.compile(rb"[\n\0]+")  # a newline, or a run of NULs (a crash's tail): a line ends


def manifest_lines(f: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A manifest's lines, read a chunk at a time; a line longer than `_LINE_LIMIT` is passed over."""
    pending, overflow = b"", False
    while data := f.read(chunk):
        pieces = _BREAKS.split(pending + data)
        pending = pieces.pop()
        for piece in pieces:
            if piece and not overflow:
                yield piece
            overflow = False
        if len(pending) > _LINE_LIMIT:
            pending, overflow = b"", True
    if pending and not overflow:
        yield pending


def manifest_records(lines: Iterable[bytes | str]) -> MadeFrom:
    """`read_manifest` of a manifest's lines."""
    made = MadeFrom()
    latest: dict[str, object] = {}  # input -> its key in `made`, so that a later failure unsets it
    for line in lines:
        try:
            record = json.loads(line)
            source = record["input"]
            previous = latest.pop(source, None)
            if previous is not None and made.get(previous) == source:
                del made[previous]
            if record.get("status") == "error":
                made.failed.add(source)
            else:
                made.failed.discard(source)
            if record.get("status") in ("ok", "skipped") and record.get("output"):
                key = (record["output"], record["row"]) if "row" in record else record["output"]
                made[key] = source
                latest[source] = key
        except (ValueError, AttributeError, TypeError, KeyError):
            continue
    return made
