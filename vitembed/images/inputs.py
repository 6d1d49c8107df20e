"""What to encode: files, folders walked in sorted order, path lists from stdin, and (on Ray) URIs
that pyarrow reads, listed in the same order (`uris`); datasets among them, WebDataset tar shards
(`tars`: one input a sample) and Parquet image tables (`tables`: one input a row), named as files,
found in folders, or as a brace pattern (`shards/{00000..00099}.tar`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from ..errors import one_line
from .decode import DEFAULT_MAX_PIXELS, is_image_path
from .source import Source
from .tars import container_stem, expand_braces, has_braces, is_tar
from ..files.reads import NotRegularFile, open_regular
from ..files.uris import ARROW_SCHEMES, Uri, UriError, filesystem, is_uri

__all__ = ["Datasets", "OWN_OUTPUTS", "Source", "count_inputs", "is_dataset", "iter_sources", "read_path_list"]

OWN_OUTPUTS = (".npy", ".pt", ".pth")  # what vitembed writes; never images


@dataclass(frozen=True)
class Datasets:
    """How the tar shards and Parquet tables among the inputs are read.

    Attributes:
        limit: the most bytes of one image held (`decode.max_file_bytes` of the run's --max-pixels).
        image_column, key_column: a table's column of images (None: the first of image bytes),
            and of the rows' names (None: their numbers); see `tables`.
        on_passed_over: told `SHARD: member` for each tar member passed over as unsafe (a link, a
            device, an absolute or `..` path).
    """

    limit: int = 4 * DEFAULT_MAX_PIXELS
    image_column: str | None = None
    key_column: str | None = None
    on_passed_over: Callable[[str], None] = lambda text: None
    counting: bool = False  # a dataset's inputs only counted (`count_inputs`), as errors with nothing read


def count_inputs(args: Iterable[str | os.PathLike], uris: bool = False) -> int:
    """How many inputs `iter_sources` will give, about (for a progress bar): a tar shard's samples
    counted from its headers, a table's rows from its footer; nothing held."""
    return sum(1 for _ in iter_sources(args, on_own_output=lambda path: None, uris=uris,
                                       datasets=Datasets(counting=True)))


def is_dataset(name: str) -> bool:
    """Whether a file of this name is read as a dataset (a tar shard, a Parquet table)."""
    return is_tar(name) or name.lower().endswith(".parquet")


def iter_sources(
    args: Iterable[str | os.PathLike], stdin: BinaryIO | None = None, null: bool = False,
    on_own_output: Callable[[Path], None] | None = None, uris: bool = False, datasets: Datasets | None = None,
) -> Iterator[Source]:
    """Expand command-line inputs lazily, in order.

    A file is taken whatever its extension; a folder yields the files under it whose extension
    Pillow registers, recursively, in sorted order; `-` reads paths from `stdin` (one per line,
    or NUL-separated with `null`). Paths read from stdin keep their relative path under an
    output folder, made safe the way tar does it: the root and any `..` parts are dropped.

    With `on_own_output`, a file named directly that is one of vitembed's outputs (.npy, .pt:
    `photos/*` after a run that wrote beside the photos), or a picture `vitembed show` drew (a PNG
    with its text chunk, named or in a folder), goes to it instead: it is no image.

    With `uris` (a run on Ray), an argument that is a URI (s3://, gs://, hdfs://, file://) is a
    file or folder in pyarrow's filesystem for it, folders walked as local ones are.

    A tar shard or a Parquet table, named or found in a folder, is read as `datasets` says (a
    folder's `X.parquet` beside an `X.tar` is img2dataset's record of that shard, passed over); an
    argument that names no file and holds a brace group is WebDataset's pattern of names
    (`tars.expand_braces`).
    """
    datasets = datasets or Datasets()
    for arg in args:
        if os.fspath(arg) == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin to read paths from")
            for path in read_path_list(stdin, null):
                if uris and _arrow_uri(os.fspath(path)):  # a Path keeps one slash of the URI's two
                    yield Source(path, _safe_relative(path), "a URI in a list on stdin: on Ray, give URIs as arguments")
                    continue
                yield from _expand(path, _safe_relative(path), on_own_output, None, datasets)
        elif isinstance(arg, str) and not os.path.lexists(arg) and has_braces(arg):
            yield from _expand_pattern(arg, on_own_output, uris, datasets)
        elif uris and _arrow_uri(arg):
            yield from _expand_uri(arg, datasets)
        elif is_uri(os.fspath(arg)) and not os.path.lexists(arg):  # kept as typed: a Path would drop a slash
            text = os.fspath(arg)
            yield Source(Uri(text), PurePath(text.rstrip("/").rpartition("/")[2].partition("?")[0] or "input"),
                         _missing(text))
        else:
            path = Path(arg)
            yield from _expand(path, PurePath(path.name), on_own_output, os.fspath(arg), datasets)


def _expand_pattern(pattern: str, on_own_output, uris: bool, datasets: Datasets) -> Iterator[Source]:
    """The inputs of a brace pattern's names, in order (each as if given by itself)."""
    try:
        names = expand_braces(pattern)
    except ValueError as exc:
        yield Source(Path(pattern), PurePath(Path(pattern).name or "input"), str(exc))
        return
    for name in names:
        if uris and _arrow_uri(name):
            yield from _expand_uri(name, datasets)
        else:
            yield from _expand(Path(name), PurePath(Path(name).name), on_own_output, name, datasets)


def _expand(path: Path, rel: PurePath, on_own_output: Callable[[Path], None] | None,
            typed: str | None = None, datasets: Datasets | None = None) -> Iterator[Source]:
    datasets = datasets or Datasets()
    try:
        is_dir = path.is_dir()
    except OSError:  # a symlink loop or an unreadable parent
        is_dir = False
    if is_dir:
        yield from _walk(path, datasets, on_own_output)
    elif os.path.lexists(path) and not os.path.exists(path):
        yield Source(path, rel, "broken symbolic link")
    elif not os.path.lexists(path):
        yield Source(path, rel, _missing(typed or os.fspath(path)))
    elif on_own_output is not None and (path.suffix.lower() in OWN_OUTPUTS or _drawn(path)):
        on_own_output(path)
    elif is_dataset(path.name):
        yield from _dataset(path, rel, datasets, None if on_own_output is None else lambda: on_own_output(path))
    else:
        yield Source(path, rel)


def _dataset(path: Path, rel: PurePath, datasets: Datasets, on_own_output: Callable[[], None] | None,
             fs=None, shown: str | None = None) -> Iterator[Source]:
    """The samples of a tar shard or the rows of a Parquet table (a local file, or one in
    pyarrow's filesystem `fs`, shown as `shown`), each one input (`tars`, `tables`)."""
    from .tables import read_table
    from .tars import read_shard

    name = rel.name
    rel = rel.with_name(container_stem(name))
    shown = shown or os.fspath(path)
    beside = os.fspath(Path(path).with_name(rel.name)) if fs is None else shown
    tar = is_tar(name)
    try:
        if fs is None or fs.type_name == "local":
            file = open_regular(path)
        else:
            file = fs.open_input_stream(os.fspath(path)) if tar else fs.open_input_file(os.fspath(path))
    except NotRegularFile as exc:
        yield Source(Path(path) if fs is None else Uri(shown), rel, str(exc))
        return
    except OSError as exc:
        yield Source(Path(path) if fs is None else Uri(shown), rel, f"cannot read: {one_line(exc)}")
        return
    with file:
        if datasets.counting:
            from .tables import count_rows
            from .tars import count_samples

            count = count_samples(file) if tar and fs is None else count_rows(file) if not tar else 1
            yield from (Source(Path(shown), rel, "counted") for _ in range(count))
        elif tar:
            yield from read_shard(file, shown, rel, beside, datasets.limit, datasets.on_passed_over, on_own_output,
                                  path if fs is None else None)
        else:
            yield from read_table(file, shown, rel, beside, datasets.limit, image=datasets.image_column,
                                  key=datasets.key_column, on_own_output=on_own_output)


def _takes(name: str, names: set[str]) -> bool:
    """Whether a folder walk takes a dataset file: not img2dataset's `X.parquet` beside `X.tar`."""
    if not name.lower().endswith(".parquet"):
        return True
    stem = container_stem(name)
    return not any(f"{stem}{suffix}" in names for suffix in (".tar", ".tar.gz", ".tgz"))


def _arrow_uri(typed) -> bool:
    """Whether `typed` is a URI of a scheme pyarrow's filesystems may know (as built)."""
    return is_uri(typed) and typed.split(":", 1)[0].lower() in ARROW_SCHEMES


def _missing(typed: str) -> str:
    if not is_uri(typed):
        return "no such file or folder"
    if _arrow_uri(typed):
        return (f"a URL; vitembed reads only local files, except on Ray: add --ray to read it through pyarrow "
                f"({', '.join(f'{s}://' for s in ARROW_SCHEMES[:4])} and file://), or download it first and give its path")
    return (f"a URL; vitembed reads only local files: download it first (curl -O {typed}) and give its "
            "path, or a list of downloaded paths on stdin with -")


def _expand_uri(uri: str, datasets: Datasets) -> Iterator[Source]:
    """A URI's file, or the image files of its folder, as `_walk` finds them in a local one."""
    from pyarrow.fs import FileType

    rel = PurePath(uri.rstrip("/").rpartition("/")[2].partition("?")[0] or "input")
    try:
        fs, path = filesystem(uri)
        kind = fs.get_file_info(path).type
    except (UriError, OSError) as exc:
        yield Source(Uri(uri), rel, str(exc) if isinstance(exc, UriError) else f"cannot read: {one_line(exc)}")
        return
    if kind == FileType.Directory:
        yield from _walk_uri(uri, fs, path, datasets)
    elif kind == FileType.NotFound:
        yield Source(Uri(uri), rel, "no such file or folder")
    elif kind == FileType.File and is_dataset(rel.name):
        yield from _dataset(path, rel, datasets, None, fs, uri)
    else:
        yield Source(Uri(uri, uri, path), rel, None if kind == FileType.File else _NOT_REGULAR)


def _walk_uri(uri: str, fs, root: str, datasets: Datasets) -> Iterator[Source]:
    """`_walk` through pyarrow: files of a folder in name order, then its subfolders. A local
    filesystem's folders are told apart by their inode, so that a link loop is walked once."""
    from pyarrow.fs import FileSelector, FileType

    seen: set = set()
    stack: list[tuple[str, PurePath]] = [(root, PurePath())]
    head, sep, query = uri.partition("?")
    shown = lambda rel: f"{head.rstrip('/')}/{rel.as_posix()}{sep}{query}" if rel.parts else uri  # noqa: E731
    while stack:
        folder, rel = stack.pop()
        try:
            if fs.type_name == "local":
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            entries = fs.get_file_info(FileSelector(folder))
            if fs.type_name == "local":  # pyarrow leaves broken links out; the local walk reports them
                entries += _broken_links(folder, {entry.base_name for entry in entries})
            entries.sort(key=lambda e: e.base_name)
        except OSError as exc:
            yield Source(Uri(shown(rel), uri, folder), rel, f"cannot read folder: {one_line(exc)}")
            continue
        subfolders = []
        names = {entry.base_name for entry in entries}
        for entry in entries:
            if entry.type == FileType.Directory:
                subfolders.append((entry.path, rel / entry.base_name))
            elif entry.type == FileType.File and is_dataset(entry.base_name):
                if _takes(entry.base_name, names):
                    yield from _dataset(entry.path, rel / entry.base_name, datasets, lambda: None, fs,
                                        shown(rel / entry.base_name))
            elif is_image_path(entry.base_name):
                name = rel / entry.base_name
                error = {FileType.File: None, FileType.NotFound: "broken symbolic link"}.get(entry.type, _NOT_REGULAR)
                yield Source(Uri(shown(name), uri, entry.path), name, error)
        stack.extend(reversed(subfolders))


@dataclass(frozen=True)
class _BrokenLink:
    """A broken link in a local folder, as pyarrow's FileInfo would give it."""

    path: str
    base_name: str
    type: Any


def _broken_links(folder: str, listed: set[str]) -> list[_BrokenLink]:
    """The symbolic links in a local `folder` that pyarrow's listing left out (their target is missing)."""
    from pyarrow.fs import FileType

    with os.scandir(folder) as entries:
        return [_BrokenLink(entry.path, entry.name, FileType.NotFound) for entry in entries
                if entry.name not in listed and entry.is_symlink()]


def _drawn(path: Path) -> bool:
    """Whether `path` is a picture of `vitembed show` (a .png with its text chunk)."""
    if path.suffix.lower() != ".png":
        return False
    from ..files.pngfile import drawn_by_vitembed

    return drawn_by_vitembed(path)


def _walk(root: Path, datasets: Datasets, on_own_output: Callable[[Path], None] | None = None) -> Iterator[Source]:
    """Depth-first in name order, following symbolic links but never the same folder twice;
    pictures of `vitembed show` go to `on_own_output`, where given."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, PurePath]] = [(root, PurePath())]
    while stack:
        folder, rel = stack.pop()
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue  # a symlink loop, or a folder linked twice
            seen.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Source(folder, rel, f"cannot read folder: {exc.strerror or exc}")
            continue
        subfolders = []
        names = {entry.name for entry in entries}
        for entry in entries:
            try:
                entry_is_dir = entry.is_dir()
            except OSError:
                entry_is_dir = False
            if entry_is_dir:
                subfolders.append((Path(entry.path), rel / entry.name))
            elif is_dataset(entry.name) and _takes(entry.name, names):
                error = _not_regular(entry)
                if error:
                    yield Source(Path(entry.path), rel / entry.name, error)
                else:  # a shard of vitembed's own (--format wds) is passed over, as .npy files are
                    yield from _dataset(Path(entry.path), rel / entry.name, datasets, lambda: None)
            elif is_image_path(entry.name):
                error = _not_regular(entry)
                if on_own_output is not None and error is None and _drawn(Path(entry.path)):
                    on_own_output(Path(entry.path))
                    continue
                yield Source(Path(entry.path), rel / entry.name, error)
        # Files of a folder first, then its subfolders in name order.
        stack.extend(reversed(subfolders))


def _not_regular(entry: os.DirEntry) -> str | None:
    """Why a folder entry cannot be read as a file (a FIFO would block its reader forever)."""
    try:
        if entry.is_file():
            return None
        os.stat(entry.path)
    except OSError as exc:
        return "broken symbolic link" if entry.is_symlink() else f"cannot read: {exc.strerror or exc}"
    return _NOT_REGULAR


_NOT_REGULAR = "not a regular file (a FIFO, socket or device)"


def _safe_relative(path: Path) -> PurePath:
    parts = [p for p in path.parts[len(path.anchor and [path.anchor]):] if p not in ("..", ".")]
    return PurePath(*parts) if parts else PurePath(path.name or "input")


def read_path_list(stream: BinaryIO, null: bool = False) -> Iterator[Path]:
    """Paths from a byte stream, newline-separated (or NUL-separated); blank entries skipped.

    Read lazily, so that a pipeline starts before its producer ends. Bytes that are not valid
    UTF-8 survive through `os.fsdecode`.
    """
    sep = b"\0" if null else b"\n"
    buffer = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buffer += chunk
        *parts, buffer = buffer.split(sep)
        yield from _decode_paths(parts, null)
    yield from _decode_paths([buffer], null)


def _decode_paths(parts: list[bytes], null: bool) -> Iterator[Path]:
    for raw in parts:
        if not null:
            raw = raw.rstrip(b"\r")
        if raw:
            yield Path(os.fsdecode(raw))
