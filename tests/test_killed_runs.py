"""A run that is signalled, killed or loses a decoder: whole files only, a byte-identical resume,
no wait for a hung decode, no processes left behind, and the temporaries of dead writers are stale."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, npy_outputs, run_cli
from vitembed.files.writes import clean_stale_temporaries

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")



@pytest.fixture(scope="module")
def reference_run(many_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run_cli("encode", many_images, "-o", out, *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    return out


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitembed", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)  # unbuffered: readline



def _same_as_reference(out: Path, reference: Path) -> None:
    got, want = npy_outputs(out), npy_outputs(reference)
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want), "resumed outputs differ from an uninterrupted run"
    assert not list(out.glob(".vitembed-*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_is_byte_identical(many_images, reference_run, tmp_path, signum, code):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "1", *SMALL)
    first = proc.stdout.readline()
    assert json.loads(first)["status"] == "ok"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert b"Traceback" not in stderr and b"--skip-existing" in stderr
    done = len(npy_outputs(out))
    assert 0 < done < 300
    for name, data in npy_outputs(out).items():  # whole files only
        assert np.load(io.BytesIO(data)).shape == (17, 16)
    r = run_cli("encode", many_images, "-o", out, "--json", "--skip-existing", *SMALL)
    assert r.returncode == 0, r.stderr
    statuses = [rec["status"] for rec in json_lines(r.stdout)]
    assert statuses.count("skipped") == done and statuses.count("ok") == 300 - done
    _same_as_reference(out, reference_run)
    # The manifest's last line for each input says what it is now.
    last = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["input"]] = rec
    assert len(last) == 300 and all(r["status"] in ("ok", "skipped") and r["shape"] == [17, 16] for r in last.values())


@pytest.mark.slow
def test_sigkill_leaves_only_whole_files_and_resume_cleans_up(many_images, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "1", *SMALL)
    proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoders, at once
    proc.communicate(timeout=30)
    stale = out / ".vitembed-999999999-00000000deadbeef.tmp"  # as a killed run leaves them
    stale.write_bytes(b"torn")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"input": "torn')  # a manifest line cut by the kill
    for path in out.glob("*.npy"):
        assert np.load(path).shape == (17, 16)
    r = run_cli("encode", many_images, "-o", out, "--skip-existing", *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    _same_as_reference(out, reference_run)
    for line in (out / "manifest.jsonl").read_text().splitlines():
        json.loads(line)


def _descendants(pid: int) -> list[int]:
    """Processes below `pid`, from /proc (the decoders sit below the forkserver, below the run)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the decoder processes")
def test_ctrl_c_does_not_wait_for_a_hung_decode(many_images, tmp_path):
    """A decoder that hangs (stopped with SIGSTOP here) does not hold up Ctrl-C: it is killed."""
    proc = _start("encode", many_images, "-o", tmp_path / "out", "--json", "-j", "1", *SMALL)
    proc.stdout.readline()  # the run is under way
    decoders = [pid for pid in _descendants(proc.pid) if _parent(pid) != proc.pid]  # below the forkserver
    assert decoders
    for pid in decoders:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)  # far below the 120 s decode timeout
    assert proc.returncode == 130 and b"--skip-existing" in stderr and b"Traceback" not in stderr


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the decoder processes")
def test_killed_decoder_costs_no_result(many_images, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = _start("encode", many_images, "-o", out, "--json", "-b", "4", "-j", "2", *SMALL)
    lines = [proc.stdout.readline()]
    # The decoders are the grandchildren of the run (run -> forkserver -> decoders).
    children = set(_descendants(proc.pid))
    grandchildren = [p for p in children if any(p in _descendants(c) for c in children)]
    assert grandchildren
    os.kill(grandchildren[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    records = json_lines(b"".join(lines) + stdout)
    assert len(records) == 300 and all(r["status"] == "ok" for r in records)
    _same_as_reference(out, reference_run)


@pytest.mark.slow
def test_closed_pipe_ends_quietly(many_images, tmp_path):
    proc = _start("encode", many_images, "-o", tmp_path / "out", "--json", "-b", "4", *SMALL)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 141) and b"Traceback" not in stderr and b"Exception" not in stderr


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/stat").exists(), reason="needs fork and /proc")
def test_temporary_of_a_zombie_writer_is_stale(tmp_path):
    """A decoder killed with its parent is a zombie until init reaps it (slowly, in some
    containers); its temporary file is as stale as a dead process's."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f".vitembed-{pid}-0a1b2c3d4e5f6789.tmp").write_bytes(b"torn")
        (tmp_path / f".vitembed-{os.getpid()}-0a1b2c3d4e5f6789.tmp").write_bytes(b"being written")  # a live writer's
        assert clean_stale_temporaries(tmp_path) == 1
        assert [p.name for p in tmp_path.iterdir()] == [f".vitembed-{os.getpid()}-0a1b2c3d4e5f6789.tmp"]
    finally:
        os.waitpid(pid, 0)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the processes")
def test_children_die_with_a_killed_run(tmp_path):
    """`kill -9` of the main process: the forkserver, the decoders and the resource tracker follow
    it within seconds instead of staying blocked for minutes."""
    import signal
    import subprocess
    import sys
    import time


    photos = tmp_path / "many"
    for i in range(200):
        make_image(photos / f"i{i:03d}.png", size=(200, 200), seed=i)
    proc = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(photos), "-o", str(tmp_path / "out"),
                             "--json", "-j", "2", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.readline()
    children = _descendants(proc.pid)
    assert len(children) >= 3  # the resource tracker, the forkserver, its decoders
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in children):
        time.sleep(0.1)
    assert [pid for pid in children if Path(f"/proc/{pid}").exists() and not _zombie(pid)] == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


_SIGNAL_IN_A_CALLBACK = """
import os, signal, sys, weakref
from vitembed.cli import main as cli

def command(prog_name):
    class Lock: pass
    def cb(ref):  # as importlib's module-lock callbacks: a signal handled here cannot raise
        os.kill(os.getpid(), {signum})
        sum(range(1000))
    lock = Lock()
    ref = weakref.ref(lock, cb)
    del lock
    sum(range(100000))
    print("carried on", file=sys.stderr)

cli.app = command
sys.argv = ["vitembed", "show"]
cli.main()
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_that_lands_in_a_callback_still_stops_the_run(signum, code):
    """A Ctrl-C or SIGTERM delivered while Python runs a callback it cannot raise from (seen: the
    import system's module-lock callbacks, during start-up) stops the process with the signal's
    code and no traceback, instead of being printed as ignored and lost."""
    r = subprocess.run([sys.executable, "-c", _SIGNAL_IN_A_CALLBACK.format(signum=int(signum))],
                       capture_output=True, timeout=60)
    assert r.returncode == code, r.stderr.decode()
    assert b"Traceback" not in r.stderr and b"carried on" not in r.stderr, r.stderr.decode()
