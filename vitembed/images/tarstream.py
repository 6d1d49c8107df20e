"""Tar members read in order, as a stream: each header parsed once; the caller reads a member's
data or lets it be passed over (seeked over in a plain local shard, read through in any other).

It reads what tar writers write: v7 and POSIX ustar headers (a name's `prefix` field included),
pax extended and global records (`path` and `size`; the rest is not needed here), GNU long names
(`L`; `K` long link names are read past) and GNU base-256 numbers. Compressed shards (gzip,
bzip2, xz) are decompressed as a stream by the standard library; zstd is refused by name.

Members are told apart by kind: `FILE` (regular data), `DIR`, and `OTHER` (links, devices,
FIFOs, sparse files and types no tar writer of samples uses), whose data, where it has any, is
passed over. A damaged shard raises `TarFormatError` where the damage is met: a header whose
checksum does not match (at the start: not a tar file), data or a header cut short, a member
whose declared size runs past the end of the file, records over `EXTENDED_BYTES`. What was read
before it stands. (`tarfile` ends a shard quietly at a bad header after the first one; here the
shard's report says it broke off.)

Why not the standard library's `tarfile`, which the first version used: for the small members
of thumbnail shards, `tarfile` spent most of the planning process's time per sample (a
`TarInfo` with every field decoded, a position check and a seek per member, and a file object
per member read), making tar shards slower to encode than the same images as files; this reader
parses only the fields a sample needs. The tests check it against `tarfile` on archives of
every format `tarfile` writes, and on the hostile shards.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["DIR", "EXTENDED_BYTES", "FILE", "Member", "OTHER", "TarFormatError", "TarStream"]

FILE, DIR, OTHER = "file", "dir", "other"
EXTENDED_BYTES = 1 << 20  # the most bytes of one pax record set or GNU long name
BLOCK = 512
_ZEROS = bytes(BLOCK)
_CHUNK = 1 << 20  # bytes read at a time through data that is passed over in a stream
_REGULAR = (b"0", b"\0", b"7")  # regular data, contiguous files
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: never have data
_POSIX_MAGIC = b"ustar\x00"
_SIGNED = struct.Struct("148b8x356b")  # some old writers summed signed bytes for the checksum
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))
_ZSTD = b"(\xb5/\xfd"


class TarFormatError(ValueError):
    """The shard is damaged (or not a tar file) where it was met; the message says how, in one line."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member: its path as stored, its kind (FILE, DIR, OTHER) and its data's size."""

    name: str
    kind: str
    size: int


