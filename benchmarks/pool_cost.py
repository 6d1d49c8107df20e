"""What the decoder pool costs the main process per image: chunked tasks against one image per task.

    python benchmarks/pool_cost.py [--work /tmp/vb] [--images 1024] [--turns 3]

On a GPU machine the main process is the serial part of a run: it receives every image from the
decoder processes, runs the layer and hands the outputs to the writers, so its CPU time per image
bounds the run's rate (2,500 images/s leaves it 400 us per image, all of it). This measures the
first of those costs: an `OrderedPool` of `WorkerTask`s over small JPEGs (`bench.build_small`), as `--decode gpu` uses
it (the decoders read plain JPEGs' bytes) and as `--decode cpu` does (they decode to 224 x 224
pixels), with chunks sized as vitembed sizes them (B) and with one image per task (A, the pool
before chunks), in turns. It prints the main process's CPU time (all its threads, user + system)
per image and the wall time, medians over the turns.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import build_small, machine  # noqa: E402
from vitembed.images.decode import Preprocess  # noqa: E402
from vitembed.images.inputs import Source  # noqa: E402
from vitembed.pipeline.outcomes import Job  # noqa: E402
from vitembed.pipeline.skeleton import window_size  # noqa: E402
from vitembed.executors.pool import OrderedPool  # noqa: E402
from vitembed.executors.processes import decoder_context, start_decoder_server  # noqa: E402
from vitembed.executors.decoder import WorkerTask, init_worker  # noqa: E402


def run(paths: list[Path], device_jpegs: bool, chunks: bool, workers: int) -> tuple[float, float]:
    """(main-process CPU seconds per image, wall seconds) of decoding `paths` once."""
    prep = Preprocess()
    jobs = [Job(Source(p, Path(p.name)), None, i) for i, p in enumerate(paths)]
    task = WorkerTask(prep, device_jpegs=device_jpegs, gate=decoder_context().Lock())
    window = window_size(SimpleNamespace(prep=prep), task, 32, workers)  # no kernel: only the preprocessing counts
    start_decoder_server()
    decoder = OrderedPool(task, workers, window=window, timeout=120.0, initializer=init_worker,
                          initargs=(prep.max_pixels, False), context=decoder_context())
    if not chunks:
        decoder.max_chunk = 1
    decoder.start(jobs[: 4 * workers])  # start the pool outside the measurement
    for _ in decoder:
        pass
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    decoder.start(jobs)
    count = sum(1 for _ in decoder)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    decoder.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / count, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vb"), help="where the corpus is kept")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="decoder processes (default: one per core)")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    folder = build_small(args.work / f"small{args.images}", args.images)
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    print(machine(), f"; {workers} decoder processes", file=sys.stderr)
    for device_jpegs, what in ((True, "read for the device (--decode gpu)"), (False, "decoded to pixels (--decode cpu)")):
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.turns):
            for chunks in (False, True):
                results[chunks].append(run(paths, device_jpegs, chunks, workers))
        line = []
        for chunks, name in ((False, "A one per task"), (True, "B chunks")):
            cpu = statistics.median(r[0] for r in results[chunks]) * 1e6
            wall = statistics.median(r[1] for r in results[chunks])
            line.append(f"{name}: {cpu:.0f} us/img, {wall:.2f} s")
        a = statistics.median(r[0] for r in results[False])
        b = statistics.median(r[0] for r in results[True])
        print(f"{len(paths)} JPEGs {what}: " + "; ".join(line) + f"; B/A CPU = {b / a:.2f}")


if __name__ == "__main__":
    main()
