"""Inputs and outputs in filesystems that pyarrow reads and writes (s3://, gs://, hdfs://, file://),
for runs on Ray, where every node must see them and an object store is how most clusters share files.

A URI counts where `pyarrow.fs.FileSystem.from_uri` takes it (with `--ray` only; a local run
refuses URLs with a hint). Folders are listed by `inputs` (the local walk's order); here:

- `Uri`: an input file, read whole by the actor that decodes it, at most `limit` bytes
  (`decode.max_file_bytes`): the size is checked before a byte is read.
- `Store`: `-o URI`, a folder with the local layout (per-image files or shards, manifest.jsonl,
  run.json). How a file lands whole depends on the filesystem's kind:
  - **local** (`file://`): as `-o DIR`'s files (`writes.atomic_write`: a temporary created with
    O_EXCL | O_NOFOLLOW, renamed over the target), the project's rule for local files, which
    pyarrow's LocalFileSystem (O_TRUNC, links followed) does not keep; local files are read as
    local inputs are (`reads.open_regular`: regular files only, never blocking);
  - **put** (S3, GCS, Azure: object stores): one upload per file, which the store makes visible
    whole, when it completes, or not at all;
  - **rename** (HDFS and the others): a temporary name in the same folder, then `move` onto the
    target; the temporaries of writers that were killed are removed after the run (`clean`).
  A file is made in memory first (one output, or one shard), then written in one call.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ConfigError, InputError, OutputError, one_line
from .writes import Cleaner, atomic_write, clean_stale_temporaries, is_temporary, temporary_name
from .formats import describe_output
from .reads import NotRegularFile, open_regular

__all__ = ["ARROW_SCHEMES", "Store", "Uri", "UriError", "as_file", "filesystem", "is_uri", "read_bounded"]

ARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # pyarrow's, as built
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # a scheme of 2+ letters: C:/x stays a path
_PUT_KINDS = frozenset({"s3", "gcs", "abfs"})  # pyarrow's type_name of object stores


def is_uri(text: str | os.PathLike) -> bool:
    """Whether `text` starts with a URI scheme (https://, s3://, file://, ...)."""
    return isinstance(text, str) and _URI.match(text) is not None


class UriError(ValueError):
    """A URI that pyarrow cannot open (an unknown scheme, a store it cannot reach)."""


@functools.lru_cache(maxsize=32)
def filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's (filesystem, path in it) for `uri`, once per process and URI (an S3 client is
    costly to make).

    Raises:
        UriError: pyarrow is missing, does not know the scheme, or cannot reach the store.
    """
    try:
        from pyarrow.fs import FileSystem

        return FileSystem.from_uri(uri)
    except ImportError:
        raise UriError("URIs are read through pyarrow, which is not installed (pip install 'vitembed[ray]')") from None
    except (ValueError, OSError, NotImplementedError) as exc:
        raise UriError(f"pyarrow cannot open it: {one_line(exc)}") from None


class FileTooLarge(ValueError):
    pass


def read_bounded(fs: Any, path: str, limit: int) -> bytes:
    """A file's bytes, if it holds at most `limit` (FileTooLarge otherwise, found before reading).
    A local file is opened only if it is a regular file (`reads.open_regular`)."""
    local = fs.type_name == "local"
    with open_regular(path) if local else fs.open_input_file(path) as f:
        size = os.fstat(f.fileno()).st_size if local else f.size()
        if size > limit:
            raise FileTooLarge(f"{size} bytes, over the {limit} that --max-pixels allows (4 bytes a pixel)")
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since
        raise FileTooLarge(f"over the {limit} bytes that --max-pixels allows (4 bytes a pixel)")
    return data


class Uri(str):
    """An input file that pyarrow reads. The text is its URI as shown (manifest, reports): the
    URI given, or for a file found in a folder, that folder's URI and the path below it.

    Attributes:
        root: the URI given, whose filesystem holds the file (`filesystem`).
        path: the file's path in that filesystem (None: the root's own).
    """

    def __new__(cls, text: str, root: str | None = None, path: str | None = None):
        self = super().__new__(cls, text)
        self.root, self.path = root or text, path
        return self

    def __reduce__(self):
        return Uri, (str(self), self.root, self.path)

    def fetch(self, limit: int) -> bytes:
        """The file's bytes (see `read_bounded`).

        Raises:
            InputError: missing, not a file, too large, or unreadable; one line.
        """
        try:
            fs, path = filesystem(self.root)
            return read_bounded(fs, self.path or path, limit)
        except FileNotFoundError:
            raise InputError("no such file") from None
        except (UriError, NotRegularFile) as exc:
            raise InputError(str(exc)) from None
        except FileTooLarge as exc:
            raise InputError(f"too large: {exc}") from None
        except OSError as exc:
            raise InputError(f"cannot read: {one_line(exc)}") from None


def as_file(item: Any) -> Any:
    """A row's path for `Encoder.encode_files`: a URI as a `Uri`, anything else as it is."""
    return Uri(item) if is_uri(item) else item


