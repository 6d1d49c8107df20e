"""SIGTERM to a `--ray` driver mid-run: it stops cleanly (exit 143), says nothing of Ray's own
errors, and leaves whole files only; `--skip-existing` then finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image

pytestmark = pytest.mark.slow  # a Ray cluster, a driver in a process of its own

LAYER = ["--image-size", "64", "--patch-size", "8", "--emb-dim", "64"]
ACTORS = ["--ray-cpus", "0.5", "--ray-actors", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-stop") / "photos"
    for i in range(400):
        make_image(folder / f"p{i:03d}.png", size=(96, 80), seed=i)
    return folder


def _driver(corpus: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(corpus), "-o", str(out), "-q", *LAYER,
                             "--ray", "--ray-address", address, *ACTORS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_mid_run_exits_143_with_whole_files_and_no_ray_error(ray_session, address, corpus, tmp_path):
    out = tmp_path / "out"
    driver = _driver(corpus, out, address)
    end = time.monotonic() + 120
    while time.monotonic() < end and len(list(out.glob("*.npy"))) < 12:
        time.sleep(0.02)
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 143, stderr.decode()[-3000:]
    text = stderr.decode()
    assert "after it is shutdown" not in text and "Traceback" not in text, text[-3000:]
    assert "--skip-existing to resume" in text
    written = list(out.glob("*.npy"))
    assert 12 <= len(written) < 400
    for path in written:  # whole files only
        assert np.load(path).shape == (65, 64)
    assert not list(out.glob(".*.tmp"))
    resumed = _driver(corpus, out, address, "--skip-existing")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert len(list(out.glob("*.npy"))) == 400