class TarStream:
    """The members of a tar read from `fileobj` in order (iterate once); `read` gives the data of
    the member just given, if it is wanted, before the next one is asked for.

    Args:
        fileobj: a binary file object at the tar's first byte. A plain file that seeks has the
            data it is not asked for seeked over (and a size past its end found at once); any other
            (a compressed shard, a stream from an object store) is read through.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._size = _seekable_size(fileobj)
        if self._size is not None:
            head = fileobj.read(6)
            fileobj.seek(-len(head), os.SEEK_CUR)
        else:
            if not isinstance(fileobj, io.BufferedReader):
                fileobj = io.BufferedReader(_Raw(fileobj), _CHUNK)
            head = fileobj.peek(6)[:6]
        if head.startswith(_ZSTD):
            raise TarFormatError("zstd-compressed, which vitembed does not read: decompress it first (zstd -d)")
        opener = next((opener for magic, opener in _COMPRESSED if head.startswith(magic)), None)
        if opener is not None:
            fileobj, self._size = opener(fileobj), None
        self._file = fileobj
        self._start = fileobj.tell() if self._size is not None else 0
        self._at = 0  # bytes of the tar consumed
        self._given: Member | None = None  # the member just given, while its data is not read
        self._data = 0  # the bytes of data it has (0 for a link, a device, ...)

    def __iter__(self) -> Iterator[Member]:
        records: dict[bytes, bytes] = {}  # global pax records, for every member after them
        extended: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        while True:
            self._pass_over()
            block = self._read(BLOCK, allow_end=True)
            if block is None or block == _ZEROS:
                if block is None and self._at == 0:
                    raise TarFormatError("an empty file")
                return
            kind, size, name = self._header(block)
            if kind in (b"x", b"g", b"L", b"K"):
                data = self._extended(size)
                if kind == b"x":
                    extended = _pax_records(data)
                elif kind == b"g":
                    records = {**records, **_pax_records(data)}
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                continue
            fields = {**records, **extended} if records or extended else extended
            if b"size" in fields:
                size = _decimal(fields[b"size"], "pax size")
            if long_name is not None:
                name = long_name
            if b"path" in fields:
                name = fields[b"path"]
            extended, long_name = {}, None
            if kind == b"S" and block[482]:  # old GNU sparse: its map goes on in blocks of its own
                while self._read(BLOCK)[504]:
                    pass
            member_kind = (DIR if kind == b"5" or (kind in _REGULAR and name.endswith(b"/")) else
                           FILE if kind in _REGULAR and not any(key.startswith(b"GNU.sparse") for key in fields) else
                           OTHER)
            self._given = Member((name.rstrip(b"/") if member_kind == DIR else name).decode("utf-8", "surrogateescape"),
                                 member_kind, size)
            self._data = 0 if kind in _NO_DATA else size
            yield self._given

    @property
    def in_place(self) -> bool:
        """Whether members' data lie in the file as it is (a plain shard in a file that seeks), at `offset`."""
        return self._size is not None

    def offset(self, member: Member) -> int:
        """Where the data of `member`, the one just given, starts in the file (`in_place` shards)."""
        if member is not self._given or not self.in_place:
            raise ValueError("offset() is for the member just given, of a shard read in place")
        return self._start + self._at

    def read(self, member: Member) -> bytes:
        """The data of `member`, the one just given (its size checked by the caller first)."""
        if member is not self._given:
            raise ValueError("read() is for the member just given, once")
        size, self._given = self._data, None
        data = self._read(size)
        self._skip(-size % BLOCK)
        return data

    def _pass_over(self) -> None:
        """Past the data of the member just given, if it was not read."""
        if self._given is not None:
            self._given = None
            self._skip(self._data + -self._data % BLOCK)

    def _header(self, block: bytes) -> tuple[bytes, int, bytes]:
        """(type flag, size, name) of a header block, its checksum checked."""
        try:
            checksum = _number(block[148:156])
        except TarFormatError:
            checksum = -1
        if checksum != sum(block[:148]) + 256 + sum(block[156:]) and checksum != sum(_SIGNED.unpack(block)) + 256:
            raise TarFormatError("not a tar file (its first header does not check)" if self._at == BLOCK else
                                 f"a damaged tar header at byte {self._at - BLOCK}")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == _POSIX_MAGIC and block[345]:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _number(block[124:136])
        if size < 0:
            raise TarFormatError(f"a negative size in the tar header at byte {self._at - BLOCK}")
        return block[156:157], size, name

    def _extended(self, size: int) -> bytes:
        """The data of a pax or GNU long-name header, within EXTENDED_BYTES."""
        if size > EXTENDED_BYTES:
            raise TarFormatError(f"an extended tar header of {size} bytes, over the {EXTENDED_BYTES} allowed")
        data = self._read(size)
        self._skip(-size % BLOCK)
        return data

    def _read(self, size: int, allow_end: bool = False) -> bytes | None:
        data = self._file.read(size)
        self._at += len(data)
        if len(data) < size:
            if allow_end and not data:
                return None
            raise TarFormatError("unexpected end of data")
        return data

    def _skip(self, size: int) -> None:
        if not size:
            return
        if self._size is not None:
            if self._at + size > self._size:
                raise TarFormatError("unexpected end of data (a size past the end of the file)")
            self._at += size
            self._file.seek(self._start + self._at)
            return
        while size:
            data = self._file.read(min(size, _CHUNK))
            if not data:
                raise TarFormatError("unexpected end of data")
            self._at += len(data)
            size -= len(data)


def _seekable_size(fileobj: BinaryIO) -> int | None:
    """The bytes a plain local file holds from its position on; None for anything read as a stream."""
    try:
        if not fileobj.seekable():
            return None
        return os.fstat(fileobj.fileno()).st_size - fileobj.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _number(field: bytes) -> int:
    """A header's number: octal text (to its first NUL), or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"a tar header number that is not octal ({text[:12]!r})") from None


def _decimal(text: bytes, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TarFormatError(f"a {what} that is not a number ({text[:20]!r})") from None
    if value < 0:
        raise TarFormatError(f"a negative {what}")
    return value


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The `LENGTH KEY=VALUE\\n` records of a pax header."""
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.find(b" ", at)
        length = _decimal(data[at:space], "pax record length") if space > at else 0
        record = data[space + 1:at + length - 1]
        if length == 0 or at + length > len(data) or data[at + length - 1:at + length] != b"\n" or b"=" not in record:
            raise TarFormatError("a damaged pax header record")
        key, _, value = record.partition(b"=")
        records[key] = value
        at += length
    return records


class _Raw(io.RawIOBase):
    """A stream with only `read(n)` (pyarrow's input streams) as a raw file, for a buffered reader."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
