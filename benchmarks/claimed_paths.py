"""Memory of the output-path collision table (`files.digests.DigestSet`) with N claimed paths, against a
`set` of the same 8-byte digests (as Python ints) and a `set` of the path strings.

    python benchmarks/claimed_paths.py                 # 1,000,000 paths
    python benchmarks/claimed_paths.py --count 100000

Each is measured with tracemalloc (numpy's buffers included): what it holds once filled, and the
peak while it was filled (`DigestSet` holds its old and new table while it grows); then the
seconds a second fill takes without tracemalloc.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitembed.files.digests import DigestSet, digest  # noqa: E402


def _paths(count: int):
    return (f"/data/photos/{i // 1000:04d}/IMG_{i:08d}.jpg.npy" for i in range(count))


def measure(name: str, make, count: int) -> None:
    """Memory under tracemalloc; the time in a second fill without it (tracemalloc slows numpy)."""
    gc.collect()
    tracemalloc.start()
    table = make(count)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del table
    gc.collect()
    start = time.perf_counter()
    make(count)
    seconds = time.perf_counter() - start
    print(f"{name:<28} {count:>9} paths: held {held / 2**20:7.1f} MiB ({held / count:5.1f} B/path), "
          f"peak {peak / 2**20:7.1f} MiB, {seconds:5.1f} s to fill")


def claimed(count: int) -> DigestSet:
    table = DigestSet()
    for path in _paths(count):
        table.add(path)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    count = parser.parse_args().count
    measure("DigestSet (digests)", claimed, count)
    measure("set of int digests", lambda n: {int(digest(p)) for p in _paths(n)}, count)
    measure("set of path strings", lambda n: set(_paths(n)), count)


if __name__ == "__main__":
    main()
