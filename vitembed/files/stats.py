"""Statistics of a saved output for `vitembed inspect`: shape, dtype, min, mean, std and max.

In bounded memory whatever the file. The values are read in chunks of `CHUNK` and merged as they
come: each chunk's float64 mean and sum of squared deviations, combined by Chan et al.'s pairwise
update, so that a large mean does not swamp the variance. Holes of a sparse `.npy` count as zeros
without being read. Nothing in the file is trusted before it is checked:

- regular files only (a FIFO would block, `/dev/zero` never ends), checked before opening;
- `.npy`: told from its magic bytes, never unpickled (an object array is refused), and its
  header's data must fit in the file;
- `.pt`: a zip archive with stored records only (a compressed one can inflate without bound),
  read with `weights_only=True` and memory-mapped, holding one tensor whose storage holds every
  value it shows (no zero or overlapping strides that make a few bytes look like gigabytes).

Anything else is named from its first bytes ("a PNG image") in an `InputError` of our own words.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InputError, one_line
from .reads import ZIP_MAGIC, NotRegularFile, compressed_record, looks_like, open_regular

__all__ = ["CHUNK", "tensor_stats"]

CHUNK = 1 << 20  # values per chunk: 8 MiB as float64, a few times that at the peak
_NPY_MAGIC = b"\x93NUMPY"
_MAX_PICKLE = 1 << 20  # bytes of a .pt's data.pkl; one tensor's takes a few hundred


class _Running:
    """Count, mean, sum of squared deviations, min and max, merged chunk by chunk."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size:
            mean = float(x.mean())
            self.merge(x.size, mean, float(np.square(x - mean).sum()), float(x.min()), float(x.max()))

    def add_zeros(self, count: int) -> None:
        if count:
            self.merge(count, 0.0, 0.0, 0.0, 0.0)

    def merge(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.lo, self.hi = float(np.minimum(self.lo, lo)), float(np.maximum(self.hi, hi))  # NaN stays NaN

    def result(self) -> dict[str, float | None]:
        if not self.n:
            return {"min": None, "mean": None, "std": None, "max": None}
        return {"min": self.lo, "mean": self.mean, "std": math.sqrt(max(self.m2, 0.0) / self.n), "max": self.hi}


def tensor_stats(path: Path) -> dict[str, Any]:
    """Shape, dtype, min, mean, std and max of a saved .npy or .pt output (None for an empty one,
    or for values that are not numbers).

    Raises:
        InputError: the reason (without the path) the file cannot be read as an output.
    """
    try:
        with open_regular(path) as f:
            head = f.read(16)
            if head.startswith(_NPY_MAGIC):
                return _npy(f, os.fstat(f.fileno()).st_size)
    except NotRegularFile as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or one_line(exc)}") from None
    if head.startswith(ZIP_MAGIC):
        return _pt(path)
    what = looks_like(head)
    raise InputError("not a .npy or .pt output" + (f" (it looks like {what})" if what else
                                                   " (it starts with neither .npy's magic bytes nor a zip archive's)"))


# --------------------------------------------------------------------------- .npy


