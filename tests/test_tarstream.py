"""The tar reader (`vitembed/images/tarstream.py`) against the standard library's `tarfile`: the same
members, names, kinds and data for archives of every format `tarfile` writes, plain and
compressed, from a file and from a stream; and damaged archives raise `TarFormatError` where the
damage is, never quietly end."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitembed.images.tarstream import DIR, EXTENDED_BYTES, FILE, OTHER, TarFormatError, TarStream

KINDS = {tarfile.REGTYPE: FILE, tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: OTHER, tarfile.LNKTYPE: OTHER,
         tarfile.FIFOTYPE: OTHER, tarfile.CHRTYPE: OTHER}
COMPRESS = {"": lambda b: b, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


class Stream(io.RawIOBase):
    """Bytes that only read (as pyarrow's input streams do): no seek, no peek, short reads."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = min(size if size >= 0 else len(self._data), 1000)  # never more than 1000 bytes at once
        out = self._data[self._at:self._at + size]
        self._at += len(out)
        return out


def build(members: list[tuple[str, bytes, bytes]], fmt: int, pax: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, pax_headers=pax or {}) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
            elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc/" + "p" * len(data)
            info.mtime = 1.5  # a float: pax writes an mtime record, as webdataset's TarWriter does
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def expected(archive: bytes) -> list[tuple[str, str, bytes | None]]:
    """What tarfile reads: (name, kind, data of regular members)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(info.name, KINDS[info.type], tar.extractfile(info).read() if info.isreg() else None)
                for info in tar]


def read_all(source, wanted=lambda i: True) -> list[tuple[str, str, bytes | None]]:
    tar = TarStream(source)
    out = []
    for i, member in enumerate(tar):
        data = tar.read(member) if member.kind == FILE and wanted(i) else None
        out.append((member.name, member.kind, data))
    return out


names = st.text(st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1,
                max_size=40).filter(lambda n: n not in (".", ".."))
paths = st.lists(names, min_size=1, max_size=8).map("/".join)
members = st.lists(st.tuples(paths, st.sampled_from(list(KINDS)), st.binary(max_size=1500)), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=members, fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       compress=st.sampled_from(sorted(COMPRESS)), as_stream=st.booleans(), skip=st.integers(0, 3))
def test_the_members_and_data_tarfile_reads(tmp_path: Path, members, fmt, compress, as_stream, skip) -> None:
    try:
        archive = build(members, fmt)
    except ValueError:  # a name ustar cannot hold
        return
    archive = COMPRESS[compress](archive)
    want = [(name, kind, data if skip == 0 or i % skip else None)
            for i, (name, kind, data) in enumerate(expected(archive))]
    wanted = lambda i: skip == 0 or i % skip  # noqa: E731 - data of the others is passed over
    if as_stream:
        got = read_all(Stream(archive), wanted)
    else:
        path = tmp_path / "a.tar"
        path.write_bytes(archive)
        with path.open("rb") as f:
            got = read_all(f, wanted)
    assert got == want


def test_long_names_in_gnu_and_pax_and_a_ustar_prefix() -> None:
    long = "d" * 90 + "/" + "e" * 120 + "/k.jpg"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        assert read_all(io.BytesIO(build([(long, tarfile.REGTYPE, b"xy")], fmt))) == [(long, FILE, b"xy")]
    prefixed = "p" * 120 + "/name.jpg"  # fits ustar only through its prefix field
    assert read_all(io.BytesIO(build([(prefixed, tarfile.REGTYPE, b"z")], tarfile.USTAR_FORMAT))) == [(prefixed, FILE, b"z")]


def test_a_pax_size_and_global_records_apply() -> None:
    archive = build([("a.jpg", tarfile.REGTYPE, b"a" * 700), ("b.jpg", tarfile.REGTYPE, b"b")], tarfile.PAX_FORMAT,
                    pax={"comment": "made by a test"})
    assert read_all(io.BytesIO(archive)) == [("a.jpg", FILE, b"a" * 700), ("b.jpg", FILE, b"b")]
    info = tarfile.TarInfo("big.bin")
    info.size = 3
    info.pax_headers = {"size": "3"}
    header = info.tobuf(tarfile.PAX_FORMAT)
    assert [(m.name, m.size) for m in TarStream(io.BytesIO(header + b"abc".ljust(512, b"\0")))] == [("big.bin", 3)]


def header(name: bytes, kind: bytes, size: int = 0, extra: dict[int, bytes] | None = None, signed: bool = False) -> bytes:
    """A hand-made ustar header block (for what tarfile does not write)."""
    block = bytearray(512)
    block[:len(name)] = name
    block[124:136] = b"%011o\0" % size
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    for at, value in (extra or {}).items():
        block[at:at + len(value)] = value
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % (total % (1 << 18))
    return bytes(block)


def test_old_gnu_sparse_members_and_unknown_types_are_other_and_read_past() -> None:
    sparse = header(b"s.jpg", b"S", 512, {482: b"\x01"})
    extension = bytes(512)  # its byte 504 is 0: the last extension block
    archive = (sparse + extension + b"x" * 512 + header(b"v.jpg", b"V", 3) + b"abc".ljust(512, b"\0")
               + header(b"dir/", b"\0") + header(b"ok.jpg", b"0", 2) + b"ok".ljust(512, b"\0") + bytes(1024))
    assert read_all(io.BytesIO(archive)) == [("s.jpg", OTHER, None), ("v.jpg", OTHER, None), ("dir", DIR, None),
                                             ("ok.jpg", FILE, b"ok")]


def test_a_signed_checksum_is_accepted() -> None:
    archive = header("é.jpg".encode(), b"0", 1, signed=True) + b"x".ljust(512, b"\0")
    assert read_all(io.BytesIO(archive)) == [("é.jpg", FILE, b"x")]


@pytest.mark.parametrize("damage, message", [
    (lambda a: b"", "an empty file"),
    (lambda a: b"just some text, not a tar".ljust(2048, b"."), "not a tar file"),
    (lambda a: a[:1536] + b"\xff" * 512 + a[2048:], "a damaged tar header at byte 1536"),
    (lambda a: a[:700], "unexpected end of data"),
    (lambda a: a[:1024 + 100], "unexpected end of data"),
    (lambda a: (b"(\xb5/\xfd" + a)[:2048], "zstd-compressed"),
    (lambda a: gzip.compress(a)[:300], "Compressed file ended"),
])
def test_damage_raises_where_it_is(tmp_path: Path, damage, message) -> None:
    noise = random.Random(0).randbytes(600)  # so that a compressed copy is longer than its cut
    archive = damage(build([("a.jpg", tarfile.REGTYPE, noise), ("b.jpg", tarfile.REGTYPE, b"b" * 10)],
                           tarfile.USTAR_FORMAT))
    for source in (io.BytesIO(archive), Stream(archive)):
        with pytest.raises(TarFormatError if "Compressed" not in message else EOFError, match=message):
            read_all(source)


def test_a_size_past_the_end_of_a_file_is_found_without_reading(tmp_path: Path) -> None:
    info = tarfile.TarInfo("huge.jpg")
    info.size = 1 << 70  # base-256 in a GNU header
    path = tmp_path / "lie.tar"
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096)
    with path.open("rb") as f:
        tar = iter(TarStream(f))
        assert next(tar).size == 1 << 70
        with pytest.raises(TarFormatError, match="past the end of the file"):
            next(tar)


def test_extended_headers_are_bounded_and_checked() -> None:
    info = tarfile.TarInfo("x")
    info.type, info.size = tarfile.XHDTYPE, EXTENDED_BYTES + 1
    with pytest.raises(TarFormatError, match="over the"):
        list(TarStream(io.BytesIO(info.tobuf(tarfile.USTAR_FORMAT) + bytes(EXTENDED_BYTES + 1024))))
    info.size = 512
    with pytest.raises(TarFormatError, match="damaged pax header record"):
        list(TarStream(io.BytesIO(info.tobuf(tarfile.USTAR_FORMAT) + b"99 path=a\n".ljust(512, b"z"))))


def test_read_is_for_the_member_just_given_once() -> None:
    tar = TarStream(io.BytesIO(build([("a.jpg", tarfile.REGTYPE, b"a"), ("b.jpg", tarfile.REGTYPE, b"b")],
                                     tarfile.USTAR_FORMAT)))
    members = iter(tar)
    first = next(members)
    assert tar.read(first) == b"a"
    with pytest.raises(ValueError, match="once"):
        tar.read(first)
    second = next(members)
    with pytest.raises(ValueError):
        tar.read(first)
    assert tar.read(second) == b"b"
