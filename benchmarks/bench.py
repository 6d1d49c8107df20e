"""vitembed against the hand-written baseline (`baseline.py`), as whole processes, in turns.

Builds its corpora deterministically from sample_images/ (random crops and rescales saved as
400-640 px JPEGs; 12-megapixel JPEGs by upscaling), then runs the baseline (A) and vitembed (B)
as subprocesses in turns A B A B ..., and prints images/s, medians, ratios and peak memory.

    python benchmarks/bench.py                 # the full benchmark (about 10 minutes on 2 cores)
    python benchmarks/bench.py --quick         # a smoke run, well under a minute
    python benchmarks/bench.py --work /tmp/vb  # keep the corpora there between runs

vitembed runs with its own layer cache under the work folder (VITEMBED_CACHE_DIR), warmed by one
untimed run per layer shape: a random layer is drawn with torch once per machine, then read from
the cache. The "first run" case measures a cold cache: each of its turns starts with an empty one.

Peak memory is the largest sum of RSS over the process tree (vitembed's decoder processes
included), sampled every 20 ms; images/s is images / median wall time of the whole process
(start-up, imports and writes included).
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"
BASELINE = Path(__file__).resolve().parent / "baseline.py"

# layer name -> (baseline args, vitembed args)
LAYERS = {
    "vit-b16": (["--emb-dim", "768", "--num-patch-row", "14"], ["--preset", "vit-b16"]),
    "default layer": (["--emb-dim", "384", "--num-patch-row", "16"], []),  # vitbook-s14
}


# --- corpora -------------------------------------------------------------------------------


def _sources() -> list[Image.Image]:
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    return [Image.open(p).convert("RGB") for p in paths]


def _build(folder: Path, count: int, seed: int, min_crop: float, save) -> Path:
    """`count` random crops of the samples, each passed to `save(crop, rng, i, folder)`; kept
    (and reused) under `folder` with a marker file."""
    marker = folder / f".done-{count}-{seed}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sources = _sources()
    for i in range(count):
        im = sources[int(rng.integers(len(sources)))]
        w, h = im.size
        cw, ch = int(w * rng.uniform(min_crop, 1.0)), int(h * rng.uniform(min_crop, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        save(im.crop((x0, y0, x0 + cw, y0 + ch)), rng, i, folder)
    marker.touch()
    return folder


def build_small(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of 400-640 px per side: random crops of the samples, rescaled."""

    def save(crop: Image.Image, rng: np.random.Generator, i: int, folder: Path) -> None:
        size = (int(rng.integers(400, 641)), int(rng.integers(400, 641)))
        crop.resize(size, Image.Resampling.BICUBIC).save(folder / f"img{i:05d}.jpg", quality=int(rng.integers(80, 96)))

    return _build(folder, count, seed, 0.5, save)


def build_large(folder: Path, count: int, seed: int = 1) -> Path:
    """`count` 12-megapixel JPEGs (4000 x 3000 or 3000 x 4000), upscaled crops of the samples."""

    def save(crop: Image.Image, rng: np.random.Generator, i: int, folder: Path) -> None:
        size = (4000, 3000) if rng.random() < 0.7 else (3000, 4000)
        big = crop.resize(size, Image.Resampling.BICUBIC)
        # Some grain, so that the file is photo-like rather than smooth and tiny.
        noise = rng.integers(-6, 7, (size[1], size[0], 1), dtype=np.int16)
        big = Image.fromarray(np.clip(np.asarray(big, np.int16) + noise, 0, 255).astype(np.uint8))
        big.save(folder / f"big{i:03d}.jpg", quality=90)

    return _build(folder, count, seed, 0.6, save)


