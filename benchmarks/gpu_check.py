"""The CUDA paths, checked and timed in one short run on a GPU machine (not part of CI).

    python benchmarks/gpu_check.py --work /tmp/gpu-check [--images 8192]

1. Correctness on 72 JPEGs (64 photos, one in all 8 EXIF orientations, a grey one, a
   progressive one), against the numpy engine on the CPU (float32): the torch engine on CUDA with
   Pillow decoding (`--decode cpu`), then with nvJPEG (`--decode gpu`). It prints the largest and
   mean absolute token differences, and the files whose tokens differ most.
2. Speed: vit-b16 with float16 outputs over `--images` JPEGs of 400-640 px (1024 distinct files,
   linked several times over): `--decode cpu`, `--decode gpu`, and `--decode gpu --shard-size 1024`;
   two runs each. It prints the whole process's wall time and images/s, and the run's own rate
   (from its summary line: the work once torch is imported, start-up excluded).

Results also go to $OUT/gpu_check.json when OUT is set (the device tool's output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_small  # noqa: E402

VITEMBED = [sys.executable, "-m", "vitembed", "encode"]


def run(args: list[str]) -> tuple[float, float | None]:
    """Run `vitembed encode ARGS`; (wall seconds, the summary's images/s)."""
    start = time.perf_counter()
    r = subprocess.run([*VITEMBED, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"vitembed {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rate = re.search(r"([\d.]+) images/s on", r.stderr)
    return wall, float(rate.group(1)) if rate else None


def token_diff(ref: Path, other: Path) -> dict:
    names = sorted(p.name for p in ref.glob("*.npy"))
    diffs = {n: np.abs(np.load(ref / n).astype(np.float64) - np.load(other / n).astype(np.float64)) for n in names}
    worst = sorted(names, key=lambda n: -diffs[n].mean())[:5]
    return {"files": len(diffs), "max_abs": float(max(d.max() for d in diffs.values())),
            "mean_abs": float(np.mean([d.mean() for d in diffs.values()])),
            "worst_mean_abs": {n: float(diffs[n].mean()) for n in worst}}


def odd_jpegs(folder: Path, source: Path) -> None:
    """One photo in each EXIF orientation, a grey JPEG and a progressive one (Pillow's, by design)."""
    from PIL import Image

    im = Image.open(source).convert("RGB")
    for orientation in range(1, 9):
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(folder / f"orientation{orientation}.jpg", exif=exif, quality=90)
    im.convert("L").save(folder / "grey.jpg", quality=90)
    im.save(folder / "progressive.jpg", quality=90, progressive=True)


def linked_corpus(src: Path, dst: Path, count: int) -> Path:
    files = sorted(src.glob("*.jpg"))
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for i in range(count):
        (dst / f"img{i:06d}.jpg").symlink_to(files[i % len(files)])
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=8192)
    args = parser.parse_args()
    import torch
    import torchvision

    report: dict = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpus": os.cpu_count()}
    print(json.dumps(report), flush=True)
    if report["gpu"] is None:
        sys.exit("no CUDA device")
    work = args.work
    small = build_small(work / "small1024", 1024)
    few = linked_corpus(small, work / "check", 64)
    odd_jpegs(few, sorted(small.glob("*.jpg"))[0])
    many = linked_corpus(small, work / f"many{args.images}", args.images)

    ref, out = work / "ref", work / "out"
    for path in (ref, out):
        shutil.rmtree(path, ignore_errors=True)
    run([str(few), "-o", str(ref), "-q", "--preset", "vit-b16", "--engine", "numpy", "--device", "cpu"])
    report["correctness"] = {}
    for decode in ("cpu", "gpu"):
        shutil.rmtree(out, ignore_errors=True)
        run([str(few), "-o", str(out), "-q", "--preset", "vit-b16", "--engine", "torch", "--device", "cuda", "--decode", decode])
        report["correctness"][f"cuda, --decode {decode}"] = token_diff(ref, out)
        print(json.dumps({f"cuda, --decode {decode} vs numpy engine": report["correctness"][f"cuda, --decode {decode}"]}), flush=True)

    report["speed"] = {}
    common = ["--preset", "vit-b16", "--dtype", "float16", "--device", "cuda", "--batch-size", "256"]
    for name, extra in (("--decode cpu", ["--decode", "cpu"]), ("--decode gpu", ["--decode", "gpu"]),
                        ("--decode gpu --shard-size 1024", ["--decode", "gpu", "--shard-size", "1024"])):
        walls, rates = [], []
        for _ in range(2):
            shutil.rmtree(out, ignore_errors=True)
            wall, rate = run([str(many), "-o", str(out), *common, *extra])
            walls.append(wall)
            rates.append(rate)
        row = {"images": args.images, "wall_s": [round(w, 2) for w in walls],
               "images_per_s_whole_process": round(args.images / statistics.median(walls)),
               "images_per_s_summary": rates}
        report["speed"][name] = row
        print(json.dumps({name: row}), flush=True)

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
