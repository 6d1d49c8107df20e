"""Where each input's tokens go, and which inputs a resumed run can skip.

`OutputPlan` maps inputs to output paths; `plan_jobs` turns the stream of inputs into jobs, in
input order, deciding on the way which ones need no work (`Skipped`) or cannot be done (`Failed`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import DATASET_FORMATS, unknown
from ..errors import ConfigError
from ..files.digests import DigestSet
from ..files.formats import FORMATS, describe_output
from ..images.inputs import Source
from .outcomes import Failed, Job, Skipped, display_path
from ..files.reads import NotRegularFile, open_record
from ..files.uris import Store, is_uri

__all__ = ["FILE_SUFFIXES", "LOCK_FILE", "MadeFrom", "RUN_FILE", "OutputPlan", "Resume", "nested_run", "plan_jobs",
           "shard_path"]

RUN_FILE = "run.json"  # an -o folder's configuration (`folder.OutputFolder`)
LOCK_FILE = ".vitembed.lock"  # held while a run writes into an -o folder

FILE_SUFFIXES = {"npy": "npy", "pt": "pt", "pth": "pt"}  # -o FILE's suffix -> its format; .pth is torch's other name


@dataclass
class OutputPlan:
    """Maps each input to its output path.

    Modes: `beside` (no -o: next to the input), `dir` (-o DIR: the input's relative path under
    DIR; a folder that exists, ends with /, or has no suffix), `file` (-o FILE.npy / FILE.pt /
    FILE.pth: exactly there, one input only) and `stdout` (-o -). `-o NAME.parquet` is a folder
    (`dir`) of Parquet shards. Any other suffix is refused: `-o cat.npz` is a mistake far more
    often than a folder's name.

    Two inputs that would map to the same output both get their own file: the first keeps the
    plain name (`pet.npy`), each later one keeps its own extension too (`pet.png.npy`), then a
    counter (`pet.png.1.npy`) if even that is taken.

    `-o URI` (s3://, gs://, hdfs://, file://; on Ray) is a folder in pyarrow's filesystem for it
    (`store`, a `uris.Store`); `target` and the output paths are then that filesystem's paths.
    """

    mode: str
    fmt: str
    target: Path | None = None
    store: Any = None
    fresh: bool = False  # -o DIR did not exist when planned: nothing in it can be an earlier output
    record: dict | None = None  # the run's record (run.json), for outputs that carry it (Parquet)
    _claimed: DigestSet = field(default_factory=DigestSet, repr=False)
    _present: DigestSet | None = field(default=None, repr=False)  # a store's files, listed once
    _nested: dict = field(default_factory=dict, repr=False)  # folder -> another run's folder in it (`nested`)

    @classmethod
    def from_option(cls, out: str | None, fmt: str | None) -> OutputPlan:
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(unknown("format", fmt, FORMATS))
        if out is None:
            return cls("beside", fmt or "npy")
        if out == "-":
            return cls("stdout", fmt or "npy")
        # NAME.parquet is a dataset: a folder of Parquet shards, with its run.json and manifest
        parquet = Path(out.rstrip("/" + os.sep)).suffix.lower() == ".parquet"
        if parquet and fmt not in (None, "parquet"):
            raise ConfigError(f"-o {out} names a Parquet dataset but --format is {fmt}")
        if is_uri(out):
            store = Store.open(out)
            return cls("dir", "parquet" if parquet else fmt or "npy", Path(store.base), store)
        path = Path(out)
        suffix = path.suffix.lower().lstrip(".")
        if parquet:
            return cls("dir", "parquet", path, fresh=not os.path.lexists(path))
        # A folder exists, or ends with /, or has no suffix; any other suffix names a file.
        if not suffix or path.is_dir() or out.endswith(("/", os.sep)):
            return cls("dir", fmt or "npy", path, fresh=not os.path.lexists(path))
        if suffix not in FILE_SUFFIXES:
            raise ConfigError(f"-o {out}: vitembed writes .npy or .pt files, not .{suffix}; give "
                              f"-o {path.with_suffix('.npy')} or -o {path.with_suffix('.pt')} for one input, "
                              f"or -o {out}/ for a folder")
        if fmt in DATASET_FORMATS:
            raise ConfigError(f"--format {fmt} writes shards into a folder; give -o {path.with_suffix('')}/ "
                              "(or -o NAME.parquet for Parquet)")
        if fmt is not None and fmt != FILE_SUFFIXES[suffix]:
            raise ConfigError(f"-o {out} names a .{suffix} file but --format is {fmt}")
        return cls("file", FILE_SUFFIXES[suffix], path)

    def assign(self, source: Source) -> Path | None:
        """The output path for `source` (None for stdout), unique within this run."""
        if self.mode == "stdout":
            return None
        if self.mode == "file":
            return self.target
        # A dataset's sample or row (`reads.Held`) goes beside its shard or table, in a folder of its name.
        base = self.target / source.rel if self.mode == "dir" else Path(getattr(source.path, "beside", None) or source.path)
        stem = base.with_suffix("") if base.suffix else base
        candidates = [stem.with_name(f"{stem.name}.{self.fmt}"), base.with_name(f"{base.name}.{self.fmt}")]
        for path in candidates:
            if self._claim(path):
                return path
        n = 1
        while not self._claim(path := base.with_name(f"{base.name}.{n}.{self.fmt}")):
            n += 1
        return path

    def exists(self, path: Path) -> bool:
        """Whether an output path is taken (by anything: a file, a link, a folder)."""
        if self.store is None:
            # One lstat an input (a few percent of a run on small images) is spared in a new
            # folder: the folder lock keeps other runs out, and this run's own names are unique.
            return not self.fresh and os.path.lexists(path)
        if self.store.kind == "local":  # asked of the path alone: a listing would follow links without end
            return os.path.lexists(path)
        if self._present is None:
            self._present = DigestSet()
            for name in self.store.files():
                self._present.add(name)
        return os.fspath(path) in self._present

    def header(self, path: Path) -> tuple[tuple[int, ...], str] | str:
        """An existing output's shape and dtype, or why it is not a whole output (`formats.describe_output`):
        a symbolic link is never one."""
        if self.store is None or self.store.kind == "local":
            return "a symbolic link, which is never an output" if os.path.islink(path) else describe_output(path)
        return self.store.header(path)

    def nested(self, path: Path) -> str | None:
        """Another run's output folder between -o DIR and an output of it (`nested_run`), or None.
        Each folder is looked at once."""
        if self.mode != "dir" or self.fresh or self.store is not None:
            return None
        folder = path.parent
        if folder not in self._nested:
            found = None
            if folder != self.target and self.target in folder.parents:
                found = self.nested(folder) or nested_run(folder)
            self._nested[folder] = found
        return self._nested[folder]

    def _claim(self, path: Path) -> bool:
        return self._claimed.add(os.path.normcase(os.path.abspath(path)))

    def relative(self, path: Path | None) -> str | None:
        """An output path as the manifest records it: relative to -o DIR where it lies inside."""
        if path is None:
            return None
        if self.target is not None and self.mode == "dir":
            try:
                return display_path(path.relative_to(self.target))
            except ValueError:
                pass
        return display_path(path)


class MadeFrom(dict):
    """What a manifest says each output was made from (`folder.read_manifest`), and the inputs
    whose last line there is an error (`failed`): their outputs, if any are left, are not current."""

    def __init__(self, made: dict | None = None, failed: set | None = None):
        super().__init__(made or {})
        self.failed = failed if failed is not None else set()


@dataclass
class Resume:
    """What a run may skip (`--skip-existing`) or must not overwrite, and what it knows of
    earlier outputs.

    Attributes:
        skip_existing: skip inputs whose output is there, made from them with this configuration.
        overwrite: replace files that are not this configuration's outputs.
        shape, dtype: of this run's outputs (per input); None in the shape: any number of rows
            (`--resize native`, each image its own grid).
        made_from: from -o DIR's manifest, output (relative to DIR) -> the input it was made from;
            for shards, (shard, row) -> input. None without a manifest.
        max_rows: with any number of rows (`--resize native`), the most an output has (the
            prefix tokens and --max-patches): a file with more is not this configuration's.
    """

    skip_existing: bool = False
    overwrite: bool = False
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    made_from: dict | None = None
    max_rows: int | None = None


def plan_jobs(sources: Iterable[Source], plan: OutputPlan, resume: Resume,
              shard_size: int | None = None) -> Iterator[Job | Failed | Skipped]:
    """Jobs for the inputs, in order, and the inputs that need none (skipped, or known bad)."""
    if shard_size:
        yield from _shard_jobs(sources, plan, resume, shard_size)
        return
    for index, source in enumerate(sources):
        if source.error:
            yield Failed(source, source.error)
            continue
        output = plan.assign(source)
        job = Job(source, output, index)
        nested = None if output is None else plan.nested(output)
        if nested is not None:
            yield Failed(source, f"its output folder {display_path(output.parent)} is inside another vitembed "
                                 f"run's output folder ({nested}); nothing was written")
            continue
        yield job if output is None else _existing(job, plan, resume)


def _existing(job: Job, plan: OutputPlan, resume: Resume) -> Job | Failed | Skipped:
    """The job, unless its output exists: then skipped, or refused if it is not this run's kind."""
    output = job.output
    if resume.overwrite or not plan.exists(output):
        return job
    found = plan.header(output)
    made_from = resume.made_from
    name = display_path(job.source.path)
    # An output the manifest gives to another input (an input set that changed between runs moves
    # collision names), or whose input's last line there is an error (its tokens are not this
    # input's now), is made again, never taken for this input's. One it does not list (a run
    # stopped before it recorded it) is this configuration's: run.json says so, and the file's
    # shape and dtype, as without a manifest (beside the inputs, -o FILE).
    ours = made_from is not None and made_from.get(plan.relative(output), name) == name and not (
        isinstance(made_from, MadeFrom) and name in made_from.failed)
    if isinstance(found, str) or not _fits(found[0], resume) or found[1] != resume.dtype:
        if ours and not os.path.islink(output):
            return job  # this run's own output, damaged since: made again
        what = found if isinstance(found, str) else f"{_shape(found[0])} {found[1]}"
        return Failed(job.source, f"{display_path(output)} exists and holds {what}, not this run's "
                                  f"{_shape(resume.shape)} {resume.dtype}; use --overwrite to replace it")
    if resume.skip_existing and (made_from is None or ours):
        return Skipped(job.source, output, found[0], resume.dtype)
    return job  # this configuration's output, to be made again (or made from another input)


def _fits(shape: tuple[int, ...], resume: Resume) -> bool:
    expected = resume.shape
    if len(shape) != len(expected) or not all(e is None or s == e for s, e in zip(shape, expected)):
        return False
    return resume.max_rows is None or shape[0] <= resume.max_rows


def nested_run(folder: Path) -> str | None:
    """What makes `folder` another run's output folder (its run.json, or a run writing into it
    now), or None. A folder is a run's once it has a lock file and run.json, or its lock is held."""
    lock = folder / LOCK_FILE
    if not os.path.lexists(lock):
        return None
    if os.path.lexists(folder / RUN_FILE):
        return f"{display_path(folder / RUN_FILE)}"
    try:
        import fcntl

        fd = open_record(lock, os.O_RDONLY)
    except (ImportError, OSError, NotRegularFile):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"a run writing into it now, {display_path(lock)}"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _shape(shape) -> str:
    return "(" + ", ".join("N" if v is None else str(v) for v in shape) + ")"


def _shard_jobs(sources: Iterable[Source], plan: OutputPlan, resume: Resume, k: int) -> Iterator[Job | Failed | Skipped]:
    """Jobs a shard at a time: a shard is skipped only when the file holds a row of this run's
    shape and dtype for each of this run's inputs of it (K, or fewer in the last shard) and the
    manifest gives each row to this run's input for it, as ok."""
    batch: list[Source] = []
    shard = 0
    for source in sources:
        batch.append(source)
        if len(batch) == k:
            yield from _shard(batch, shard, plan, resume, k)
            batch, shard = [], shard + 1
    if batch:
        yield from _shard(batch, shard, plan, resume, k)


def shard_path(folder: Path, shard: int, fmt: str) -> Path:
    """Shard number `shard` of -o DIR: `shard-NNNNN.npy`, `.parquet` or `.tar` (--format wds)."""
    return folder / f"shard-{shard:05d}{DATASET_FORMATS.get(fmt, '.npy')}"


def _shard(sources: list[Source], shard: int, plan: OutputPlan, resume: Resume, k: int) -> Iterator[Job | Failed | Skipped]:
    path = shard_path(plan.target, shard, plan.fmt)
    name = plan.relative(path)
    rows = resume.made_from or {}
    done = (resume.skip_existing and _whole_shard(plan.header(path), len(sources), resume)
            and all(rows.get((name, row)) == display_path(s.path) for row, s in enumerate(sources)))
    for row, source in enumerate(sources):
        job = Job(source, path, shard * k + row)
        if done:
            yield Skipped(source, path, resume.shape, resume.dtype, row)
        elif source.error:
            yield Failed(source, source.error, job)
        else:
            yield job


def _whole_shard(found, k: int, resume: Resume) -> bool:
    """Whether a shard's header (`OutputPlan.header`) is K rows of this run's shape and dtype (any
    number of tokens a row where the run's shape says None: native)."""
    if isinstance(found, str) or found[1] != resume.dtype or found[0][0] != k or len(found[0]) != len(resume.shape) + 1:
        return False
    return all(e is None or s == e for s, e in zip(found[0][1:], resume.shape))
