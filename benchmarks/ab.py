"""Two revisions of vitembed on the same command, in turns (A B A B ...), as whole processes.

    python benchmarks/ab.py 5c5d552 HEAD [--turns 4] -- /tmp/vb/large64 --preset vit-b16 --fast-decode
    python benchmarks/ab.py HEAD HEAD --a-args "--preset vit-b16" --b-args "--preset clip-b16" -- /tmp/vb/small1024

Each revision is checked out into a temporary git worktree with its bytecode compiled, and runs as
`python -m vitembed encode ARGS -o OUT -q` from a neutral folder with PYTHONPATH naming that
worktree (from the repository root, `-m` would find the checkout there first). OUT is removed
before every run. It prints the median wall time of each and their ratio. For changes smaller
than the benchmark's run-to-run noise (`bench.py`), where a same-run comparison is all there is.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="revision A (a commit, a branch, HEAD~1, ...)")
    parser.add_argument("b", help="revision B; WORKTREE for the uncommitted working tree")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--a-args", default="", help="arguments for A alone (one string), after the common ones")
    parser.add_argument("--b-args", default="", help="arguments for B alone: one revision, two option sets")
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("give the `vitembed encode` arguments after --")
    split = argv.index("--")
    options, args = parser.parse_args(argv[:split]), argv[split + 1:]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}

    with tempfile.TemporaryDirectory(prefix="vitembed-ab-") as tmp:
        trees = {}
        extra = {"A": options.a_args.split(), "B": options.b_args.split()}
        for name, rev in (("A", options.a), ("B", options.b)):
            if rev == "WORKTREE":
                trees[name] = ROOT
            else:
                trees[name] = Path(tmp, name)
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(trees[name]), rev],
                               check=True, capture_output=True)
            compileall.compile_dir(trees[name] / "vitembed", quiet=1)
        out = Path(tmp, "out")
        times: dict[str, list[float]] = {"A": [], "B": []}
        try:
            for _ in range(options.turns):
                for name, tree in trees.items():
                    shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "vitembed", "encode", *args, *extra[name], "-o", str(out), "-q"],
                                   check=True, cwd=tmp, env={**env, "PYTHONPATH": str(tree)})
                    times[name].append(time.perf_counter() - start)
        finally:
            for name, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, rev in (("A", options.a), ("B", options.b)):
        print(f"{name} {rev} {' '.join(extra[name])}: median {medians[name]:.3f} s  ({' '.join(f'{t:.2f}' for t in times[name])})")
    print(f"B / A = {medians['B'] / medians['A']:.3f}")


if __name__ == "__main__":
    main()
