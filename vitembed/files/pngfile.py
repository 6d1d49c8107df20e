"""Where `vitembed show` writes its PNG, and writing it safely (no Pillow, no numpy here).

Names: `-o FILE.png` exactly there; `-o DIR` (an existing folder) the default name inside it;
`-o -` stdout; no `-o`, the default name in the current folder (`cat.jpg` -> `cat.patches.png`,
`cat.npy` -> `cat.tokens.png`, `filters.png`, `positions.png`): never among the photos, where the
next `vitembed encode photos/` would take it for one (it passes over such pictures: `drawn_by_vitembed`).

Replacing: a file already at the target is replaced only when it is a PNG (an earlier picture),
and the replacement is said on stderr; anything else there (another kind of file, a symbolic
link, a folder, or the input itself) is refused with a one-line error, and nothing is written.

Writing: `writes.atomic_write`'s way, the one writer of every vitembed file: the bytes go to a new
temporary file in the target's folder (created exclusively, so a planted symbolic link is never
followed), which is then renamed over the target (atomic; a link at the target would be
replaced, never written through). A reader sees the old picture or the new one, never half of
one, and a killed command's temporary is removed by the next write into that folder.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..files.writes import describe_folder_error, replace_atomically

__all__ = ["PNG_KEY", "PNG_SIGNATURE", "check_replaceable", "drawn_by_vitembed", "picture_target", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEY = "vitembed"  # the keyword of the text chunk every picture of `vitembed show` carries
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_CHUNKS_READ = 64  # chunks before the image data looked at, at most: Pillow writes text chunks first


def picture_target(output: str | None, kind: str, source: Path | None) -> Path | None:
    """The file a picture goes to, or None for stdout.

    Args:
        output: the -o option: None, "-", a folder or a .png file.
        kind: the picture ("patches", "tokens", "filters", "positions"), for default names.
        source: the input file the picture is of, or None (a layer's own picture).

    Raises:
        ConfigError: -o names something other than a .png file or a folder.
    """
    name = f"{source.stem}.{kind}.png" if source is not None else f"{kind}.png"
    if output == "-":
        return None
    if output is None:
        return Path(name)
    path = Path(output)
    if path.is_dir():
        return path / name
    if path.suffix.lower() != ".png":
        raise ConfigError(f"-o {output}: pictures are PNG files; name a .png file, a folder, or - for stdout")
    return path


def _refusal(path: Path, protected: tuple[Path, ...]) -> str | None:
    """Why the existing `path` must not be replaced, or None when it may be (a PNG file)."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there to replace; writing will say why
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link; vitembed does not replace links: remove it or pick another -o"
    if not stat.S_ISREG(info.st_mode):
        return "exists and is not a file; pick another -o"
    for other in protected:
        try:
            if os.path.samefile(path, other):
                return "is the input itself; pick another -o"
        except OSError:
            continue
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
    except OSError as exc:
        return f"exists and cannot be read ({exc.strerror})"
    if head != PNG_SIGNATURE:
        return "exists and is not a PNG picture; vitembed replaces only earlier pictures: remove it or pick another -o"
    return None


def check_replaceable(path: Path, protected: tuple[Path, ...] = ()) -> None:
    """Raise OutputError now if `path` holds something `write_png` would refuse to replace (so
    that a command fails before its work, not after it); `write_png` checks again.

    Args:
        path: the target.
        protected: files that must never be replaced (the inputs).
    """
    reason = _refusal(path, protected)
    if reason:
        raise OutputError(f"{path}: {reason}")


def write_png(data: bytes, path: Path, protected: tuple[Path, ...] = ()) -> bool:
    """Write PNG bytes to `path` atomically, never through a link.

    Args:
        data: the PNG file's bytes.
        path: the target.
        protected: files that must never be replaced (the inputs).

    Returns:
        True when an earlier PNG at `path` was replaced, False when the file is new.

    Raises:
        OutputError: the target must not be replaced (see the module's docstring), or the write
            failed (no such folder, permission, full disk); no temporary file is left behind.
    """
    check_replaceable(path, protected)
    existed = os.path.lexists(path)
    try:
        replace_atomically(path, data)
        return existed
    except OSError as exc:
        folder = path.parent
        reason = f"{folder}: {describe_folder_error(folder, exc)}" \
            if exc.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR) else exc.strerror or exc
        raise OutputError(f"{path}: cannot write: {reason}") from None


def drawn_by_vitembed(path: str | os.PathLike) -> bool:
    """Whether `path` is a PNG that `vitembed show` drew: its chunks before the image data hold
    the text chunk `PNG_KEY`. Reads a few chunk headers (no decoding, seeks past their data);
    False for anything else, or a file that cannot be read (the encode then says why)."""
    from ..files.reads import NotRegularFile, open_regular

    key = PNG_KEY.encode() + b"\0"
    try:
        with open_regular(path) as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return False
            for _ in range(_CHUNKS_READ):
                header = f.read(8)
                if len(header) < 8 or header[4:] in (b"IDAT", b"IEND"):
                    return False
                length = int.from_bytes(header[:4], "big")
                if header[4:] in _TEXT_CHUNKS and length >= len(key):
                    if f.read(len(key)) == key:
                        return True
                    length -= len(key)
                f.seek(length + 4, os.SEEK_CUR)  # the data's rest and the CRC
    except (NotRegularFile, OSError):
        return False
    return False
