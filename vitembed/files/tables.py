"""Dataset shards of tokens: Parquet tables and WebDataset tars, written and read back.

A shard is one file of K rows, one per input, written whole (the sink writes it through
`writes.atomic_write`), in input order.

**Parquet** (`-o tokens.parquet`, or `-o DIR --format parquet`): `shard-NNNNN.parquet`, columns

- `key`: the input's name (its path under the inputs' folder without the image's suffix, or a
  dataset sample's key); `input`: the input as the manifest names it;
- `tokens`: Arrow's canonical fixed-shape tensor extension type (`arrow.fixed_shape_tensor`,
  shape (N+1, D)), float32 or float16; bfloat16 as its bits in uint16, the dtype in the schema
  metadata (`vitembed.dtype`). With `--resize native`, where each row has a shape of its own,
  `tokens` is a list of tokens, each a fixed-size list of D values (`list<fixed_size_list<D>>`),
  and `grid` holds the row's patch grid (rows, columns);
- `error`: null when the input was encoded; a failed input keeps its row, with its error and
  null tokens, so that a table lists every input;
- `json`, `txt`: the text a dataset sample carried (`Source.meta`), null where it had none.
  Always present, so that every shard of a run has one schema and a reader can take them together.

The schema metadata holds the run's record (run.json: the configuration, versions, device) under
`vitembed`. Row groups of about 64 MiB of tokens let a reader take part of a shard; the tokens
are stored uncompressed (float bits compress little, and the encode step should not wait on it).
Read a folder's shards by their glob (`DIR/*.parquet`): run.json and manifest.jsonl sit beside
them. Hugging Face `datasets` does not map Arrow's tensor type to a feature; give it
`huggingface_features(path)` as `features=`.

**WebDataset** (`-o DIR --format wds`): `shard-NNNNN.tar`, a sample per encoded input: `KEY.npy`
(its tokens) and `KEY.json` (`key`, `input`, `grid` for native runs, and the `json` / `txt` a dataset
sample carried). KEY is the input's number in the run, nine digits: WebDataset takes a member's
key up to the first dot of its name, and an input's own name may hold dots or repeat. Failed
inputs have no sample (the manifest has their error), as they have no file of their own with
per-image outputs. bfloat16 is refused (.npy members cannot hold it).

The tars are written with the standard library's `tarfile` rather than webdataset's `TarWriter`:
`TarWriter` stamps each member with the time it was written (two runs of the same inputs, or a
local run and a Ray run, would differ in bytes), encodes samples by its own rules, and would make
`webdataset` a dependency of every install; `tarfile` writes the same members with fixed metadata,
straight into the atomic write's temporary file.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterable
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ..choices import DATASET_FORMATS
from ..errors import ConfigError

__all__ = ["DATASET_FORMATS", "DEFAULT_SHARD_ROWS", "META_COLUMNS", "Row", "default_shard_size", "describe_table",
           "describe_tar", "huggingface_features", "require_pyarrow", "write_parquet", "write_tar"]

DEFAULT_SHARD_ROWS = 1024  # rows of a shard without --shard-size, unless over `_SHARD_BYTES`
_SHARD_BYTES = 256 << 20  # tokens a shard holds at most without --shard-size: the sink holds a shard in memory
_GROUP_BYTES = 64 << 20  # tokens of a Parquet row group
META_COLUMNS = ("json", "txt")  # the text of a dataset sample carried into Parquet and WebDataset outputs
_KEY_DIGITS = 9


class Row(NamedTuple):
    """One input's row of a shard: its tokens (None where it failed), grid (native) and error."""

    index: int  # the input's number in the run
    key: str
    input: str
    tokens: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    error: str | None = None
    meta: dict | None = None


