"""After Ctrl-C, the counts a run prints (and its manifest) equal the whole files on disk: the
files the decoders wrote while the run stopped are counted, not lost with their chunk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")


@pytest.mark.slow
@pytest.mark.parametrize("turn", range(3))
def test_interrupted_count_equals_the_files_on_disk(many_images, tmp_path, turn):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(many_images), "-o", str(out), "--json",
                             "-j", "2", "--engine", "numpy", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True, bufsize=0)
    for _ in range(5 + 20 * turn):  # a few moments into the run
        assert json.loads(proc.stdout.readline())["status"] == "ok"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    told = re.search(rb"interrupted: (\d+) encoded", stderr)
    assert told, stderr
    on_disk = len(list(out.glob("*.npy")))
    assert 0 < on_disk < 300
    assert int(told.group(1)) == on_disk
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(record["status"] == "ok" for record in manifest) == on_disk
