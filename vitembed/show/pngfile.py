"""Where `vitembed show` writes its PNG, and writing it safely (no Pillow, no numpy here).

Names: `-o FILE.png` exactly there; `-o DIR` (an existing folder) the default name inside it;
`-o -` stdout; no `-o`, the default name: beside the input (`cat.jpg` -> `cat.patches.png`,
`cat.npy` -> `cat.tokens.png`), or `filters.png` / `positions.png` in the current folder.

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

__all__ = ["PNG_SIGNATURE", "check_replaceable", "picture_target", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        return source.with_name(name) if source is not None else Path(name)
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
