"""Files that others made (weights, outputs to inspect), checked before a byte of them is read.

- Regular files only: a device (`/dev/zero`, `/dev/urandom`) never ends, and opening a FIFO blocks
  forever, so a path is `os.stat`ed (links followed) before anything opens it, and opened without
  blocking where we open it ourselves.
- Zip archives (`.pt`) with stored records only: `torch.save` never compresses, and a compressed
  record can inflate without bound (a zip bomb).
- What a file looks like, from its first bytes, for messages.

Free of torch and numpy, so that `vitembed inspect x.npy` imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import zipfile
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError, one_line

__all__ = ["Held", "NotRegularFile", "Stored", "ZIP_MAGIC", "check_regular", "compressed_record", "file_kind",
           "files_kept_open", "looks_like", "open_record", "open_regular", "read_head"]

ZIP_MAGIC = b"PK\x03\x04"

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))

# First bytes -> what the file is, for "not a .npy or .pt output (it looks like ...)".
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
    (b"\x00\x00\x01\x00", "an ICO image"), (b"PK\x03\x04", "a zip archive"), (b"PK\x05\x06", "an empty zip archive"),
    (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a .npy array"),
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19", "an old-format torch.save file, not a zip"),
)


class Held(str):
    """An input whose bytes were read already, by the process that plans the run (a tar shard's
    member, a Parquet table's row, each read once, in order): the text is its name as shown
    (`SHARD.tar/KEY`); the bytes travel with the job to the decoder, as a `uris.Uri`'s path does.

    The bytes are pickled with it until they are read (`fetch`): a decoder process or a Ray actor
    that read them sends its outcome back without them, while the planner's own copy, which a
    crashed decoder's job is sent again from, keeps them.

    Attributes:
        data: the bytes (None: none to read; `fetch` says why, `error`).
        beside: where its output goes without -o (the container's path without its suffix / key).
    """

    def __new__(cls, text: str, data: bytes | None = None, beside: str | None = None, error: str | None = None):
        self = super().__new__(cls, text)
        self.data, self.beside, self.error, self.spent = data, beside, error, False
        return self

    def __reduce__(self):
        return Held, (str(self), None if self.spent else self.data, self.beside, self.error)

    def fetch(self, limit: int) -> bytes:
        """The bytes, if at most `limit`.

        Raises:
            InputError: there are none, or too many; one line.
        """
        if self.data is None:
            raise InputError(self.error or "its bytes were not sent with it")
        if len(self.data) > limit:
            raise InputError(f"too large: {len(self.data)} bytes, over the {limit} that --max-pixels allows "
                             "(4 bytes a pixel)")
        self.spent = True
        return self.data


class Stored(Held):
    """A held input whose bytes lie in a larger local file (a plain tar shard's member): the
    process that decodes it reads them where they are (`os.pread`), so the planning process reads
    only the shard's headers and no bytes travel with the job.

    The file must be the one planned from: it is opened as a regular file and its identity
    (inode, size, modification time: the same on every machine that mounts it) checked before
    a byte is read; the range is checked against `limit` before it is read. Within a
    `files_kept_open()` scope (a decoder's chunk of work) the file is opened once for all its
    members read there; outside one, once per member.

    Attributes:
        file: the file's absolute path.
        offset, size: where the bytes lie in it.
        identity: (st_ino, st_size, st_mtime_ns) of the file when planned.
    """

    def __new__(cls, text: str, file: str, offset: int, size: int, identity: tuple[int, int, int],
                beside: str | None = None):
        self = super().__new__(cls, text, None, beside)
        self.file, self.offset, self.size, self.identity = file, offset, size, identity
        return self

    def __reduce__(self):
        return Stored, (str(self), self.file, self.offset, self.size, self.identity, self.beside)

    def fetch(self, limit: int) -> bytes:
        if self.size > limit:
            raise InputError(f"too large: {self.size} bytes, over the {limit} that --max-pixels allows "
                             "(4 bytes a pixel)")
        kept = getattr(_kept, "files", None)
        fd = kept.get(self.file) if kept is not None else None
        if fd is None:
            fd = self._open()
            if kept is not None:
                while len(kept) >= _KEPT_FILES:
                    os.close(kept.pop(next(iter(kept))))
                kept[self.file] = fd
        try:
            data = os.pread(fd, self.size, self.offset)
        except OSError as exc:
            raise InputError(f"cannot read {self.file}: {exc.strerror or exc}") from None
        finally:
            if kept is None:
                os.close(fd)
        if len(data) < self.size:
            raise InputError(f"{self.file} was cut short since the run was planned")
        return data

    def _open(self) -> int:
        try:
            fd = os.open(self.file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InputError(f"cannot read {self.file}: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size, st.st_mtime_ns) != tuple(self.identity):
            os.close(fd)
            raise InputError(f"{self.file} changed since the run was planned"
                             + ("" if stat.S_ISREG(st.st_mode) else f" (it is {file_kind(st.st_mode)} now)"))
        return fd


_kept = threading.local()
_KEPT_FILES = 8  # files one `files_kept_open` scope holds open at most (the oldest is closed first)


@contextlib.contextmanager
def files_kept_open():
    """A scope (one thread's) in which `Stored` inputs keep their files open from one member to
    the next, closed when it ends: a decoder's chunk reads a shard's members with one open."""
    if getattr(_kept, "files", None) is not None:  # nested: the outer scope keeps them
        yield
        return
    _kept.files = {}
    try:
        yield
    finally:
        files, _kept.files = _kept.files, None
        for fd in files.values():
            os.close(fd)


def file_kind(mode: int) -> str:
    """What a stat mode is, in words: "a regular file", "a folder", "a character device", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


class NotRegularFile(ValueError):
    """A path that is not a regular file to read; the message says what it is instead."""


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """`path`'s stat, following links, if it is a regular file; never opens it.

    Raises:
        NotRegularFile: missing, a broken link, a folder, a device, a FIFO or a socket.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotRegularFile("broken symbolic link" if os.path.islink(path) else "no such file") from None
    except OSError as exc:
        raise NotRegularFile(f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode)
    return st


def _not_regular(mode: int) -> NotRegularFile:
    return NotRegularFile(f"not a regular file ({file_kind(mode)})")


def open_record(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """A file of vitembed's own (an -o folder's run.json, manifest, lock) opened as a descriptor
    with `flags`, never through a symbolic link and never blocking (a FIFO put in its place opens
    at once, and is then refused), checked to be a regular file.

    Raises:
        NotRegularFile: it is a folder, a FIFO, a device or a socket.
        OSError: it cannot be opened (ELOOP: it is a symbolic link).
    """
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | extra, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode)
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # a regular file: reads and writes as usual
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading if it is a regular file: never blocks, even on a FIFO put in its place.

    Raises:
        NotRegularFile: as `check_regular`.
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotRegularFile(f"cannot read: {exc.strerror or exc}") from None
    try:
        check = os.fstat(fd)
        if not stat.S_ISREG(check.st_mode):  # swapped since the stat above
            raise NotRegularFile("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def compressed_record(path: str | os.PathLike) -> str | None:
    """Why a zip archive is not a plain `torch.save` one (a compressed or unreadable record), or None.

    Reads the archive's central directory only (its size is bounded by the file's).
    """
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as archive:
            if any("/code/__torch__/" in name or name.endswith("/constants.pkl") for name in archive.namelist()):
                return ("a TorchScript archive (torch.jit.save, as OpenAI's clip package ships its models): it holds "
                        "model code, which vitembed never runs; load the model where you trust it (clip.load(name, "
                        "jit=False)) and save model.state_dict(), preferably as .safetensors")
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    method = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                              zipfile.ZIP_LZMA: "lzma"}.get(info.compress_type, f"method {info.compress_type}")
                    return (f"its record {info.filename!r} is compressed ({method}); torch.save stores records "
                            "uncompressed, and vitembed reads no others (a compressed record can inflate without bound)")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        return f"a damaged zip archive ({one_line(exc)})"
    return None


def looks_like(head: bytes) -> str | None:
    """What a file that starts with `head` (16 bytes are enough) looks like, where cheap to tell."""
    if not head:
        return "an empty file"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    found = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if found:
        return found
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return "a safetensors file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    return None


def read_head(path: Path, size: int = 16) -> bytes:
    """The first `size` bytes of a regular file (see `open_regular`)."""
    with open_regular(path) as f:
        return f.read(size)
