"""`.pt` files written without torch load with torch.load as torch.save's own do."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
import torch

from vitembed.files.ptformat import STORAGES, bfloat16_bits, write_pt
from vitembed.encoder import tokens_to_numpy
from vitembed.files.formats import tensor_bytes


def _load(data: bytes, tmp_path=None, mmap: bool = False) -> torch.Tensor:
    if mmap:
        path = tmp_path / "t.pt"
        path.write_bytes(data)
        return torch.load(path, weights_only=True, mmap=True)
    return torch.load(io.BytesIO(data), weights_only=True)


def _write(array: np.ndarray, dtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    write_pt(buffer, array, dtype)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(257, 384), (1, 5), (0, 3), (2, 0), (), (70000,)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "uint8", "bool"])
def test_round_trip(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    array = np.asarray(rng.normal(size=shape) * 100).astype(dtype)
    data = _write(array)
    for mmap in (False, True):
        tensor = _load(data, tmp_path, mmap)
        assert tensor.dtype == getattr(torch, dtype) and tuple(tensor.shape) == shape
        assert tensor.is_contiguous() and tensor.storage_offset() == 0
        np.testing.assert_array_equal(tensor.numpy(), array)


def test_big_endian_arrays_written_little_endian():
    array = np.arange(12, dtype=">f4").reshape(3, 4)
    np.testing.assert_array_equal(_load(_write(array)).numpy(), array)


def test_same_records_as_torch_save_and_aligned():
    """The records torch.save writes for one tensor (bar its random serialization id), each
    starting at a multiple of 64 bytes, so that mmap loading maps the storage in place."""
    ours = zipfile.ZipFile(io.BytesIO(_write(np.zeros((3, 4), np.float16))))
    theirs = io.BytesIO()
    torch.save(torch.zeros(3, 4, dtype=torch.float16), theirs)
    names = set(zipfile.ZipFile(theirs).namelist()) - {"archive/.data/serialization_id"}
    assert set(ours.namelist()) == names
    raw = ours.fp.getvalue()
    for info in ours.infolist():
        name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename


def test_bfloat16_rounds_as_torch():
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.normal(size=10000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, size=10000),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-45, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8], np.float32),
    ]).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16)
    bits = bfloat16_bits(values)
    np.testing.assert_array_equal(bits.view(np.int16), expected.view(torch.int16).numpy())  # ties to even
    assert torch.equal(_load(_write(bits, "bfloat16")), expected)
    assert torch.isnan(_load(_write(bfloat16_bits(np.array([np.nan], np.float32)), "bfloat16"))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_tensors_and_views_written_compactly(dtype):
    """A row of a batch (the torch engine's outputs) is written alone, as a compact tensor."""
    batch = torch.randn(4, 197, 768).to(dtype)
    name = str(dtype).removeprefix("torch.")
    data = tensor_bytes(tokens_to_numpy(batch[2], name), "pt", name)
    assert len(data) < 197 * 768 * batch.element_size() + 4096
    loaded = _load(data)
    assert loaded.dtype == dtype and torch.equal(loaded, batch[2])


def test_unknown_dtype_refused():
    with pytest.raises(ValueError, match="complex64"):
        _write(np.zeros(3, np.complex64))
    assert set(STORAGES) >= {"float32", "float16", "bfloat16"}