@dataclass(frozen=True)
class Store:
    """`-o URI`: a folder in a filesystem pyarrow writes (see the module docstring for the kinds).

    Output paths are the filesystem's own (`base` and below: `/abs/dir/...` for file://,
    `bucket/dir/...` for s3://), as `pathlib.Path`s in the output plan.
    """

    uri: str
    fs: Any = field(repr=False, compare=False)
    base: str
    kind: str = ""
    cleaner: Cleaner = field(default_factory=Cleaner, repr=False, compare=False)  # this run's (local)

    def __post_init__(self) -> None:
        if not self.kind:
            name = self.fs.type_name
            object.__setattr__(self, "kind", "local" if name == "local" else "put" if name in _PUT_KINDS else "rename")

    @classmethod
    def open(cls, uri: str) -> Store:
        """The store of `-o uri`.

        Raises:
            ConfigError: pyarrow cannot open it.
        """
        try:
            fs, base = filesystem(uri)
        except UriError as exc:
            raise ConfigError(f"-o {uri}: {exc}") from None
        return cls(uri, fs, base.rstrip("/") or base)

    def write(self, path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> int:
        """Write a whole file (as `writes.atomic_write`); returns its size.

        Raises:
            OutputError: it cannot be written; nothing partial is left where it goes.
        """
        if self.kind == "local":
            return atomic_write(Path(path), data, self.cleaner)
        path = os.fspath(path)
        if callable(data):
            buffer = io.BytesIO()
            data(buffer)
            data = buffer.getvalue()
        tmp = None
        try:
            if self.kind == "rename":
                folder = path.rpartition("/")[0]
                self.fs.create_dir(folder, recursive=True)
                tmp = f"{folder}/{temporary_name()}"
            with self.fs.open_output_stream(tmp or path) as f:
                f.write(data)
            if tmp is not None:
                self.fs.move(tmp, path)
            return len(data)
        except OSError as exc:
            if tmp is not None:
                self.delete(tmp)
            raise OutputError(f"{path}: {one_line(exc)}") from None

    def read(self, path: str | os.PathLike, limit: int) -> bytes | None:
        """A file's bytes (None where there is none), at most `limit`.

        Raises:
            OutputError: it cannot be read, or holds more.
        """
        path = os.fspath(path)
        try:
            from pyarrow.fs import FileType

            if self.fs.get_file_info(path).type == FileType.NotFound:
                return None
            return read_bounded(self.fs, path, limit)
        except (OSError, NotRegularFile, FileTooLarge) as exc:
            raise OutputError(f"{path}: {one_line(exc)}") from None

    def header(self, path: str | os.PathLike) -> tuple[tuple[int, ...], str] | str:
        """An output's shape and dtype, or why it is not a whole output (`formats.describe_output`)."""
        if self.kind == "local":
            return describe_output(path)
        return describe_output(path, lambda p: self.fs.open_input_file(os.fspath(p)))

    def files(self) -> Iterator[str]:
        """The path of every file under `base`, at once (one listing, not a request per output).

        Raises:
            OutputError: the folder cannot be listed.
        """
        from pyarrow.fs import FileSelector, FileType

        try:
            infos = self.fs.get_file_info(FileSelector(self.base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise OutputError(f"{self.uri}: cannot list it: {one_line(exc)}") from None
        return (info.path for info in infos if info.type != FileType.Directory)

    def delete(self, path: str | os.PathLike) -> None:
        """Remove a file, if it is there (a link itself, never its target)."""
        try:
            self.fs.delete_file(os.fspath(path))
        except OSError:
            pass

    def clean(self, folder: str | os.PathLike) -> int:
        """After a run: remove the temporaries that writers killed mid-write left in `folder`."""
        if self.kind == "local":
            return clean_stale_temporaries(Path(folder))
        if self.kind == "put":
            return 0  # an upload that never completed is no object
        from pyarrow.fs import FileSelector

        try:
            infos = self.fs.get_file_info(FileSelector(os.fspath(folder), allow_not_found=True))
        except OSError:
            return 0
        stale = [info.path for info in infos if is_temporary(info.base_name)]
        for path in stale:
            self.delete(path)
        return len(stale)