def subset(src: Path, dst: Path, count: int) -> Path:
    """A folder of symbolic links to the first `count` images of `src`."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for p in sorted(src.glob("*.jpg"))[:count]:
        (dst / p.name).symlink_to(p)
    return dst


# --- running -------------------------------------------------------------------------------


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm", "rb") as f:
                pages = int(f.read().split()[1])
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


@dataclass
class Run:
    seconds: float
    peak_rss: int


def run_once(cmd: list[str], out: Path, env: dict) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr.decode(errors='replace')}")
    shutil.rmtree(out, ignore_errors=True)
    return Run(seconds, peak)


@dataclass
class Case:
    name: str
    images: Path
    count: int
    layer: str
    vitembed_extra: list[str]
    cold_cache: bool = False  # every vitembed turn starts with an empty layer cache


def measure(case: Case, repeats: int, work: Path, env: dict) -> dict:
    base_args, vit_args = LAYERS[case.layer]
    out = work / "out"
    commands = {
        "baseline": [sys.executable, str(BASELINE), str(case.images), str(out), *base_args],
        "vitembed": [sys.executable, "-m", "vitembed", "encode", str(case.images), "-o", str(out), "-q",
                     *vit_args, *case.vitembed_extra],
    }
    runs: dict[str, list[Run]] = {k: [] for k in commands}
    for turn in range(repeats):
        for name, cmd in commands.items():  # A B A B ...
            run_env = env
            if case.cold_cache and name == "vitembed":
                run_env = {**env, "VITEMBED_CACHE_DIR": str(work / "cold-cache" / f"{turn}")}
                shutil.rmtree(run_env["VITEMBED_CACHE_DIR"], ignore_errors=True)
            runs[name].append(run_once(cmd, out, run_env))
    row = {"case": case.name, "images": case.count}
    for name, rs in runs.items():
        median = statistics.median(r.seconds for r in rs)
        row[name] = {"median_s": median, "rate": case.count / median, "peak_rss": max(r.peak_rss for r in rs),
                     "times": [r.seconds for r in rs]}
    row["ratio"] = row["baseline"]["median_s"] / row["vitembed"]["median_s"]
    return row


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    from vitembed.layer.blas import blas_core

    # numpy's OpenBLAS chose its kernels when numpy loaded, from OPENBLAS_CORETYPE or the CPU.
    return (f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Pillow {Image.__version__}, numpy {np.__version__} (OpenBLAS kernels: {blas_core() or 'unknown'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpora, one turn each")
    parser.add_argument("--work", type=Path, help="folder for the corpora (kept); default: a temporary one")
    parser.add_argument("--repeats", type=int, help="turns per tool (default 3, quick 1)")
    parser.add_argument("--only", help="comma-separated case names to run")
    args = parser.parse_args()

    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    n_small, n_large, n_memory = (48, 4, 16) if quick else (1024, 64, 256)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="vitembed-bench-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "VITEMBED_CACHE_DIR": str(work / "layer-cache")}

    # pip compiles a package's bytecode as it installs it; a checkout run with PYTHONDONTWRITEBYTECODE
    # set (as this project's machines do) would compile vitembed anew in every process instead.
    compileall.compile_dir(ROOT / "vitembed", quiet=1)

    t0 = time.perf_counter()
    small = build_small(work / f"small{n_small}", n_small)
    large = build_large(work / f"large{n_large}", n_large)
    few = subset(small, work / f"small{n_memory}", n_memory)
    print(f"corpora ready in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)

    cases = [
        Case("small/vit-b16", small, n_small, "vit-b16", []),
        Case("small/default layer", small, n_small, "default layer", []),
        Case("small-subset/default layer", few, n_memory, "default layer", []),
        Case("12MP/vit-b16", large, n_large, "vit-b16", []),
        Case("12MP/vit-b16 --fast-decode", large, n_large, "vit-b16", ["--fast-decode"]),
        Case("small/default layer, first run (cold layer cache)", small, n_small, "default layer", [], cold_cache=True),
    ]
    if quick:
        cases = [cases[1], cases[4]]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.name in wanted]

    for layer in {case.layer for case in cases}:  # draw each random layer once, untimed
        warm = [sys.executable, "-m", "vitembed", "encode", str(sorted(few.glob("*.jpg"))[0]), "-o", str(work / "warm.npy"),
                "-q", "--overwrite", *LAYERS[layer][1]]  # the last layer's warm file is another shape
        subprocess.run(warm, env=env, capture_output=True, check=True)

    print(f"machine: {machine()}")
    print(f"{repeats} turn(s) each, A B A B; images/s from the median wall time of the whole process\n")
    header = "| case | images | baseline img/s | vitembed img/s | ratio | baseline peak RSS | vitembed peak RSS |"
    print(header)
    print("|" + "---|" * 7)
    for case in cases:
        row = measure(case, repeats, work, env)
        b, v = row["baseline"], row["vitembed"]
        print(f"| {case.name} | {case.count} | {b['rate']:.1f} | {v['rate']:.1f} | {row['ratio']:.2f}x | "
              f"{b['peak_rss'] / 2**20:.0f} MiB | {v['peak_rss'] / 2**20:.0f} MiB |", flush=True)
        print(f"  times baseline {['%.2f' % t for t in b['times']]} vitembed {['%.2f' % t for t in v['times']]}",
              file=sys.stderr)
    print()
    for args in (["--help"], ["info"]):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vitembed", *args], env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"vitembed {' '.join(args)}: {statistics.median(times):.2f} s (median of 3, whole process)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
