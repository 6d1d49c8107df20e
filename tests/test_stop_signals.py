"""One SIGTERM or SIGINT stops a run within a bounded time, whatever its decoders are doing, and
the resume that follows is byte-identical to a run that was never stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

SIZE: tuple[str, ...] = ()  # vit-b16 at 224: tokens of 197 x 768, results of megabytes, long to send whole
_STOP_BOUND = 10.0  # seconds from the signal to the run's exit


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> Path:
    """112 small images, one in eight of them broken (garbage, or a PNG cut short), never a whole shard of 7."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)
    for i in range(112):
        path = folder / f"img{i:03d}.png"
        if i % 8 == 3:
            path.write_bytes(b"not an image at all")
        elif i % 8 == 6:
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            path.write_bytes(path.read_bytes()[:300])
        else:
            Image.fromarray(rng.integers(0, 256, (64 + i % 5, 64, 3), dtype=np.uint8)).save(path)
    return folder


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.npy"))}


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitembed", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


@pytest.mark.slow
@pytest.mark.long  # 30 runs of vit-b16 and their resumes
def test_one_signal_at_a_random_moment_stops_a_sharded_run_in_bounded_time_and_resume_is_identical(
        mixed_inputs, tmp_path):
    """30 sharded runs (-j 2, --shard-size 7, broken inputs), each sent one SIGTERM or SIGINT at a
    random moment: each exits within the bound, and each resume writes the clean run's bytes."""
    reference = tmp_path / "reference"
    r = run_cli("encode", mixed_inputs, "-o", reference, "--shard-size", "7", "-j", "0", "-q", *SIZE)
    assert r.returncode == 1, r.stderr  # the broken inputs
    want = _shards(reference)
    assert len(want) == 16
    rng = random.Random(22)
    hung, slow_exits, runs = [], [], []
    for turn in range(10):  # three runs at once: 30 signals in all
        batch = []
        for k in range(3):
            out = tmp_path / f"run{turn}-{k}"
            proc = _start("encode", mixed_inputs, "-o", out, "--shard-size", "7", "-j", "2", "-q", *SIZE)
            batch.append((proc, out, rng.choice([signal.SIGTERM, signal.SIGINT]), rng.uniform(0.5, 3.2)))
        began = time.monotonic()
        for proc, out, signum, delay in sorted(batch, key=lambda b: b[3]):
            time.sleep(max(0.0, began + delay - time.monotonic()))
            proc.send_signal(signum)
            sent = time.monotonic()
            try:
                proc.wait(timeout=max(0.1, sent + _STOP_BOUND - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.append((out.name, signum, delay))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:
                if time.monotonic() - sent > _STOP_BOUND:
                    slow_exits.append(out.name)
            stderr = proc.stderr.read()
            assert b"Traceback" not in stderr, stderr.decode(errors="replace")
            runs.append((out, proc.returncode))
    assert not hung, f"runs that did not exit within {_STOP_BOUND:g} s of one signal: {hung}"
    assert not slow_exits
    for out, code in runs:
        assert code in (0, 1, 130, 143), (out, code)  # done before the signal, or stopped by it
        r = run_cli("encode", mixed_inputs, "-o", out, "--shard-size", "7", "-j", "0", "-q", "--skip-existing", *SIZE)
        assert r.returncode == 1, r.stderr
        assert _shards(out) == want, f"{out.name}: the resume's shards differ from a clean run's"
        assert not list(out.glob(".vitembed-*.tmp"))
