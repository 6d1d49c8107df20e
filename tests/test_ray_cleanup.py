"""A `--ray` driver that dies unstopped (`kill -9`) leaves none of its local cluster behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status:
            kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _wait_for(what, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    return None


def test_a_killed_driver_leaves_no_ray_agents_behind(tmp_path):
    pytest.importorskip("ray")
    images = tmp_path / "images"
    for i in range(600):
        make_image(images / f"{i:04d}.png", size=(128, 128), seed=i)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    env["PYTHONPATH"] = str(ROOT)
    driver = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(images), "-o", str(tmp_path / "out"),
                               "--ray", "--ray-actors", "1", "-q"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agents: list[int] = []
    try:
        raylet = _wait_for(lambda: [p for p in _children(driver.pid)
                                    if b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]], 120)
        assert raylet, "the driver started no raylet"
        agents = _wait_for(lambda: list((tmp_path / "out").glob("*.npy")) and _children(raylet[0]), 120) or []
        names = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] for p in agents]
        assert any(b"Agent" in name for name in names), names
        assert driver.poll() is None, "the run ended before it could be killed"
        driver.kill()
        driver.wait()
        left = _wait_for(lambda: not any(_alive(p) for p in agents), 15)
        assert left, [Path(f"/proc/{p}/cmdline").read_bytes()[:40] for p in agents if _alive(p)]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in agents:  # only what this test's driver started
            if _alive(pid):
                os.kill(pid, 9)
