"""WebDataset tar shards as inputs: each shard read once, as a stream, its members grouped into samples.

A shard (`.tar`, `.tar.gz`, `.tgz`) is never extracted: it is read in order, one member at a time,
and each sample becomes one input (`inputs.Source`), named `SHARD.tar/KEY`. In a plain shard in a
local file the decoder reads the image where it lies (`reads.Stored`: this process reads only
headers and seeks over images); from a compressed shard or a stream (an object store) the image's
bytes are read here and travel with its job (`reads.Held`).

- **Samples** are grouped as WebDataset groups them: a member's key is its path up to the first
  dot of its base name (`a/b/00012.seg.png` -> key `a/b/00012`, extension `seg.png`, lower-cased),
  and consecutive members with one key are one sample. Its image is the first of its `jpg`,
  `jpeg`, `png`, `webp` members, else any other one-part extension Pillow reads; its `json` and
  `txt` members (at most `META_BYTES` each, decoded as UTF-8) go to `Source.meta`.
- **Outputs** under `-o DIR` go to `DIR/SHARD/KEY.npy` (the shard's name without its suffix, then
  the key, whose folders are kept); without -o, beside the shard, in a folder of its name.
- **Bounded**: a member is read only if its header declares at most the file-size limit
  (`decode.max_file_bytes`); one declaring more is that sample's error, and its data is passed
  over, never held (a size that runs past the end of the file is a truncation). Only the best
  image member of a sample is held at a time.
- **Passed over**, with a count (one note per run): links, devices, FIFOs, and members whose path
  is absolute or has `..` parts. Folders and names WebDataset gives no key (`.hidden`, `README`)
  are passed over silently, as WebDataset does.
- **Errors**: a sample with no image member, with two members of one extension, or whose key
  an earlier sample of the shard had (input names must tell samples apart: the manifest and
  `--skip-existing` go by them; the first keeps the name), is that sample's error. A corrupt
  image is its sample's error when decoded. A shard that breaks off (truncated, or corrupt
  compressed data) keeps the samples read whole before the break; the rest is one error for the
  shard. A shard whose first sample holds a `.npy` and no image is one of vitembed's own outputs
  (`--format wds`): passed over, as .npy files are.

The members are read by `tarstream.TarStream` (which says why it is not the standard library's
`tarfile`), not by the `webdataset` package: WebDataset's iterator reads every member whole into
memory whatever its header declares, follows its error handlers rather than reporting per
sample, and brings in its own dependencies; `TarStream` gives each header before its data, so
that sizes and member types are checked first, and seeks over the data of members not kept in a
plain local shard. WebDataset's conventions (keys, extensions, brace patterns) are kept, and
tests write shards with its `TarWriter`.
"""

from __future__ import annotations

import itertools
import lzma
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import BinaryIO

from ..errors import one_line
from ..files.digests import DigestSet
from ..files.reads import Held, Stored
from .source import Source
from .tarstream import DIR, FILE, Member, TarFormatError, TarStream

