"""An output folder (`-o DIR`): one configuration, one run at a time, and a record of every input.

- **run.json** holds the configuration that decides the outputs' bytes (layer, weights
  fingerprint, preprocessing, format, dtype, shard size) and the versions and device that made
  them. A run whose configuration differs is refused (exit 2), unless `--overwrite`: then the
  outputs the old manifest lists are removed first, before run.json changes, so that a run stopped
  half-way leaves the old configuration with fewer files, never old outputs under a new run.json.
- **manifest.jsonl** gets one JSON line per input as it finishes (`input`, `output` relative to
  DIR, `shape`, `dtype`, `status`, `error`, and `row` for shards); on a resumed run the last line
  for an input is the current one. A last line torn by a killed run is dropped on the next run.
- **.vitembed.lock** holds an advisory lock (`flock`) while a run writes into DIR: a second run
  into the same folder is refused with the first one's PID.
- Nothing is left behind by a run that wrote no output: a folder it created is removed again,
  and run.json and the manifest are written with the first output.
Every file here is opened without following links: a planted symbolic link is refused.

`-o URI` (on Ray) is a `UriFolder`: the same run.json and manifest, through pyarrow (`uris.Store`).
"""

from __future__ import annotations

import io
import errno
import json
import os
import platform
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .errors import ConfigError, OutputError
from .files import atomic_write, describe_folder_error, describe_os_error
from .outcomes import Failed, Outcome, Written, display_path
from .outputs import LOCK_FILE, RUN_FILE, MadeFrom, nested_run
from .safeio import NotRegularFile, open_record

__all__ = ["LOCK_FILE", "MANIFEST_FILE", "RUN_FILE", "OutputFolder", "UriFolder", "manifest_records", "read_manifest"]

MANIFEST_FILE = "manifest.jsonl"
_BUFFERED = 1000  # failures held before the first output; past that the folder is made anyway


class OutputFolder:
    """-o DIR for one run: locked, checked against `config`, recording each outcome.

    Args:
        folder: DIR.
        config: what decides the outputs' bytes (see `run_record`); compared with run.json's.
        record: written as run.json with the first output: {"config": config, versions, device}.
        relative: maps an output path to the manifest's text (relative to DIR).
        overwrite: re-encode into a folder of another configuration, removing its old outputs.

    Raises:
        ConfigError: DIR holds another configuration's outputs, or another run writes into it.
        OutputError: DIR cannot be made, or a file in it is a link or cannot be written.
    """

    def __init__(self, folder: Path, config: dict, record: dict, relative, overwrite: bool = False):
        self.folder, self.config, self.record_data, self.relative = folder, config, record, relative
        self.created = not os.path.lexists(folder)
        self._manifest = None
        self._pending: list[str] = []
        self._lock = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(folder)
            refuse_nesting(folder)
            previous = _read_run_config(folder)
            if _replaced(display_path(folder), previous, config, overwrite):
                self._remove_old_outputs()
            elif overwrite:
                (folder / MANIFEST_FILE).unlink(missing_ok=True)
            self.made_from = read_manifest(folder / MANIFEST_FILE)
        except OSError as exc:
            self.close()
            raise OutputError(f"{display_path(folder)}: {describe_folder_error(folder, exc)}") from None
        except BaseException:
            self.close()
            raise

    def _remove_old_outputs(self) -> None:
        """Remove the outputs the old manifest lists (inside DIR, with an output suffix), then it."""
        root = self.folder.resolve()
        for key in read_manifest(self.folder / MANIFEST_FILE):
            path = removable(root, key[0] if isinstance(key, tuple) else key)
            if path is not None:
                path.unlink(missing_ok=True)
        (self.folder / MANIFEST_FILE).unlink(missing_ok=True)

    def _remove_stale(self, outcome: Outcome) -> None:
        """A failed input's output of an earlier run (the manifest gave it to this input) is
        removed: its tokens are not this input's now. Shards are the sink's (`ShardSink`)."""
        job = getattr(outcome, "job", None)
        if not isinstance(outcome, Failed) or job is None or job.output is None:
            return
        rel = self.relative(job.output)
        if self.made_from.get(rel) != display_path(outcome.input) or job.output.suffix.lower() not in _OUTPUT_SUFFIXES:
            return
        path = removable(self.folder.resolve(), rel)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def record(self, outcome: Outcome) -> None:
        """Append the outcome's manifest line (run.json and the manifest start with the first output);
        a failed input's earlier output goes (`_remove_stale`)."""
        self._remove_stale(outcome)
        line = json.dumps(outcome.record(self.relative(outcome.output))) + "\n"
        if self._manifest is None:
            self._pending.append(line)
            if not isinstance(outcome, Written) and len(self._pending) < _BUFFERED:
                return
            self._open()
            line = "".join(self._pending)
            self._pending = []
        try:
            self._manifest.write(line)
            self._manifest.flush()
        except OSError as exc:
            raise OutputError(f"{display_path(self.folder / MANIFEST_FILE)}: {describe_os_error(exc)}") from None

    def _open(self) -> None:
        atomic_write(self.folder / RUN_FILE, (json.dumps(self.record_data, indent=2) + "\n").encode())
        self._manifest = _open_manifest(self.folder / MANIFEST_FILE)

    def close(self) -> None:
        """Close the manifest and release the lock; a folder this run made and left empty goes."""
        if self._pending and not (self.created and os.listdir(self.folder) == [LOCK_FILE]):
            try:  # outcomes without an output (skipped, failed) into a folder that holds outputs
                self._open()
                self._manifest.write("".join(self._pending))
            except (OSError, OutputError):
                pass
            self._pending = []
        if self._manifest is not None:
            try:
                self._manifest.close()
            except OSError:  # a full disk: the lines that fit are whole, see _open_manifest
                pass
            self._manifest = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None
            if self.created and os.listdir(self.folder) == [LOCK_FILE]:
                os.unlink(self.folder / LOCK_FILE)
                os.rmdir(self.folder)


