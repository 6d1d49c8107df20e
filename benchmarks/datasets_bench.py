"""Datasets in: small JPEGs stored three ways (files, WebDataset tar shards, one Parquet table), each
encoded by `vitembed encode` into .npy files (and, with --formats, other outputs).

Under --work (kept between runs) it builds N small photo-like JPEGs (64 to 95 pixels a side, a
few KB each, as thumbnails are) as files, the same images (with a `.json` member each) as --tars
tar shards and as --tars x 10 shards, and one Parquet table of them (row groups of 1,000 rows).
Each input is encoded --repeats times, round robin (a small random layer, default --workers, after
one unmeasured run that draws and caches the layer), in a process of its own that prints its peak
resident set size (the driver's, RUSAGE_SELF: the process that reads
the shards and tables); the table gives the median time, images per second, the ratio to the
files' time, and the driver's peak RSS. The last lines compare the driver's memory with --tars
and with ten times as many shards of the same images: it should not grow with the shards.

The outputs go to --out (default WORK/out). Every run starts after `os.sync()`, so that the
writeback of an earlier run's 20,000 files does not fall on the next. On a cloud disk, writing
20,000 small `.npy` files takes seconds that vary from run to run by more than the inputs differ;
`--out /dev/shm/dsb-out` (tmpfs) leaves the disk out and compares the inputs alone.

With --cold (Linux, as root), every run starts with the page cache dropped
(`/proc/sys/vm/drop_caches`): the inputs are read from the disk, as a folder of a million photos,
larger than memory, is. Without it the corpus is read from memory after the first run, where an
open costs microseconds and the tars' and the table's fewer opens matter least.

    python benchmarks/datasets_bench.py --work /tmp/dsb                      # 20,000 images, 20 tars
    python benchmarks/datasets_bench.py --work /tmp/dsb --images 2000 --repeats 3
    python benchmarks/datasets_bench.py --work /tmp/dsb --formats npy,parquet   # -o DIR --format parquet too
    python benchmarks/datasets_bench.py --work /tmp/dsb --formats npy,parquet --out /dev/shm/dsb-out
    sudo python benchmarks/datasets_bench.py --work /tmp/dsb --out /dev/shm/dsb-out --cold
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_memory import _DRIVER  # noqa: E402  (a driver that prints its peak RSS)

ROOT = Path(__file__).resolve().parent.parent
LAYER = ["--image-size", "64", "--patch-size", "16", "--emb-dim", "64", "-q"]


def jpegs(count: int) -> list[bytes]:
    """`count` distinct small JPEGs: a smooth tile, shifted and cropped per image, with a little
    noise of its own (so that no two are alike: a Parquet table would store repeats once)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tile = np.clip(np.cumsum(rng.integers(-8, 9, (96, 96, 3)), axis=1) + 128, 0, 250).astype(np.uint8)
    out = []
    for i in range(count):
        crop = np.roll(tile, i, axis=0)[: 64 + i % 32, : 64 + (i * 7) % 32]
        buffer = io.BytesIO()
        Image.fromarray(crop + rng.integers(0, 6, crop.shape, dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    assert len(set(out)) == count
    return out


def build(work: Path, count: int, tars: int) -> dict[str, Path]:
    """The corpus three ways (and the shards again, ten times as many), made once per size."""
    base = work / f"corpus{count}-{tars}-v2"  # v2: distinct images
    paths = {"files": base / "files", f"{tars} tars": base / f"tars{tars}", f"{10 * tars} tars": base / f"tars{10 * tars}",
             "parquet": base / "table.parquet"}
    if (base / "done").exists():
        return paths
    shutil.rmtree(base, ignore_errors=True)
    data = jpegs(count)
    paths["files"].mkdir(parents=True)
    for i, jpeg in enumerate(data):
        sub = paths["files"] / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:07d}.jpg").write_bytes(jpeg)
    for shards in (tars, 10 * tars):
        folder = paths[f"{shards} tars"]
        folder.mkdir()
        per = -(-count // shards)
        for n in range(shards):
            with tarfile.open(folder / f"{n:05d}.tar", "w") as tar:
                for i in range(n * per, min(count, (n + 1) * per)):
                    for name, member in ((f"{i:07d}.jpg", data[i]), (f"{i:07d}.json", json.dumps({"i": i}).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(member)
                        tar.addfile(info, io.BytesIO(member))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": [f"{i:07d}" for i in range(count)], "image": data}), paths["parquet"],
                   row_group_size=1000)
    (base / "done").touch()
    return paths


def drop_caches() -> bool:
    """Drop the page cache's clean pages (the caller syncs first, so that all are clean); False
    where not allowed."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
    except OSError:
        return False
    return True


def encode(source: Path, out: Path, fmt: str, extra: list[str], cold: bool = False) -> tuple[float, float] | str:
    """(seconds, the driver's peak RSS in MiB) of one run; or why it failed."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    formats = [] if fmt == "npy" else ["--format", fmt]
    os.sync()  # the earlier run's writes on disk before this one starts
    if cold:
        drop_caches()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _DRIVER, "encode", str(source), "-o", str(out), *LAYER, *formats,
                           *extra], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode != 0 or not last.startswith("peak-rss-mib"):
        return f"failed ({done.returncode}): {done.stderr.strip().splitlines()[0] if done.stderr.strip() else ''}"
    return seconds, float(last.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the corpus (kept) and the outputs")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--tars", type=int, default=20, help="shards (the memory check uses ten times as many too)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="npy", help="comma-separated outputs: npy, parquet (--format parquet)")
    parser.add_argument("--out", type=Path, help="output folder (replaced by each run; default WORK/out)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (Linux, root)")
    parser.add_argument("extra", nargs="*", help="more options for vitembed encode (after --)")
    args = parser.parse_args()
    paths = build(args.work, args.images, args.tars)
    kinds = ["files", f"{args.tars} tars", "parquet", f"{10 * args.tars} tars"]
    out = args.out or args.work / "out"
    if args.cold and not drop_caches():
        raise SystemExit("--cold: cannot write /proc/sys/vm/drop_caches (Linux only, as root)")
    encode(paths["files"], out, "npy", args.extra, args.cold)  # unmeasured: the random layer drawn (torch) and cached
    runs: dict[tuple[str, str], list] = {(kind, fmt): [] for fmt in args.formats.split(",") for kind in kinds}
    for _ in range(args.repeats):  # round robin, so that a busy moment of the machine falls on every kind
        for kind, fmt in runs:
            runs[kind, fmt].append(encode(paths[kind], out, fmt, args.extra, args.cold))
    results: dict[tuple[str, str], tuple[float, float] | str] = {}
    for key, done in runs.items():
        failed = next((r for r in done if isinstance(r, str)), None)
        results[key] = failed or (statistics.median(r[0] for r in done), max(r[1] for r in done))
    print(f"{args.images} JPEGs, median of {args.repeats}, layer {' '.join(LAYER[:-1])} {' '.join(args.extra)}, "
          f"outputs in {out}{', page cache dropped before each run' if args.cold else ''}")
    print(f"{'input':12} {'output':8} {'seconds':>8} {'images/s':>9} {'vs files':>9} {'driver MiB':>11}")
    for (kind, fmt), result in results.items():
        if isinstance(result, str):
            print(f"{kind:12} {fmt:8} {result}")
            continue
        files = results.get(("files", fmt))
        ratio = f"{files[0] / result[0]:.2f}x" if isinstance(files, tuple) else "-"
        print(f"{kind:12} {fmt:8} {result[0]:8.2f} {args.images / result[0]:9.0f} {ratio:>9} {result[1]:11.1f}")
    few, many = results.get((f"{args.tars} tars", "npy")), results.get((f"{10 * args.tars} tars", "npy"))
    if isinstance(few, tuple) and isinstance(many, tuple):
        print(f"driver peak RSS: {few[1]:.1f} MiB with {args.tars} shards, {many[1]:.1f} MiB with {10 * args.tars} "
              f"({many[1] / few[1]:.2f}x)")


if __name__ == "__main__":
    main()
