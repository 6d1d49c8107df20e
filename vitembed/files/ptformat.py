"""`.pt` files written without torch, as `torch.save` writes one tensor, so that the numpy engine
can write them (importing torch costs a run about 1-2 s).

The format (torch/serialization.py, `_save`) is an uncompressed zip archive. Its records, under one
folder (`archive/`):
- `data.pkl`: a protocol-2 pickle of `torch._utils._rebuild_tensor_v2(storage, storage_offset,
  size, stride, requires_grad, backward_hooks)`, the storage given as a persistent id
  ("storage", torch.<Type>Storage, key, location, number of elements);
- `data/<key>`: the storage's bytes, little-endian;
- `byteorder`, `version`, `.format_version`, `.storage_alignment`: small constants.
Every record's bytes start at a multiple of 64 bytes of the file, as torch aligns them, so that
`torch.load(..., mmap=True)` can map the storage in place. Such files load with
`torch.load(path, weights_only=True)` (tests/test_ptformat.py holds them to it).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from typing import BinaryIO

import numpy as np

__all__ = ["STORAGES", "bfloat16_bits", "read_pt_header", "write_pt"]

# The element type's name, as torch calls it -> its storage class in the pickle.
STORAGES = {
    "float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}
_ALIGNMENT = 64
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def write_pt(f: BinaryIO, array: np.ndarray, dtype: str | None = None) -> None:
    """Write `array` to `f` (at its start) as a `.pt` file of one tensor.

    Args:
        array: the tensor's elements, in C order; for bfloat16, their bits as uint16 (see
            `bfloat16_bits`).
        dtype: the tensor's element type, as torch names it (default: the array's).
    """
    dtype = dtype or array.dtype.name
    if dtype not in STORAGES:
        raise ValueError(f"no .pt storage for {dtype!r}; one of {', '.join(STORAGES)}")
    # C order and little-endian, copied only where needed (ascontiguousarray would make 0-d 1-d).
    data = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    records = [
        ("data.pkl", _pickle(dtype, data.shape)),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", b"little"),
        ("data/0", memoryview(data).cast("B") if data.size else b""),
        ("version", b"3\n"),
    ]
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in records:
            info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # Pad the extra field (id "FB", as torch's writer does) so that the bytes start aligned.
            start = archive.fp.tell() + _LOCAL_HEADER + len(info.filename.encode()) + 4
            padding = -start % _ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            archive.writestr(info, payload)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> the bits of the nearest bfloat16 (ties to even), as torch rounds; NaN stays NaN."""
    values = np.asarray(array, dtype=np.float32, order="C")
    bits = values.view(np.uint32)
    # Below the NaNs no sum overflows: the largest, -inf, is 0xFF800000.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    """data.pkl: `_rebuild_tensor_v2` of storage "0" (on the CPU), contiguous, no autograd."""
    numel = int(np.prod(shape, dtype=np.int64))
    strides, step = [], 1
    for size in reversed(shape):  # torch's contiguous strides: sizes of 0 count as 1
        strides.append(step)
        step *= max(size, 1)
    storage = _tuple([_text("storage"), _global("torch", STORAGES[dtype]), _text("0"), _text("cpu"), _int(numel)])
    args = [storage + b"Q", _int(0), _tuple([_int(s) for s in shape]), _tuple([_int(s) for s in reversed(strides)]),
            b"\x89", _global("collections", "OrderedDict") + b")R"]  # False; OrderedDict()
    return b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def read_pt_header(f: BinaryIO, limit: int = 1 << 20) -> tuple[tuple[int, ...], str]:
    """The shape and dtype of a `.pt` file of one tensor, read from its `data.pkl` alone.

    The pickle is read by an unpickler that knows only the names such a file uses, and returns
    stand-ins for them: nothing is imported or called, and no tensor data is read.

    Raises:
        ValueError: not a .pt file of one plain tensor.
    """
    with zipfile.ZipFile(f) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1 or archive.getinfo(names[0]).file_size > limit:
            raise ValueError("not a .pt file of one tensor")
        obj = _HeaderUnpickler(io.BytesIO(archive.read(names[0]))).load()
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "tensor"):
        raise ValueError("not a .pt file of one tensor")
    return obj[1]


class _HeaderUnpickler(pickle.Unpickler):
    _DTYPES = {storage: dtype for dtype, storage in STORAGES.items()}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *rest: ("tensor", (tuple(size), storage))
        if module == "torch" and name in self._DTYPES:
            return self._DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor file")

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str):
            return pid[1]  # the dtype name, from find_class
        raise pickle.UnpicklingError("unknown storage record")