class UriFolder:
    """-o URI for one run (`uris.Store`), as `OutputFolder` is for -o DIR: run.json checked, and
    written with the first output; the manifest read, and written whole when the run ends, its
    earlier lines and this run's (object stores cannot append). There is no lock (object stores
    have none): one run at a time into a URI folder is the user's care. Arguments as `OutputFolder`'s.
    """

    def __init__(self, store, config: dict, record: dict, relative, overwrite: bool = False):
        self.store, self.record_data, self.relative = store, record, relative
        self.lines: list[str] = []
        text = store.read(self._path(RUN_FILE), _RUN_LIMIT)
        old = store.read(self._path(MANIFEST_FILE), _URI_MANIFEST_LIMIT) or b""
        replaced = _replaced(store.uri, None if text is None else _run_config(text), config, overwrite)
        self.started = text is not None and not replaced  # else run.json is written with the first output
        if replaced:  # the old outputs the manifest lists (inside the folder, with an output suffix)
            local = Path(store.base).resolve() if store.kind == "local" else None
            for key in manifest_records(manifest_lines(io.BytesIO(old))):
                rel = PurePosixPath(key[0] if isinstance(key, tuple) else key)
                if local is not None:  # a linked subfolder must not lead the deletion outside
                    path = removable(local, str(rel))
                    if path is not None:
                        store.delete(path)
                elif rel.suffix.lower() in _OUTPUT_SUFFIXES and not rel.is_absolute() and ".." not in rel.parts:
                    store.delete(self._path(str(rel)))
        if overwrite:
            store.delete(self._path(MANIFEST_FILE))
            old = b""
        self.old = old[:old.rfind(b"\n") + 1]  # without a line torn by a killed run
        self.made_from = manifest_records(manifest_lines(io.BytesIO(self.old)))

    def _path(self, name: str) -> str:
        return f"{self.store.base}/{name}"

    def record(self, outcome: Outcome) -> None:
        """Hold the outcome's manifest line; run.json is written with the first output."""
        self.lines.append(json.dumps(outcome.record(self.relative(outcome.output))) + "\n")
        if isinstance(outcome, Written) and not self.started:
            self.store.write(self._path(RUN_FILE), (json.dumps(self.record_data, indent=2) + "\n").encode())
            self.started = True

    def close(self) -> None:
        """Write the manifest, where the folder holds outputs."""
        if self.lines and self.started:
            self.store.write(self._path(MANIFEST_FILE), self.old + "".join(self.lines).encode())
            self.lines = []


