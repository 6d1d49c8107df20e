"""`vitembed encode --ray` against the local run, on the same machine, in turns.

The same corpus as bench.py's small case (`build_small`: 400-640 px JPEGs cut from
sample_images/), encoded by `vitembed encode DIR -o OUT --json` (local: decoder processes) and by
the same command with `--ray` (a local Ray cluster that the run starts and stops), in turns
A B A B; and with `--ray` joining a cluster that is already running (`RAY_ADDRESS`: a local one,
2 CPUs, which the benchmark starts once, untimed), as on a real cluster. Each run is a whole
process; the time of every `--json` line is taken as it arrives, so:

- steady-state throughput: images / s between the 10th and the 90th percentile of the lines
  (Ray reports a batch of lines at a time; 4096 images are 128 batches);
- start-up: the whole process's wall time less what its images take at that throughput
  (imports, layer, for Ray: starting the cluster and its actors, and stopping them).

    python benchmarks/ray_bench.py --work /tmp/vb        # 4096 images, 3 turns (about 4 minutes on 2 cores)
    python benchmarks/ray_bench.py --work /dev/shm/vb    # the same on tmpfs: the disk left out
    python benchmarks/ray_bench.py --quick               # 512 images, 1 turn

The goal: Ray's steady-state throughput at least 0.9x the local run's on the same cores (median of 3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, build_small, machine  # noqa: E402


@dataclass
class Timing:
    wall: float  # seconds, whole process
    rate: float  # images/s, steady state
    lines: int

    @property
    def startup(self) -> float:
        return self.wall - self.lines / self.rate


def timed_run(cmd: list[str], out: Path, env: dict) -> Timing:
    """Run `cmd`, timing each line of its stdout."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stamps: list[float] = []
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    drain.start()
    for _ in proc.stdout:
        stamps.append(time.perf_counter() - start)
    proc.wait()
    wall = time.perf_counter() - start
    drain.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{b''.join(stderr).decode(errors='replace')}")
    shutil.rmtree(out, ignore_errors=True)
    lo, hi = int(0.1 * len(stamps)), int(0.9 * len(stamps))
    return Timing(wall, (hi - lo) / (stamps[hi] - stamps[lo]), len(stamps))


def start_cluster(env: dict) -> dict:
    """A local Ray cluster of 2 CPUs for the joined runs (its workers import this checkout); the
    environment of a driver that joins it (its address, and what Ray set for it: RAY_AUTH_MODE)."""
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # what the cluster's processes start with
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
    ray_settings = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    return {**env, **ray_settings, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 images, one turn")
    parser.add_argument("--work", type=Path, help="folder for the corpus (kept); default: a temporary one")
    parser.add_argument("--repeats", type=int, help="turns (default 3, quick 1)")
    parser.add_argument("--images", type=int, help="corpus size (default 4096, quick 512)")
    args, extra = parser.parse_known_args()
    count = args.images or (512 if args.quick else 4096)
    repeats = args.repeats or (1 if args.quick else 3)
    tmp = tempfile.TemporaryDirectory(prefix="vitembed-ray-bench-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "VITEMBED_CACHE_DIR": str(work / "layer-cache")}
    images = build_small(work / f"small{count}", count)
    out = work / "out"
    encode = [sys.executable, "-m", "vitembed", "encode", str(images), "-o", str(out), "--json", "-q", *extra]
    subprocess.run([*encode[:4], str(sorted(images.glob("*.jpg"))[0]), "-o", str(work / "warm.npy"), "-q", *extra],
                   env=env, check=True, capture_output=True)  # the random layer, drawn once, untimed
    joined = start_cluster(env)
    commands = {"local": (encode, env), "ray": ([*encode, "--ray"], env), "ray, joined": ([*encode, "--ray"], joined)}
    runs: dict[str, list[Timing]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (cmd, cmd_env) in commands.items():  # A B C A B C ...
            runs[name].append(timed_run(cmd, out, cmd_env))
            t = runs[name][-1]
            print(f"  {name}: {t.wall:.2f} s, {t.rate:.1f} images/s steady, start-up {t.startup:.2f} s", file=sys.stderr)
    print(f"machine: {machine()}")
    print(f"{count} images, {repeats} turn(s) each, A B A B, medians; extra options: {' '.join(extra) or '-'}\n")
    print("| run | wall s | steady img/s | start-up s | img/s overall |")
    print("|---|---|---|---|---|")
    med = {name: {k: statistics.median(getattr(t, k) for t in rs) for k in ("wall", "rate", "startup")}
           for name, rs in runs.items()}
    for name, m in med.items():
        print(f"| {name} | {m['wall']:.2f} | {m['rate']:.1f} | {m['startup']:.2f} | {count / m['wall']:.1f} |")
    for name in ("ray", "ray, joined"):
        ratio = med[name]["rate"] / med["local"]["rate"]
        print(f"\n{name}: steady-state throughput / local: {ratio:.2f}x (goal 0.9x); start-up costs "
              f"{med[name]['startup'] - med['local']['startup']:.1f} s more than the local run's")
    import ray

    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
