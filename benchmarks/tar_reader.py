"""A/B of the tar reader: `vitembed.images.tarstream.TarStream` against the standard library's
`tarfile`, reading what a shard's samples need (every header, the image and json data).

It writes one shard of --samples samples (a JPEG-sized member of --bytes and a small .json each,
as img2dataset writes them; --format picks ustar or pax headers, pax being what webdataset's
TarWriter writes) under --work, then reads it --repeats times with each reader, alternating,
and prints the median microseconds per sample and the ratio. Both read from the same open file
(the page cache warm), as `vitembed encode` does in the process that plans the run.

    python benchmarks/tar_reader.py --work /tmp/tr
    python benchmarks/tar_reader.py --work /tmp/tr --format pax --bytes 60000
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vitembed.images.tarstream import FILE, TarStream  # noqa: E402


def build(path: Path, samples: int, size: int, fmt: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(samples):
            for name, data in ((f"{i:07d}.jpg", payload[:size]), (f"{i:07d}.json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000.5  # a float mtime: pax writes a record for it
                tar.addfile(info, io.BytesIO(data))


def with_tarfile(path: Path) -> int:
    total = 0
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()
            if info.isreg():
                total += len(tar.extractfile(info).read())
    return total


def with_tarstream(path: Path) -> int:
    total = 0
    with path.open("rb") as f:
        tar = TarStream(f)
        for member in tar:
            if member.kind == FILE:
                total += len(tar.read(member))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=3_000, help="size of each image member")
    parser.add_argument("--format", choices=["ustar", "pax"], default="ustar")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shard = args.work / f"shard-{args.samples}-{args.bytes}-{args.format}.tar"
    if not shard.exists():
        build(shard, args.samples, args.bytes, tarfile.USTAR_FORMAT if args.format == "ustar" else tarfile.PAX_FORMAT)
    times: dict[str, list[float]] = {"tarfile": [], "TarStream": []}
    for _ in range(args.repeats):
        for name, reader in (("tarfile", with_tarfile), ("TarStream", with_tarstream)):
            start = time.perf_counter()
            read = reader(shard)
            times[name].append(time.perf_counter() - start)
            assert read == args.samples * args.bytes + sum(len(json.dumps({"i": i})) for i in range(args.samples))
    medians = {name: statistics.median(t) / args.samples * 1e6 for name, t in times.items()}
    print(f"{args.samples} samples ({args.bytes} B image + json, {args.format} headers), median of {args.repeats}")
    for name, us in medians.items():
        print(f"{name:10} {us:7.1f} us/sample")
    print(f"TarStream is {medians['tarfile'] / medians['TarStream']:.1f}x faster")


if __name__ == "__main__":
    main()