_RUN_LIMIT = 1 << 20  # bytes of run.json read: far above any a run writes
_URI_MANIFEST_LIMIT = 1 << 30  # a manifest a driver reads into memory (about 5 million lines)
_LINE_LIMIT = 1 << 20  # bytes of one manifest line: far above any a run writes (a path, an error)
_OUTPUT_SUFFIXES = (".npy", ".pt")


class Unreadable(str):
    """run.json's configuration where it cannot be read: the reason why."""


def _replaced(name: str, previous: dict | Unreadable | None, config: dict, overwrite: bool) -> bool:
    """Whether a folder's outputs are of another configuration (or of one its run.json no longer
    says), to be replaced (--overwrite).

    Raises:
        ConfigError: they are, without --overwrite.
    """
    if previous is None or previous == config:
        return False
    if not overwrite:
        if isinstance(previous, Unreadable):
            raise ConfigError(f"{name} holds outputs whose configuration cannot be told: its run.json is "
                              f"unreadable ({previous}); use another -o folder, or --overwrite to re-encode into it")
        raise ConfigError(f"{name} holds outputs made with another configuration "
                          f"({'; '.join(_differences(previous, config)) or 'unreadable run.json'}); "
                          "use another -o folder, or --overwrite to re-encode into it")
    return True


def removable(root: Path, rel: str) -> Path | None:
    """An output a manifest lists, to remove: `root / rel` where it has an output suffix and its
    folder resolves inside `root` (resolved); a link there is removed itself, never its target."""
    path = root / rel
    if path.suffix.lower() not in _OUTPUT_SUFFIXES:
        return None
    try:
        parent = path.parent.resolve()
    except (OSError, RuntimeError):
        return None
    return parent / path.name if parent == root or root in parent.parents else None


def refuse_nesting(folder: Path) -> None:
    """Refuse -o DIR inside another run's output folder: their manifests and run.json would each
    cover the other's files, and a resume of the outer run would take the inner run's outputs for
    its own. (A folder that holds another run's folder is refused input by input, as its outputs
    reach it: `nested_run`.)

    Raises:
        ConfigError: a folder above DIR holds another run's outputs, or another run is writing into it.
    """
    for above in folder.resolve().parents:
        found = nested_run(above)
        if found is not None:
            raise ConfigError(f"{display_path(folder)} is inside {display_path(above)}, the output folder of another "
                              f"vitembed run ({found}): their outputs would mix; use an -o folder outside it")


def run_record(config: dict, device: str) -> dict[str, Any]:
    """run.json: the configuration, and what made the outputs (not compared between runs)."""
    from importlib import metadata

    from . import __version__

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version(), **{n: version(n) for n in ("torch", "numpy", "pillow")}}
    return {"config": config, "vitembed": __version__, "versions": versions, "device": device}


def _lock(folder: Path) -> int:
    """Hold DIR's lock file (created without following links), or say which run holds it."""
    try:
        fd = open_record(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    except NotRegularFile as exc:
        raise OutputError(f"{display_path(folder / LOCK_FILE)}: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the folder exists, yet its new file does not: /proc, /sys
            raise OutputError(f"{display_path(folder)}: {describe_folder_error(folder, exc)}") from None
        raise OutputError(f"{display_path(folder / LOCK_FILE)}: {describe_os_error(exc)}") from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one run per folder is then the user's care
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{display_path(folder)} is being written by another vitembed run (PID {holder}); "
                          "wait for it to finish, or use another -o folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_run_config(folder: Path) -> dict | Unreadable | None:
    """run.json's configuration; None without one; `Unreadable` for one that cannot be read."""
    path = folder / RUN_FILE
    if not os.path.lexists(path):
        return None
    try:
        with os.fdopen(open_record(path, os.O_RDONLY), "rb") as f:
            return _run_config(f.read(_RUN_LIMIT + 1))
    except NotRegularFile as exc:
        return Unreadable(str(exc))
    except OSError as exc:
        return Unreadable(describe_os_error(exc))


def _run_config(text: bytes) -> dict | Unreadable:
    """run.json's configuration (`Unreadable` where it cannot be read)."""
    if not text.strip():
        return Unreadable("it is empty")
    if len(text) > _RUN_LIMIT:
        return Unreadable(f"over {_RUN_LIMIT} bytes")
    try:
        config = json.loads(text).get("config")
    except (ValueError, AttributeError):
        return Unreadable("not a JSON object")
    return config if isinstance(config, dict) else Unreadable("no configuration in it")


def _open_manifest(path: Path):
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


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out