__all__ = ["IMAGE_EXTENSIONS", "MAX_PATTERN_NAMES", "META_BYTES", "TAR_SUFFIXES", "container_stem", "count_samples",
           "expand_braces", "has_braces", "is_tar", "read_shard"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has
META_EXTENSIONS = ("json", "txt")  # carried to Source.meta
META_BYTES = 1 << 20  # the most bytes of one json / txt member carried
MAX_PATTERN_NAMES = 1_000_000  # names one brace pattern may expand to


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def container_stem(name: str) -> str:
    """A shard's or table's file name without its suffix: `00012.tar.gz` -> `00012`."""
    lower = name.lower()
    for suffix in (*TAR_SUFFIXES, ".parquet"):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def has_braces(text: str) -> bool:
    """Whether `text` holds a brace group WebDataset expands: `{000..099}` or `{a,b}`."""
    return any(_RANGE.fullmatch(m.group(1)) or "," in m.group(1) for m in _BRACE.finditer(text))


def expand_braces(text: str) -> Iterator[str]:
    """The names of a brace pattern, lazily, in order: `{000..003}` is 000, 001, 002, 003 (zero
    padding kept: the width of a bound that starts with 0), `{a,b}` is a, b; several groups
    multiply. Other braces are kept as they are.

    Raises:
        ValueError: the pattern names more than `MAX_PATTERN_NAMES`.
    """
    pieces: list[list[str]] = []
    at = 0
    for match in _BRACE.finditer(text):
        body = match.group(1)
        numbers = _RANGE.fullmatch(body)
        if numbers:
            first, last = numbers.groups()
            width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
            step = 1 if int(last) >= int(first) else -1
            choices = _Range(int(first), int(last) + step, step, width)
        elif "," in body:
            choices = body.split(",")
        else:
            continue
        pieces += [[text[at:match.start()]], choices]
        at = match.end()
    pieces.append([text[at:]])
    total = 1
    for choices in pieces:
        total *= len(choices)
    if total > MAX_PATTERN_NAMES:
        raise ValueError(f"the brace pattern names {total} files, over the {MAX_PATTERN_NAMES} allowed")
    return ("".join(parts) for parts in itertools.product(*pieces))


@dataclass(frozen=True)
class _Range:
    """A range of numbers as zero-padded text, without making its list."""

    start: int
    stop: int
    step: int
    width: int

    def __len__(self) -> int:
        return len(range(self.start, self.stop, self.step))

    def __iter__(self) -> Iterator[str]:
        return (str(n).zfill(self.width) for n in range(self.start, self.stop, self.step))


@dataclass
class _Sample:
    """The members of one sample read so far."""

    key: str
    image: bytes | tuple[int, int] | None = None  # its bytes, or where they lie in a shard read in place
    rank: int = len(IMAGE_EXTENSIONS) + 1  # of the image held: its place in IMAGE_EXTENSIONS
    meta: dict[str, str] = field(default_factory=dict)
    extensions: set[str] = field(default_factory=set)
    error: str | None = None

    def source(self, shown: str, rel: PurePath, beside: str, shard: _InPlace | None):
        name, where = f"{shown}/{self.key}", f"{beside}/{self.key}"
        error = self.error or (None if self.image is not None else
                               f"no image member ({', '.join(IMAGE_EXTENSIONS)}); it has "
                               f"{', '.join(sorted(self.extensions)) or 'none'}")
        if error is None and isinstance(self.image, tuple):
            path = Stored(name, shard.file, *self.image, shard.identity, where)
        else:
            path = Held(name, None if error else self.image, where, error)
        return Source(path, rel / self.key, error, self.meta or None)


@dataclass(frozen=True)
class _InPlace:
    """A plain shard in a local file, whose image members the decoders read where they lie."""

    file: str  # absolute
    identity: tuple[int, int, int]


def read_shard(fileobj: BinaryIO, shown: str, rel: PurePath, beside: str, limit: int,
               on_passed_over: Callable[[str], None], on_own_output: Callable[[], None] | None = None,
               path: str | os.PathLike | None = None) -> Iterator:
    """The samples of one shard, read from `fileobj` as a stream, as `inputs.Source`s: for a plain
    shard in the local file `path` (`fileobj` open on it), each image member as a `reads.Stored`
    place in it, read by the decoder; for any other, as `reads.Held` bytes.

    Args:
        shown: the shard as reports name it (its inputs are `shown/KEY`).
        rel: its outputs' folder under -o DIR (the shard's name without suffix, below the folder walked).
        beside: that folder without -o (beside the shard).
        limit: the most bytes of an image member held (`decode.max_file_bytes`).
        on_passed_over: called with `shown: member name` for each member passed over as unsafe.
        on_own_output: called, instead of any sample, for a shard vitembed wrote (`--format wds`).
        path: the local file `fileobj` reads, if it is one.
    """
    from .decode import is_image_path

    seen = DigestSet()  # the shard's keys, 8 bytes each; a false match (odds n/2^64) fails one sample as a repeat
    sample: _Sample | None = None
    done = 0
    shard = None
    try:
        tar = TarStream(fileobj)
        if path is not None and tar.in_place:
            st = os.fstat(fileobj.fileno())
            shard = _InPlace(os.path.abspath(path), (st.st_ino, st.st_size, st.st_mtime_ns))
        for member in tar:
            parts = _member_parts(member, shown, on_passed_over)
            if parts is None:
                continue
            key, ext = parts
            if sample is None or key != sample.key:
                if sample is not None:
                    if done == 0 and on_own_output is not None and _own_output(sample):
                        on_own_output()
                        return
                    yield sample.source(shown, rel, beside, shard)
                    done += 1
                sample = _Sample(key, error=None if seen.add(key) else "the key of an earlier sample of this shard")
            _add(sample, tar, member, ext, limit, is_image_path, shard is not None)
        if sample is not None:
            if done == 0 and on_own_output is not None and _own_output(sample):
                on_own_output()
                return
            yield sample.source(shown, rel, beside, shard)
    except (TarFormatError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        after = f"after {done} sample{'s' if done != 1 else ''}" + (f", from {sample.key} on" if sample else "")
        yield Source(Held(shown, None, beside), rel, f"the shard breaks off {after}: {one_line(exc)}")


def count_samples(fileobj: BinaryIO) -> int:
    """About how many samples a shard holds (for a progress bar): its keys, counted from the
    headers alone (an uncompressed shard's data is seeked over; a compressed one is read through)."""
    count, last = 0, None
    try:
        for member in TarStream(fileobj):
            parts = _member_parts(member, "", lambda text: None)
            if parts is not None and parts[0] != last:
                count, last = count + 1, parts[0]
    except (TarFormatError, OSError, EOFError, zlib.error, lzma.LZMAError):
        pass
    return count


def _own_output(sample: _Sample) -> bool:
    return sample.image is None and "npy" in sample.extensions


def _member_parts(member: Member, shown: str, on_passed_over: Callable[[str], None]) -> tuple[str, str] | None:
    """(key, extension) of a member to read; None for one passed over (told to `on_passed_over` when
    it is unsafe: a link, a device, an absolute or `..` path)."""
    if member.kind == DIR:
        return None
    name = member.name
    parts = name.split("/")
    if member.kind != FILE or name.startswith(("/", "\\")) or ".." in parts:
        on_passed_over(f"{shown}: {name}")
        return None
    parts = [p for p in parts if p and p != "."]
    if not parts:
        return None
    base, dot, ext = parts[-1].partition(".")
    if not base or not dot or not ext:  # WebDataset gives such names no key
        return None
    return "/".join([*parts[:-1], base]), ext.lower()


def _add(sample: _Sample, tar: TarStream, member: Member, ext: str, limit: int, is_image_path,
         in_place: bool) -> None:
    """Read one member into its sample, if it is one the sample keeps and within its bound (the
    data of any other is passed over by the reader); an image member of a shard read in place is
    kept as its place, not its bytes."""
    if ext in sample.extensions:
        sample.error = f"two {sample.key}.{ext} members"
    sample.extensions.add(ext)
    if ext in IMAGE_EXTENSIONS:
        rank = IMAGE_EXTENSIONS.index(ext)
    elif "." not in ext and is_image_path(f"x.{ext}"):
        rank = len(IMAGE_EXTENSIONS)
    else:
        rank = None
    keep = ext in META_EXTENSIONS or (rank is not None and rank < sample.rank)
    bound = META_BYTES if ext in META_EXTENSIONS else limit
    if keep and member.size > bound:
        sample.error = sample.error or (f"{sample.key}.{ext} declares {member.size} bytes, over the {bound} allowed"
                                        + (" (--max-pixels, 4 bytes a pixel)" if bound == limit else ""))
        keep = False
    if not keep or sample.error:
        return
    if ext in META_EXTENSIONS:
        sample.meta[ext] = tar.read(member).decode("utf-8", "backslashreplace")
    else:
        sample.image, sample.rank = (tar.offset(member), member.size) if in_place else tar.read(member), rank
