"""Output file formats: a token array as `.npy` or `.pt` bytes, and output dtypes.

Both formats are written here, without torch (`.pt` through `ptformat`), so that every engine and
every sink writes the same bytes. Tokens travel as numpy arrays; bfloat16, which numpy lacks,
travels as its bits in a uint16 array (`cast`) and is written as a bfloat16 tensor.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from typing import BinaryIO

import numpy as np

from ..choices import DTYPE_ALIASES, DTYPES, FORMATS, suggest
from ..errors import ConfigError
from .reads import open_regular
from .ptformat import bfloat16_bits, read_pt_header, write_pt

__all__ = ["DTYPES", "DTYPE_ALIASES", "FORMATS", "cast", "describe_output", "output_dtype", "output_header", "tensor_bytes", "write_tensor"]



def output_dtype(name: str) -> str:
    """An output dtype by its name or a usual alias (fp16, half, bf16, ...).

    Raises:
        ConfigError: not one of them; the message lists the spellings.
    """
    text = str(name).lower()
    dtype = DTYPE_ALIASES.get(text, text)
    if dtype not in DTYPES:
        hint = suggest(text, DTYPES, aliases=DTYPE_ALIASES)
        raise ConfigError(f"unknown dtype {text!r}{hint}; choose {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return dtype


def cast(z: np.ndarray, dtype: str) -> np.ndarray:
    """float32 tokens in an output dtype; bfloat16 as its bits (uint16), for `write_tensor`."""
    if dtype == "bfloat16":
        return bfloat16_bits(z)
    return z if dtype == "float32" else z.astype(dtype)


def write_tensor(f: BinaryIO, array: np.ndarray, fmt: str, dtype: str | None = None) -> None:
    """Write one output to an open binary file: a .npy array, or a .pt tensor as torch.save
    writes it (loadable with weights_only=True).

    Args:
        dtype: "bfloat16" for an array of bfloat16 bits (see `cast`).
    """
    array = np.ascontiguousarray(array)
    if fmt == "npy":
        # np.save's bytes, written with f.write: ndarray.tofile reports a full disk without errno.
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(memoryview(array).cast("B"))
    else:
        write_pt(f, array, "bfloat16" if dtype == "bfloat16" else None)


def tensor_bytes(array: np.ndarray, fmt: str, dtype: str | None = None) -> bytes:
    """The bytes `write_tensor` writes, for a stream such as stdout."""
    buffer = io.BytesIO()
    write_tensor(buffer, array, fmt, dtype)
    return buffer.getvalue()


def output_header(path: os.PathLike | str, opener=open_regular) -> tuple[tuple[int, ...], str] | None:
    """The shape and dtype of an existing, whole `.npy` or `.pt` file of one array, from its
    header (and its size); None when it is not one (see `describe_output`)."""
    found = describe_output(path, opener)
    return None if isinstance(found, str) else found


def describe_output(path: os.PathLike | str, opener=open_regular) -> tuple[tuple[int, ...], str] | str:
    """The shape and dtype of an existing `.npy` or `.pt` file of one array, from its header
    alone (of a Parquet or WebDataset shard: its rows first, `tables`); or why it is not one: "not a .npy/.pt output", or, for a .npy whose data the file
    does not hold in full, "a truncated ..." (as `inspect` finds it). `opener`: how to open it
    for reading (a local regular file; `uris.Store.header` gives pyarrow's)."""
    try:
        with opener(path) as f:
            name = os.fspath(path).lower()
            if name.endswith((".pt", ".pth")):
                return read_pt_header(f)
            if name.endswith((".parquet", ".tar")):  # a dataset shard
                from .tables import describe_table, describe_tar

                return describe_table(f) if name.endswith(".parquet") else describe_tar(f)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            start = f.tell()
            size = f.seek(0, io.SEEK_END)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError):
        return "not a .npy/.pt output"
    nbytes = math.prod(shape) * dtype.itemsize
    if start + nbytes > size:
        return f"a truncated .npy ({_text(shape)} {dtype.name}: {nbytes:,} bytes promised, {max(size - start, 0):,} there)"
    return tuple(shape), dtype.name


def _text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
