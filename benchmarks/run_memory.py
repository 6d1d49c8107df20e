"""A run's peak memory in the driver (the process that plans, records and reports) as inputs grow.

After an unmeasured run (the random layer drawn once, with torch, and cached), a corpus of N tiny PNGs (hard links of one 8 x 8 image: cheap to make by the hundred thousand,
and each a regular file, as a real input), encoded by `vitembed encode DIR -o OUT` with a small
random layer, in a process that prints its own peak resident set size (ru_maxrss, RUSAGE_SELF:
Ray's and the decoders' processes are not counted) when the run ends.

    python benchmarks/run_memory.py --work /tmp/vm                       # local, 10,000 and 100,000 inputs
    python benchmarks/run_memory.py --work /tmp/vm -- --ray --ray-actors 2
    python benchmarks/run_memory.py --work /tmp/vm --counts 1000 10000 -- --workers 0
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = ["--image-size", "16", "--patch-size", "8", "--emb-dim", "8", "-q"]

# Runs the CLI in this process; the peak RSS (MiB) is stderr's last line (an exit handler: the
# CLI exits without the interpreter's teardown, but runs those).
_DRIVER = """
import atexit, resource, sys
atexit.register(lambda: print(f"peak-rss-mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}",
                              file=sys.stderr, flush=True))
sys.argv[0] = "vitembed"
from vitembed.cli.main import main
main()
"""


def corpus(work: Path, count: int) -> Path:
    """`count` hard links of a tiny PNG (a copy of it per 10,000: a file takes 65,000 links at
    most), 1,000 to a folder."""
    folder = work / f"tiny{count}"
    if folder.is_dir():
        return folder
    import numpy as np
    from PIL import Image

    partial = work / f"tiny{count}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    seed = partial / "seed.png"
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(seed)
    for i in range(count):
        sub = partial / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        if i % 10_000 == 0:
            shutil.copyfile(seed, sub / f"i{i:06d}.png")
            first = sub / f"i{i:06d}.png"
        else:
            os.link(first, sub / f"i{i:06d}.png")
    seed.unlink()
    partial.rename(folder)
    return folder


def peak(work: Path, count: int, extra: list[str]) -> float:
    """The driver's peak RSS in MiB, encoding `count` inputs."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-c", _DRIVER, "encode", str(corpus(work, count)), "-o", str(out),
                           *LAYER, *extra], env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode != 0 or not last.startswith("peak-rss-mib"):
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(last.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the corpora (kept) and the outputs")
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.work.mkdir(parents=True, exist_ok=True)
    peak(args.work, 10, extra)  # untimed: the random layer is drawn (with torch) and cached once
    peaks = {}
    for count in args.counts:
        peaks[count] = peak(args.work, count, extra)
        print(f"{count} inputs: driver peak RSS {peaks[count]:.1f} MiB", flush=True)
    first, last = args.counts[0], args.counts[-1]
    print(f"growth {first} -> {last} inputs: {peaks[last] - peaks[first]:+.1f} MiB; options: {' '.join(extra) or '-'}")


if __name__ == "__main__":
    main()
