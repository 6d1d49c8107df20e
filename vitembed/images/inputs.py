"""What to encode: files, folders walked in sorted order, path lists from stdin, and (on Ray) URIs
that pyarrow reads, listed in the same order (`uris`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from ..errors import one_line
from .decode import is_image_path
from ..files.uris import ARROW_SCHEMES, Uri, UriError, filesystem, is_uri

__all__ = ["OWN_OUTPUTS", "Source", "iter_sources", "read_path_list"]

OWN_OUTPUTS = (".npy", ".pt", ".pth")  # what vitembed writes; never images


@dataclass(frozen=True)
class Source:
    """One input image.

    Attributes:
        path: where to read it (a `uris.Uri` for a file that pyarrow reads).
        rel: its place under an output folder: the path relative to the folder it was found in
            (just the file name for a file named directly).
        error: set when the input is known to be bad before reading it (a missing path).
        meta: text that came with the image and goes with its tokens into outputs that carry it
            (a dataset sample's `json` / `txt` members, by extension), or None.
        strain: set by the decoder that resized it, where the resize strained the image
            ("upscaled" more than 4x, "squashed" beyond 2:1: `resolution.resize_strain`), for a note.
    """

    path: Path
    rel: PurePath
    error: str | None = None
    meta: dict[str, str] | None = None
    strain: str | None = None


def iter_sources(
    args: Iterable[str | os.PathLike], stdin: BinaryIO | None = None, null: bool = False,
    on_own_output: Callable[[Path], None] | None = None, uris: bool = False,
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
    """
    for arg in args:
        if os.fspath(arg) == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin to read paths from")
            for path in read_path_list(stdin, null):
                if uris and _arrow_uri(os.fspath(path)):  # a Path keeps one slash of the URI's two
                    yield Source(path, _safe_relative(path), "a URI in a list on stdin: on Ray, give URIs as arguments")
                    continue
                yield from _expand(path, _safe_relative(path), on_own_output)
        elif uris and _arrow_uri(arg):
            yield from _expand_uri(arg)
        elif is_uri(os.fspath(arg)) and not os.path.lexists(arg):  # kept as typed: a Path would drop a slash
            text = os.fspath(arg)
            yield Source(Uri(text), PurePath(text.rstrip("/").rpartition("/")[2].partition("?")[0] or "input"),
                         _missing(text))
        else:
            path = Path(arg)
            yield from _expand(path, PurePath(path.name), on_own_output, os.fspath(arg))


def _expand(path: Path, rel: PurePath, on_own_output: Callable[[Path], None] | None,
            typed: str | None = None) -> Iterator[Source]:
    try:
        is_dir = path.is_dir()
    except OSError:  # a symlink loop or an unreadable parent
        is_dir = False
    if is_dir:
        yield from _walk(path, on_own_output)
    elif os.path.lexists(path) and not os.path.exists(path):
        yield Source(path, rel, "broken symbolic link")
    elif not os.path.lexists(path):
        yield Source(path, rel, _missing(typed or os.fspath(path)))
    elif on_own_output is not None and (path.suffix.lower() in OWN_OUTPUTS or _drawn(path)):
        on_own_output(path)
    else:
        yield Source(path, rel)


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


def _expand_uri(uri: str) -> Iterator[Source]:
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
        yield from _walk_uri(uri, fs, path)
    elif kind == FileType.NotFound:
        yield Source(Uri(uri), rel, "no such file or folder")
    else:
        yield Source(Uri(uri, uri, path), rel, None if kind == FileType.File else _NOT_REGULAR)


def _walk_uri(uri: str, fs, root: str) -> Iterator[Source]:
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
        for entry in entries:
            if entry.type == FileType.Directory:
                subfolders.append((entry.path, rel / entry.base_name))
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
    from ..show.pngfile import drawn_by_vitembed

    return drawn_by_vitembed(path)


def _walk(root: Path, on_own_output: Callable[[Path], None] | None = None) -> Iterator[Source]:
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
        for entry in entries:
            try:
                entry_is_dir = entry.is_dir()
            except OSError:
                entry_is_dir = False
            if entry_is_dir:
                subfolders.append((Path(entry.path), rel / entry.name))
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
