"""Files out, safely: atomic writes that never follow a link. (Files in: `reads`.)

Every file vitembed writes is first created under a fresh, unpredictable temporary name in its
own folder, with `O_CREAT | O_EXCL | O_NOFOLLOW` (a name that exists, or a planted symbolic link,
is never opened: another name is drawn), then renamed over the target, which replaces a link
rather than following it. At any instant an output either does not exist or is complete.
Temporaries of a killed run are removed the next time a run writes into that folder: a run's
writers share a `Cleaner`, which cleans each folder before the run's first write there. Temporary
names are short (`.vitembed-PID-RANDOM.tmp`), so that they fit wherever the output's name fits.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError

__all__ = ["Cleaner", "atomic_write", "clean_stale_temporaries", "describe_folder_error", "describe_os_error",
           "is_temporary", "leave_temporaries", "process_alive", "replace_atomically", "silence_stream",
           "temporary_name"]

_TMP_RE = re.compile(r"^\.vitembed-(\d+)-[0-9a-f]+\.tmp$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None], cleaner: Cleaner | None = None) -> int:
    """Write `data` to `path` through a temporary file and a rename; returns the bytes written.

    Dead runs' temporaries in its folder are removed first: by the run's `cleaner`, once per
    folder, or (without one: a file written alone) now.

    Raises:
        OutputError: the folder cannot be made, the disk is full, the target is read-only, ...
            No partial file is left behind.
    """
    try:
        return replace_atomically(path, data, cleaner)
    except OSError as exc:
        raise OutputError(f"{path}: {describe_os_error(exc)}") from None


def replace_atomically(path: Path, data: bytes | Callable[[BinaryIO], None], cleaner: Cleaner | None = None) -> int:
    """`atomic_write`, for a caller that words the OSError itself (`pngfile.write_png`)."""
    folder = path.parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (cleaner or _clean_now)(folder)
        tmp, fd = _create_temporary(folder)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            size = f.tell()
        os.replace(tmp, path)
        return size
    except BaseException:
        _remove_quietly(tmp)
        raise


def temporary_name() -> str:
    """A temporary's name: this process's PID and 64 random bits, which nobody can predict."""
    return f".vitembed-{os.getpid()}-{secrets.token_hex(8)}.tmp"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `temporary_name`'s."""
    return _TMP_RE.match(name) is not None


def _create_temporary(folder: Path) -> tuple[Path, int]:
    """A new file in `folder` under a name nobody could have predicted, opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY
    for _ in range(100):
        tmp = folder / temporary_name()
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # planted, or (once in 2^64) drawn twice: draw again
    raise FileExistsError(errno.EEXIST, "cannot create a temporary file", str(folder))


_REASONS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "is a symbolic link, which vitembed does not follow",
}


def describe_os_error(exc: OSError) -> str:
    """An OSError's reason in a few plain words."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc)


def describe_folder_error(folder: Path, exc: OSError) -> str:
    """Why files could not be made in `folder`, in plain words: a path there that is no folder
    says what it is (mkdir says "File exists" for /dev/null), and a folder whose new files are
    "missing" (/proc, /sys: no file can be created there) says so."""
    from .reads import file_kind

    try:
        st = os.stat(folder)
    except OSError:
        return describe_os_error(exc)
    if not stat.S_ISDIR(st.st_mode):
        return f"exists and is {file_kind(st.st_mode)}, not a folder"
    if exc.errno == errno.ENOENT:
        return "no file can be created in this folder (a special file system, such as /proc)"
    return describe_os_error(exc)


def _remove_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


_cleaning = [True]  # this process's setting, made once by the code that owns the process


def leave_temporaries() -> None:
    """From now on, this process's writes leave other processes' temporaries alone. For a Ray
    actor's process: on storage that several machines share, the PID in a temporary's name is a
    process of some machine, not necessarily a dead one of this; the run's driver cleans up after
    the run."""
    _cleaning[0] = False


def _clean_now(folder: Path) -> None:
    if _cleaning[0]:
        clean_stale_temporaries(folder)


class Cleaner:
    """The folders one run has cleaned of dead runs' temporaries: each is cleaned before the run's
    first write into it, once (a folder holds many outputs). One per run, so that the next run
    cleans again; a copy sent to another process starts empty (that process cleans for itself)."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, folder: Path) -> None:
        key = os.path.abspath(folder)
        with self._lock:  # writer threads: the first to reach a folder cleans it, the others wait
            if key not in self._done:
                self._done.add(key)
                _clean_now(folder)

    def __reduce__(self):
        return Cleaner, ()


def clean_stale_temporaries(folder: Path) -> int:
    """Remove temporaries of vitembed runs that no longer live; returns how many were removed.

    Unlinking never follows a link: a planted one is removed itself, its target untouched.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine may still write (a zombie cannot)."""
    return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    # A killed decoder whose parent died with it stays a zombie until init reaps it, which in a
    # container may take long: it writes nothing more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def silence_stream(stream) -> None:
    """Point a stream whose reader went away (or whose disk is full) at /dev/null: later writes,
    and the interpreter's own flush at exit, must not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)
