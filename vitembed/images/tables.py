"""Parquet image tables as inputs: each row's image bytes one input, read a bounded batch at a time.

A table (`table.parquet`, or the `.parquet` files of a folder) is read with pyarrow (`vitembed[parquet]`),
imported only when a table is an input. Each row becomes one input (`inputs.Source`) named
`TABLE.parquet/KEY`, whose bytes travel with its job to the decoder (`reads.Held`).

- **Image column**: `--image-column`, else the first column of image bytes: binary, or a struct
  with a binary `bytes` field (Hugging Face datasets' Image feature: `{bytes, path}`). A row whose
  image is null, or an Image struct that holds only a `path` (a file outside the table, which is
  not read), is that row's error.
- **Keys**: `--key-column` names each row (its value as text; folders in it are kept, `..` and a
  leading `/` dropped); by default the row's number, zero-padded to six digits or more
  (`table.parquet/000123`). A key an earlier row of the table had is that row's error (input names
  must tell rows apart: the manifest and `--skip-existing` go by them), as a null key is.
- **Outputs** under `-o DIR` go to `DIR/TABLE/KEY.npy`; without -o, beside the table, in a folder
  of its name.
- **Bounded**: rows are read one row group at a time. pyarrow reads a row group's column whole
  (its pages, and a dictionary page, which pyarrow's writer fills with a row group's images when
  they come in one call), so a row group whose image column holds more than the file-size limit
  (`decode.max_file_bytes`) is refused, before a byte of it is read, as one error naming its rows;
  the table's other row groups go on. Rows become Python bytes in batches of about `BATCH_BYTES`
  (at least one row, at most `BATCH_ROWS`). An image over the file-size limit is its row's error.
- A table with no image column and a `tokens` column is one of vitembed's own outputs: passed
  over, as .npy files are. A file pyarrow cannot read, or that breaks off, is one error (after
  the rows read before the break).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import PurePath, PurePosixPath
from typing import Any

from ..errors import one_line
from ..files.digests import DigestSet
from ..files.reads import Held
from .source import Source

__all__ = ["BATCH_BYTES", "BATCH_ROWS", "MISSING_PYARROW", "batch_rows", "chunk_bytes", "count_rows", "image_column", "read_table"]

BATCH_BYTES = 64 << 20  # a batch's size, about, read from a row group
BATCH_ROWS = 4096
_BUFFER = 1 << 20  # bytes of a file read at a time
MISSING_PYARROW = "Parquet tables are read with pyarrow, which is not installed: pip install 'vitembed[parquet]'"


def read_table(file: Any, shown: str, rel: PurePath, beside: str, limit: int, *, image: str | None = None,
               key: str | None = None, on_own_output: Callable[[], None] | None = None) -> Iterator:
    """The rows of one table, as `inputs.Source`s.

    Args:
        file: the table: an open file (pyarrow's, or a Python binary file).
        shown: the table as reports name it (its inputs are `shown/KEY`).
        rel, beside: its outputs' folder under -o DIR, and without -o.
        limit: the most bytes of one image (`decode.max_file_bytes`).
        image, key: `--image-column`, `--key-column`.
        on_own_output: called, instead of any row, for a table vitembed wrote.
    """

    def failed(reason: str) -> Source:
        return Source(Held(shown, None, beside), rel, reason)

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        yield failed(MISSING_PYARROW)
        return
    try:
        table = pq.ParquetFile(file, buffer_size=_BUFFER, pre_buffer=False)
        schema = table.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield failed(f"not a Parquet table pyarrow reads: {one_line(exc)}")
        return
    column, why = image_column(schema, image)
    if column is None:
        if image is None and on_own_output is not None and "tokens" in schema.names:
            on_own_output()
        else:
            yield failed(why)
        return
    if key is not None and key not in schema.names:
        yield failed(f"no column {key!r} for --key-column; it has {', '.join(schema.names)}")
        return
    rows = _Rows(shown, rel, beside, limit, len(str(max(table.metadata.num_rows - 1, 0))), key is not None)
    try:
        for group in range(table.num_row_groups):
            meta = table.metadata.row_group(group)
            size = chunk_bytes(meta, column)
            if size > limit:  # pyarrow reads a row group's column whole
                yield failed(f"rows {rows.count} to {rows.count + meta.num_rows - 1} (row group {group}) hold "
                             f"{size} bytes of images, over the {limit} read at once (--max-pixels, 4 bytes a "
                             "pixel): write the table with smaller row groups")
                rows.count += meta.num_rows
                continue
            columns = [column] + ([key] if key is not None else [])
            for batch in table.iter_batches(batch_size=batch_rows(meta), row_groups=[group], columns=columns,
                                            use_threads=False):
                yield from rows.sources(batch, key is not None)
    except (pa.ArrowException, OSError, ValueError) as exc:
        yield failed(f"the table breaks off after {rows.count} row{'s' if rows.count != 1 else ''}: {one_line(exc)}")


def count_rows(file: Any) -> int:
    """How many rows a table holds (from its footer; 1 where it cannot be read: its one error)."""
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    except Exception:  # noqa: BLE001 - whatever it is, the run reports it
        return 1


def image_column(schema: Any, name: str | None = None) -> tuple[str | None, str | None]:
    """(the column of image bytes: `name`, else the first that holds them, None) or (None, why there is none)."""
    if name is not None:
        if name not in schema.names:
            return None, f"no column {name!r} for --image-column; it has {', '.join(schema.names)}"
        if not _holds_images(schema.field(name).type):
            return None, (f"column {name!r} holds {schema.field(name).type}, not image bytes (binary, or a "
                          "struct with a binary 'bytes' field, as Hugging Face's Image feature)")
        return name, None
    found = next((f.name for f in schema if _holds_images(f.type)), None)
    if found is None:
        return None, (f"no column of image bytes (binary, or a struct with a binary 'bytes' field); it has "
                      f"{', '.join(f'{f.name} ({f.type})' for f in schema) or 'no columns'}")
    return found, None


def _holds_images(kind: Any) -> bool:
    import pyarrow as pa

    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or (  # noqa: E731
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t))
    if binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and binary(kind.field("bytes").type)


def chunk_bytes(group: Any, column: str) -> int:
    """The bytes of `column` in a row group (its pyarrow metadata), compressed or not, whichever is more."""
    chunks = (group.column(i) for i in range(group.num_columns))
    return sum(max(c.total_compressed_size, c.total_uncompressed_size) for c in chunks
               if c.path_in_schema == column or c.path_in_schema.startswith(f"{column}."))


def batch_rows(group: Any) -> int:
    """Rows per batch of a row group (its pyarrow metadata): about `BATCH_BYTES` of it, by its
    recorded (uncompressed) size per row."""
    per_row = group.total_byte_size / max(group.num_rows, 1)
    return int(max(1, min(BATCH_ROWS, group.num_rows, BATCH_BYTES // max(per_row, 1))))


class _Rows:
    """Batches of a table -> its rows' Sources, with the keys seen so far (with --key-column)."""

    def __init__(self, shown: str, rel: PurePath, beside: str, limit: int, width: int, keyed: bool) -> None:
        self.shown, self.rel, self.beside, self.limit = shown, rel, beside, limit
        self.width, self.count = max(6, width), 0
        # 8 bytes a key (a table may hold millions); a false match, odds n/2^64, fails one row as a repeat
        self.seen = DigestSet() if keyed else None

    def sources(self, batch: Any, keyed: bool) -> Iterator:
        import pyarrow as pa

        images = batch.column(0)
        paths = None
        if pa.types.is_struct(images.type):
            paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else None
            nulls = images.is_null().to_pylist()
            images = [None if null else data for null, data in zip(nulls, images.field("bytes").to_pylist())]
        else:
            images = images.to_pylist()
        keys = batch.column(1).to_pylist() if keyed else None
        for i, data in enumerate(images):
            yield self._source(data, keys[i] if keyed else None, paths[i] if paths else None, keyed)
            self.count += 1

    def _source(self, data: bytes | None, key: Any, path: Any, keyed: bool):
        name = str(key) if keyed else str(self.count).zfill(self.width)
        parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".", "..")]
        error = None
        if keyed and key is None:
            error, parts = "its key is null", [f"row-{self.count}"]
        elif not parts or "\0" in name:
            error, parts = f"its key {name!r} names no file", [f"row-{self.count}"]
        elif self.seen is not None and not self.seen.add(name):
            error = "the key of an earlier row of this table"
        if error is None and data is None:
            error = (f"no image bytes: the row names a file, {path}, which is not read" if path else "its image is null")
        if error is None and len(data) > self.limit:
            error = f"too large: {len(data)} bytes, over the {self.limit} that --max-pixels allows (4 bytes a pixel)"
        rel = self.rel.joinpath(*parts)
        return Source(Held(f"{self.shown}/{name}", None if error else data, f"{self.beside}/{'/'.join(parts)}", error),
                      rel, error)