def require_pyarrow():
    """pyarrow, or a ConfigError that says what to install."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("--format parquet needs pyarrow: pip install 'vitembed[parquet]'") from None
    return pyarrow


def default_shard_size(shape: tuple, dtype: str) -> int:
    """Rows of a shard without --shard-size: `DEFAULT_SHARD_ROWS`, fewer where a shard's tokens
    would pass 256 MiB (vit-b16's float32 rows: 443). `shape`: a row's tokens, (rows, D); rows
    are the most a native run's image may have."""
    row_bytes = math.prod(shape) * (4 if dtype == "float32" else 2)
    return max(1, min(DEFAULT_SHARD_ROWS, _SHARD_BYTES // max(1, row_bytes)))


# --- Parquet ---------------------------------------------------------------------------------

def _tokens_type(pa, shape: tuple, dtype: str):
    value = _VALUE_TYPES[dtype](pa)
    if shape[0] is None:  # native: each row its own number of tokens
        return pa.list_(pa.list_(value, shape[1]))
    return pa.fixed_shape_tensor(value, list(shape))


def table_schema(shape: tuple, dtype: str, record: dict | None = None):
    """A shard's Arrow schema (see the module docstring); `shape`: a row's tokens, None rows when native."""
    pa = require_pyarrow()
    fields = [pa.field("key", pa.string()), pa.field("input", pa.string()),
              pa.field("tokens", _tokens_type(pa, shape, dtype))]
    if shape[0] is None:
        fields.append(pa.field("grid", pa.list_(pa.int32(), 2)))
    fields += [pa.field("error", pa.string()), *(pa.field(name, pa.string()) for name in META_COLUMNS)]
    metadata = {"vitembed.dtype": dtype, **({"vitembed": json.dumps(record)} if record is not None else {})}
    return pa.schema(fields, metadata=metadata)


def _bits(tokens: np.ndarray, dtype: str) -> np.ndarray:
    """Tokens as the values Arrow stores (bfloat16 arrives as its uint16 bits already)."""
    return tokens.view(np.uint16) if dtype == "bfloat16" else tokens


def _tokens_column(pa, rows: list[Row], shape: tuple, dtype: str):
    """The `tokens` column, a chunk a row over the row's own tokens (no copy: the writer reads
    them where they are); null where an input failed."""
    kind = _tokens_type(pa, shape, dtype)
    storage = kind if shape[0] is None else kind.storage_type
    chunks = []
    for row in rows:
        if row.tokens is None:
            chunk = pa.nulls(1, storage)
        else:
            flat = np.ascontiguousarray(_bits(row.tokens, dtype)).reshape(-1)
            values = pa.Array.from_buffers(_VALUE_TYPES[dtype](pa), flat.size, [None, pa.py_buffer(flat)])
            if shape[0] is None:  # native: one list of len(tokens) D-long tokens
                tokens = pa.FixedSizeListArray.from_arrays(values, shape[1])
                chunk = pa.ListArray.from_arrays(pa.array([0, len(row.tokens)], pa.int32()), tokens)
            else:
                chunk = pa.FixedSizeListArray.from_arrays(values, flat.size)
        chunks.append(chunk if shape[0] is None else pa.ExtensionArray.from_storage(kind, chunk))
    return pa.chunked_array(chunks, type=kind)


_VALUE_TYPES = {"float32": lambda pa: pa.float32(), "float16": lambda pa: pa.float16(),
                "bfloat16": lambda pa: pa.uint16()}


def write_parquet(f: BinaryIO, rows: list[Row], shape: tuple, dtype: str, record: dict | None = None) -> None:
    """One Parquet shard of `rows` (in row order) into the open binary file `f`."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    schema = table_schema(shape, dtype, record)
    columns: dict[str, Any] = {"key": [r.key for r in rows], "input": [r.input for r in rows],
                               "tokens": _tokens_column(pa, rows, shape, dtype)}
    if shape[0] is None:
        columns["grid"] = [None if r.grid is None else list(r.grid) for r in rows]
    columns["error"] = [r.error for r in rows]
    for name in META_COLUMNS:
        columns[name] = [(r.meta or {}).get(name) for r in rows]
    table = pa.table([pa.array(v, type=schema.field(n).type) if isinstance(v, list) else v
                      for n, v in columns.items()], schema=schema)
    rows_of_tokens = (shape[0] or 1) * shape[1] * (4 if dtype == "float32" else 2)
    pq.write_table(table, f, row_group_size=max(1, _GROUP_BYTES // rows_of_tokens),
                   compression={name: ("none" if name == "tokens" else "snappy") for name in schema.names},
                   use_dictionary=["key", "error"], write_statistics=["key", "input", "error"])


def describe_table(f) -> tuple[tuple, str] | str:
    """A Parquet shard's (rows, *token shape) and dtype, from its footer; or why it is not one
    (native: the token shape's rows are None)."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"not a Parquet shard ({str(exc)[:80]})"
    dtype = (schema.metadata or {}).get(b"vitembed.dtype", b"").decode()
    if "tokens" not in schema.names or not dtype:
        return "a Parquet table that is not a vitembed shard"
    kind = schema.field("tokens").type
    if isinstance(kind, pa.FixedShapeTensorType):
        shape = tuple(kind.shape)
    elif pa.types.is_list(kind) and pa.types.is_fixed_size_list(kind.value_type):
        shape = (None, kind.value_type.list_size)
    else:
        return "a Parquet table whose tokens are of no vitembed type"
    return (meta.num_rows, *shape), dtype


def huggingface_features(path: str | os.PathLike):
    """The `datasets.Features` of a Parquet shard, for `datasets.load_dataset("parquet", data_files=...,
    features=...)`: `datasets` maps no Arrow extension type to a feature, so tokens are given as
    what they are stored as, a fixed-length list of (N+1)*D values (a native run's: a list of
    D-long lists). Reshape a row's tokens to (N+1, D)."""
    import pyarrow.parquet as pq
    from datasets import Features, List, Value

    schema = pq.read_schema(path)
    found = describe_table(path)
    if isinstance(found, str):
        raise ValueError(f"{path}: {found}")
    (_, *shape), dtype = found
    value = Value("uint16" if dtype == "bfloat16" else dtype)
    features = {"key": Value("string"), "input": Value("string"),
                "tokens": List(List(value, length=shape[1])) if shape[0] is None else List(value, length=math.prod(shape))}
    if "grid" in schema.names:
        features["grid"] = List(Value("int32"), length=2)
    features.update({name: Value("string") for name in ("error", *META_COLUMNS)})
    return Features(features)


# --- WebDataset --------------------------------------------------------------------------------

def sample_key(index: int) -> str:
    """A WebDataset sample's key: the input's number, zero-padded (sorts in input order)."""
    return f"{index:0{_KEY_DIGITS}d}"


def write_tar(f: BinaryIO, rows: Iterable[Row]) -> None:
    """One WebDataset shard: `KEY.npy` and `KEY.json` of each encoded row, in row order; members
    carry fixed metadata (mode 0444, no owner, time 0), so that the same rows give the same bytes."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            if row.tokens is None:
                continue
            key = sample_key(row.index)
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(row.tokens), allow_pickle=False)  # a .npy output's bytes
            info = {"key": row.key, "input": row.input, **({"grid": list(row.grid)} if row.grid else {}),
                    **{name: text for name, text in (row.meta or {}).items() if name in META_COLUMNS}}
            _add(tar, f"{key}.npy", buffer.getvalue())
            _add(tar, f"{key}.json", json.dumps(info, ensure_ascii=False).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


_NPY_HEADER = 4096  # bytes of a member read for its .npy header: far above any one of tokens


def describe_tar(f) -> tuple[tuple, str] | str:
    """A WebDataset shard's (samples, *token shape) and dtype, from its members' .npy headers
    (native: rows None where they differ); or why it is not one."""
    shapes, dtypes = set(), set()
    count = 0
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(".npy"):
                    continue
                if not member.isfile():
                    return "a tar with a .npy member that is not a file"
                head = tar.extractfile(member).read(min(member.size, _NPY_HEADER))
                header = io.BytesIO(head)
                version = np.lib.format.read_magic(header)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(header)
                if header.tell() + math.prod(shape) * dtype.itemsize != member.size:
                    return f"a tar whose {member.name} is not whole"
                shapes.add(shape)
                dtypes.add(dtype.name)
                count += 1
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        return f"not a WebDataset shard ({str(exc)[:80]})"
    if not count or len(dtypes) != 1 or len({s[1:] for s in shapes}) != 1:
        return "a tar without one kind of token array"
    first = next(iter(shapes))
    return (count, None if len(shapes) > 1 else first[0], *first[1:]), dtypes.pop()
