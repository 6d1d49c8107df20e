"""Where outputs go and how they are written: .npy / .pt files, atomically.

Every file is written under a temporary name in its own folder and renamed into place, so that
at any instant an output either does not exist or is complete. Temporaries left by a killed run
are removed the next time a run writes into that folder.
"""

from __future__ import annotations

import errno
import io
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np

from .errors import ConfigError, OutputError
from .inputs import Source
from .ptformat import bfloat16_bits, write_pt

__all__ = [
    "FORMATS",
    "OutputPlan",
    "atomic_write",
    "cast",
    "clean_stale_temporaries",
    "tensor_bytes",
    "write_tensor",
]

FORMATS = ("npy", "pt")
_TMP_RE = re.compile(r"^\..+\.(\d+)\.vitembed-tmp$")


@dataclass
class OutputPlan:
    """Maps each input to its output path.

    Modes: `beside` (no -o: next to the input), `dir` (-o DIR: the input's relative path under
    DIR), `file` (-o FILE.npy / FILE.pt: exactly there, one input only) and `stdout` (-o -).

    Two inputs that would map to the same output both get their own file: the first keeps the
    plain name (`pet.npy`), each later one keeps its own extension too (`pet.png.npy`), then a
    counter (`pet.png.1.npy`) if even that is taken.
    """

    mode: str
    fmt: str
    target: Path | None = None
    _claimed: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def from_option(cls, out: str | None, fmt: str | None) -> OutputPlan:
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
        if out is None:
            return cls("beside", fmt or "npy")
        if out == "-":
            return cls("stdout", fmt or "npy")
        path = Path(out)
        suffix = path.suffix.lower().lstrip(".")
        if suffix in FORMATS and not path.is_dir():
            if fmt is not None and fmt != suffix:
                raise ConfigError(f"-o {out} names a .{suffix} file but --format is {fmt}")
            return cls("file", suffix, path)
        return cls("dir", fmt or "npy", path)

    def assign(self, source: Source) -> Path | None:
        """The output path for `source` (None for stdout), unique within this run."""
        if self.mode == "stdout":
            return None
        if self.mode == "file":
            assert self.target is not None
            return self.target
        if self.mode == "dir":
            assert self.target is not None
            base = self.target / source.rel
        else:
            base = source.path
        stem = base.with_suffix("") if base.suffix else base
        candidates = [
            stem.with_name(stem.name + "." + self.fmt),
            base.with_name(base.name + "." + self.fmt),
        ]
        for path in candidates:
            if self._claim(path):
                return path
        n = 1
        while True:
            path = base.with_name(f"{base.name}.{n}.{self.fmt}")
            if self._claim(path):
                return path
            n += 1

    def _claim(self, path: Path) -> bool:
        key = os.path.normcase(os.path.abspath(path))
        if key in self._claimed:
            return False
        self._claimed.add(key)
        return True

    def display(self, path: Path | None) -> str:
        return "-" if path is None else str(path)


def write_tensor(f: BinaryIO, tensor, fmt: str, dtype: str | None = None) -> None:
    """Write one output (a numpy array or a CPU torch tensor) to an open binary file: a .npy
    array, or a .pt tensor as torch.save writes it (loadable with weights_only=True), written
    without torch (`ptformat`), so that either engine writes the same bytes.

    Args:
        dtype: "bfloat16" for a numpy array of bfloat16 bits (see `cast`); numpy has no bfloat16.
    """
    if fmt == "npy":
        array = np.ascontiguousarray(tensor if isinstance(tensor, np.ndarray) else tensor.numpy())
        # np.save's bytes, written with f.write: ndarray.tofile reports a full disk without errno.
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(memoryview(array).cast("B"))
    elif isinstance(tensor, np.ndarray):
        write_pt(f, tensor, "bfloat16" if dtype == "bfloat16" else None)
    else:  # a torch tensor: a bfloat16 one is written from its bits, as int16
        bfloat16 = str(tensor.dtype) == "torch.bfloat16"
        elements = tensor.contiguous()
        if bfloat16:
            import torch

            elements = elements.view(torch.int16)
        write_pt(f, elements.numpy(), "bfloat16" if bfloat16 else None)


def cast(z: np.ndarray, dtype: str) -> np.ndarray:
    """float32 tokens in an output dtype; bfloat16 as its bits (uint16), for `write_tensor`."""
    if dtype == "bfloat16":
        return bfloat16_bits(z)
    return z if dtype == "float32" else z.astype(dtype)


def tensor_bytes(tensor, fmt: str, dtype: str | None = None) -> bytes:
    """The bytes `write_tensor` writes, for a stream such as stdout."""
    buffer = io.BytesIO()
    write_tensor(buffer, tensor, fmt, dtype)
    return buffer.getvalue()


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> int:
    """Write `data` to `path` through a temporary file and a rename; returns the bytes written.

    Raises:
        OutputError: the folder cannot be made, the disk is full, the target is read-only, ...
            No partial file is left behind.
    """
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.vitembed-tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _clean_once(folder)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            size = f.tell()
        os.replace(tmp, path)
        return size
    except OSError as exc:
        _remove_quietly(tmp)
        raise OutputError(f"{path}: {describe_os_error(exc)}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "a path component is a file, not a folder"
    return exc.strerror or str(exc)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def _clean_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    with _cleaned_lock:  # writer threads: the first to reach a folder cleans it, the others wait
        if key not in _cleaned:
            _cleaned.add(key)
            clean_stale_temporaries(folder)


def clean_stale_temporaries(folder: Path) -> int:
    """Remove temporaries of vitembed runs that no longer live; returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    # A killed decoder whose parent died with it stays a zombie until init reaps it, which in a
    # container may take long: it writes nothing more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def relative_to_target(path: Path | None, target: Path | None) -> str | None:
    """An output path as the manifest records it: relative to -o DIR where it lies inside."""
    if path is None:
        return None
    if target is not None:
        try:
            return str(PurePath(path).relative_to(target))
        except ValueError:
            pass
    return str(path)