def _npy(f: BinaryIO, size: int) -> dict[str, Any]:
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # C or Fortran order: the statistics are the same
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise InputError(f"a damaged .npy header: {_own_words(exc)}") from None
    if dtype.hasobject:
        raise InputError("holds Python objects (dtype object), not numbers; vitembed never unpickles a file")
    count = math.prod(shape)
    start, nbytes = f.tell(), count * dtype.itemsize
    if start + nbytes > size:
        raise InputError(f"truncated: its header promises {nbytes:,} bytes of {dtype} {tuple(shape)}, "
                         f"the file holds {max(size - start, 0):,}")
    stats: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype)}
    running = _Running()
    if count and dtype.kind in "fiu" and not dtype.fields:
        for offset, length, is_data in _segments(f.fileno(), start, start + nbytes, dtype.itemsize):
            if not is_data:
                running.add_zeros(length // dtype.itemsize)  # a hole reads as zero bytes: 0 in every dtype
                continue
            for done in range(0, length, CHUNK * dtype.itemsize):
                want = min(CHUNK * dtype.itemsize, length - done)
                data = os.pread(f.fileno(), want, offset + done)  # not f.read: lseek has moved the file position
                if len(data) != want:
                    raise InputError("truncated while being read (the file changed?)")
                running.add(np.frombuffer(data, dtype=dtype))
    return {**stats, **running.result()}


def _segments(fd: int, start: int, end: int, itemsize: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) pieces of [start, end): the holes of a sparse file (whole values
    only) apart from the data, found with SEEK_HOLE / SEEK_DATA where the system has them."""
    given = scan = start  # [start, given) is given out; holes are looked for from scan on
    while hasattr(os, "SEEK_HOLE") and scan < end:
        try:
            hole = os.lseek(fd, scan, os.SEEK_HOLE)  # the end of the file counts as a hole
            data = os.lseek(fd, hole, os.SEEK_DATA) if hole < end else end
        except OSError as exc:  # ENXIO: no data after the hole; anything else: read it all
            if exc.errno != errno.ENXIO:
                break
            data = end
        data = min(data, end)
        if hole >= end or data <= scan:
            break
        first = start + -(-(hole - start) // itemsize) * itemsize
        last = start + (data - start) // itemsize * itemsize
        if last > first:
            if first > given:
                yield given, first - given, True
            yield first, last - first, False
            given = last
        scan = data
    if given < end:
        yield given, end - given, True


# --------------------------------------------------------------------------- .pt


def _pt(path: Path) -> dict[str, Any]:
    problem = compressed_record(path)
    if problem:
        raise InputError(f"cannot read as a .pt file: {problem}")
    _check_records(path)
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"would import {found.group(1)}" if found else "holds more than plain tensors"
        raise InputError(f"refused: its pickle {what}; vitembed reads tensors only and never runs code "
                         "from a file") from None
    except Exception as exc:  # torch raises RuntimeError, ValueError, EOFError... for a bad archive
        raise InputError(f"cannot read as a .pt file: {_own_words(exc)}") from None
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"holds a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        raise InputError(f"holds a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one")
    available = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1) - tensor.storage_offset()
    if tensor.numel() > max(available, 0):
        raise InputError(f"its tensor of shape {tuple(tensor.shape)} shows {tensor.numel():,} values but its storage "
                         f"holds {max(available, 0):,} (zero or overlapping strides); vitembed's outputs are plain")
    running = _Running()
    if not (tensor.is_complex() or tensor.is_quantized):
        for block in _blocks(_flat(tensor), CHUNK):
            running.add(block.to(torch.float64).reshape(-1).numpy())
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), **running.result()}


def _check_records(path: Path) -> None:
    """Refuse a zip archive that is not a .pt file, or whose pickle is larger than one tensor's."""
    import zipfile

    with open_regular(path) as f, zipfile.ZipFile(f) as archive:
        records = archive.infolist()
    pickles = [r for r in records if r.filename.endswith("/data.pkl") or r.filename == "data.pkl"]
    if not pickles:
        npz = records and all(r.filename.endswith(".npy") for r in records)
        raise InputError(f"not a .npy or .pt output (it looks like {'a NumPy .npz' if npz else 'a zip'} archive); "
                         "inspect reads one .npy or .pt tensor")
    if pickles[0].file_size > _MAX_PICKLE:
        raise InputError(f"cannot read as a .pt file: its data.pkl is {pickles[0].file_size:,} bytes; "
                         "one tensor's takes a few hundred")


def _flat(tensor):
    """A tensor that covers one block of its storage exactly (its dims in any order, as a transpose
    leaves them) as a 1-D view of that block, read in storage order; any other tensor as it is."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz != 1):
        if stride != expected:
            return tensor
        expected *= size
    return tensor.as_strided((tensor.numel(),), (1,))


def _blocks(tensor, limit: int) -> Iterator[Any]:
    """Views of `tensor` that together hold each of its values once, none of more than `limit` values."""
    if tensor.numel() <= limit or tensor.ndim == 0:
        yield tensor
    elif tensor.ndim == 1:
        for i in range(0, tensor.shape[0], limit):
            yield tensor[i:i + limit]
    elif tensor[0].numel() <= limit:
        step = max(1, limit // max(tensor[0].numel(), 1))
        for i in range(0, tensor.shape[0], step):
            yield tensor[i:i + step]
    else:
        for row in tensor:
            yield from _blocks(row, limit)


def _own_words(exc: BaseException) -> str:
    """A library's reason, less its advice to load unsafely (allow_pickle=True, weights_only=False)."""
    text = one_line(exc)
    kept = [s for s in re.split(r"(?<=[.;])\s+", text) if not re.search(r"allow_pickle|weights_only|pickle\.load", s)]
    return " ".join(kept) or type(exc).__name__
