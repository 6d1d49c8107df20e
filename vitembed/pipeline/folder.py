"""An output folder (`-o DIR`): one configuration, one run at a time, and a record of every input.

- **run.json** holds its `schema` version, the configuration that decides the outputs' bytes
  (layer, weights fingerprint, preprocessing, format, dtype, shard size) and the versions and
  device that made them; a record of an older schema is upgraded to the current form
  (`_CONFIG_READERS`), then compared. A run whose configuration
  differs is refused (exit 2), unless `--overwrite`: then the outputs the old manifest lists are
  removed first, before run.json changes, so that a run stopped half-way leaves the old
  configuration with fewer files, never old outputs under a new run.json.
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
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError, OutputError
from ..files.writes import atomic_write, describe_folder_error, describe_os_error
from .manifest import manifest_lines, manifest_records, open_manifest, read_manifest
from .outcomes import Failed, Outcome, Written, display_path
from .plan import LOCK_FILE, RUN_FILE, nested_run
from ..files.reads import NotRegularFile, open_record

__all__ = ["LOCK_FILE", "MANIFEST_FILE", "RUN_FILE", "RUN_SCHEMA", "OutputFolder", "UriFolder", "manifest_records",
           "read_manifest"]

MANIFEST_FILE = "manifest.jsonl"
RUN_SCHEMA = 3  # run.json's version (see `_CONFIG_READERS`)
_BUFFERED = 1000  # failures held before the first output; past that the folder is made anyway


class _RunFolder:
    """What -o DIR and -o URI share: run.json checked against the configuration, another
    configuration's outputs removed (--overwrite) before anything is written, and run.json written
    with the first output. Each subclass says how its store does it: `_path(name)` (a file of the
    folder), `_old_output(rel)` (a manifest's output to remove, or None), `_delete(path)` and
    `_write(path, data)`."""

    record_data: dict

    def _start(self, name: str, previous: dict | Unreadable | None, config: dict, overwrite: bool,
               manifest: Callable[[], Iterable]) -> bool:
        """Check `previous` (run.json's configuration) against `config`; with --overwrite, remove
        the outputs the old `manifest` lists (inside the folder, with an output suffix), and the
        manifest. Returns whether the outputs were of another configuration."""
        replaced = _replaced(name, previous, config, overwrite)
        if replaced:
            for key in manifest():
                path = self._old_output(key[0] if isinstance(key, tuple) else key)
                if path is not None:
                    self._delete(path)
        if overwrite:
            self._delete(self._path(MANIFEST_FILE))
        return replaced

    def _write_run(self) -> None:
        self._write(self._path(RUN_FILE), (json.dumps(self.record_data, indent=2) + "\n").encode())


class OutputFolder(_RunFolder):
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
            self._start(display_path(folder), _read_run_config(folder), config, overwrite,
                        lambda: read_manifest(folder / MANIFEST_FILE))
            self.made_from = read_manifest(folder / MANIFEST_FILE)
        except OSError as exc:
            self.close()
            raise OutputError(f"{display_path(folder)}: {describe_folder_error(folder, exc)}") from None
        except BaseException:
            self.close()
            raise

    def _path(self, name: str) -> Path:
        return self.folder / name

    def _old_output(self, rel: str) -> Path | None:
        return removable(self.folder.resolve(), rel)

    def _delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        atomic_write(path, data)

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
        self._write_run()
        self._manifest = open_manifest(self.folder / MANIFEST_FILE)

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
            except OSError:  # a full disk: the lines that fit are whole, see open_manifest
                pass
            self._manifest = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None
            if self.created and os.listdir(self.folder) == [LOCK_FILE]:
                os.unlink(self.folder / LOCK_FILE)
                os.rmdir(self.folder)


class UriFolder(_RunFolder):
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
        previous = None if text is None else _run_config(text)
        replaced = self._start(store.uri, previous, config, overwrite,
                               lambda: manifest_records(manifest_lines(io.BytesIO(old))))
        self.started = text is not None and not replaced  # else run.json is written with the first output
        old = b"" if overwrite else old
        self.old = old[:old.rfind(b"\n") + 1]  # without a line torn by a killed run
        self.made_from = manifest_records(manifest_lines(io.BytesIO(self.old)))

    def _path(self, name: str) -> str:
        return f"{self.store.base}/{name}"

    def _old_output(self, rel: str) -> Path | str | None:
        if self.store.kind == "local":  # a linked subfolder must not lead the deletion outside
            return removable(Path(self.store.base).resolve(), rel)
        path = PurePosixPath(rel)
        if path.suffix.lower() in _OUTPUT_SUFFIXES and not path.is_absolute() and ".." not in path.parts:
            return self._path(rel)
        return None

    def _delete(self, path) -> None:
        self.store.delete(path)

    def _write(self, path, data: bytes) -> None:
        self.store.write(path, data)

    def record(self, outcome: Outcome) -> None:
        """Hold the outcome's manifest line; run.json is written with the first output."""
        self.lines.append(json.dumps(outcome.record(self.relative(outcome.output))) + "\n")
        if isinstance(outcome, Written) and not self.started:
            self._write_run()
            self.started = True

    def close(self) -> None:
        """Write the manifest, where the folder holds outputs."""
        if self.lines and self.started:
            self._write(self._path(MANIFEST_FILE), self.old + "".join(self.lines).encode())
            self.lines = []


_RUN_LIMIT = 1 << 20  # bytes of run.json read: far above any a run writes
_URI_MANIFEST_LIMIT = 1 << 30  # a manifest a driver reads into memory (about 5 million lines)
_OUTPUT_SUFFIXES = (".npy", ".pt", ".parquet", ".tar")  # .parquet, .tar: dataset shards (-o DIR only)


class Unreadable(str):
    """run.json's configuration where it cannot be read: the reason why."""


def _replaced(name: str, previous: dict | Unreadable | None, config: dict, overwrite: bool) -> bool:
    """Whether a folder's outputs are of another configuration (or of one its run.json no longer
    says), to be replaced (--overwrite).

    Raises:
        ConfigError: they are, without --overwrite.
    """
    config = json.loads(json.dumps(config))  # as run.json holds it: lists, not tuples
    if previous is None or previous == config:
        return False
    if not overwrite:
        if isinstance(previous, Unreadable):
            raise ConfigError(f"{name} holds outputs whose configuration cannot be told: its run.json is "
                              f"unreadable ({previous}); use another -o folder, or --overwrite to re-encode into it")
        from .configdiff import config_differences

        told, match = config_differences(previous, config)
        raise ConfigError(f"{name} holds outputs made with another configuration ({'; '.join(told)}); to add "
                          f"to it, run with {', '.join(match)}; else use another -o folder, or --overwrite to "
                          "re-encode into it")
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

    from .. import __version__

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version(), **{n: version(n) for n in ("torch", "numpy", "pillow")}}
    return {"schema": RUN_SCHEMA, "config": config, "vitembed": __version__, "versions": versions, "device": device}


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
    """run.json's configuration, read as its `schema` version says (`Unreadable` where it cannot be)."""
    if not text.strip():
        return Unreadable("it is empty")
    if len(text) > _RUN_LIMIT:
        return Unreadable(f"over {_RUN_LIMIT} bytes")
    try:
        record = json.loads(text)
        schema = record.get("schema", 1)
    except (ValueError, AttributeError):
        return Unreadable("not a JSON object")
    reader = _CONFIG_READERS.get(schema) if type(schema) is int else None
    if reader is None:
        return Unreadable(f"its schema is {schema!r}, which this vitembed cannot read (a newer one wrote it?)")
    config = reader(record)
    return config if isinstance(config, dict) else Unreadable("no configuration in it")


def _upgraded_from_2(record: dict) -> Any:
    """A configuration of schema 1 or 2 in schema 3's form. Those left out what was at its default:
    the layer's fields at theirs (`LayerConfig`), the preprocessing's image_width, max_patches and
    patch_size when None, shard_size when unset, tokens z0, pos_resample timm, and the steps of a
    ViT-book-style layer (`LayerConfig.steps`)."""
    from dataclasses import fields

    from ..layer.config import LayerConfig

    config = record.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("layer"), dict):
        return config
    defaults = {f.name: f.default for f in fields(LayerConfig)}
    layer = {**defaults, **config["layer"]}
    upgraded = {**config, "layer": layer, "shard_size": config.get("shard_size"), "tokens": config.get("tokens", "z0"),
                "pos_resample": config.get("pos_resample", "timm")}
    if isinstance(config.get("preprocess"), dict):
        upgraded["preprocess"] = {"image_width": None, "max_patches": None, "patch_size": None, **config["preprocess"]}
    if "steps" not in config:
        try:
            upgraded["steps"] = json.loads(json.dumps(LayerConfig.from_dict(layer).steps()))
        except (ConfigError, TypeError, ValueError):
            pass  # a layer this vitembed cannot build: it differs from this run's in any case
    return upgraded


# run.json's configuration by schema version, read into the form this vitembed writes (schema 3:
# every field of the layer and the preprocessing, and every run option that decides the bytes),
# so that an -o folder written by an earlier vitembed resumes when its configuration is this run's.
# 1: a run.json without "schema"; 2 adds the version itself; 3 records fields at their defaults.
_CONFIG_READERS: dict[int, Callable[[dict], Any]] = {
    1: lambda record: _renamed(_upgraded_from_2(record)),
    2: lambda record: _renamed(_upgraded_from_2(record)),
    3: lambda record: _renamed(record.get("config")),
}
# Names that changed in run.json's text without a change to the outputs: the old, and the new.
_RENAMED_SOURCES = (("seed VitInputLayer", "ViT book VitInputLayer"),)


def _renamed(config):
    """run.json's configuration with its weights' source in today's words (the same layer)."""
    weights = config.get("weights") if isinstance(config, dict) else None
    source = weights.get("source") if isinstance(weights, dict) else None
    if isinstance(source, str):
        for old, new in _RENAMED_SOURCES:
            source = source.replace(old, new)
        config = {**config, "weights": {**weights, "source": source}}
    return config
