"""The README's Usage block and its "On a cluster" examples run as written, so that they cannot drift from the program."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def usage_block() -> list[str]:
    """The shell lines of the first ```sh block under "## Usage"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Usage\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_usage_block_runs_in_order(tmp_path, sample_paths):
    """`photos/` is a copy of the sample images, `cat.png` one of them; `vitembed` and `python`
    are this checkout's, with this interpreter."""
    lines = usage_block()
    assert len(lines) >= 10 and all(line.startswith(("vitembed ", "find ")) for line in lines)
    (tmp_path / "photos").mkdir()
    for path in sample_paths:
        shutil.copy(path, tmp_path / "photos" / path.name)
    shutil.copy(next(p for p in sample_paths if p.name == "chelsea.png"), tmp_path / "cat.png")
    if shutil.which("jq") is None:  # the only tool outside Python the block uses
        lines = [line.split(" | jq ")[0] + " > /dev/null" if " | jq " in line else line for line in lines]
    script = "\n".join([
        "set -euo pipefail",
        'vitembed() { "$PYTHON" -m vitembed "$@"; }',
        'python() { "$PYTHON" "$@"; }',
        *(f"echo '+ {i}' >&2\n{line}" for i, line in enumerate(lines)),
    ])
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    failed = re.findall(r"^\+ (\d+)$", result.stderr, re.M)
    assert result.returncode == 0, f"line {lines[int(failed[-1])] if failed else '?'}:\n{result.stderr[-3000:]}"
    assert "(257, 384)" in result.stdout  # the tensor read back from -o -
    assert "vit-b16" in result.stdout  # info --presets | grep b16
    for made in ("cat.npy", "cat.pt", "tokens/chelsea.npy", "tokens-b16/chelsea.npy", "jpg-tokens/photos/rocket.npy",
                 "layer.pt", "cat-b16.npy"):
        assert (tmp_path / made).is_file(), made


def cluster_blocks() -> tuple[list[str], list[str], str]:
    """"On a cluster"'s blocks: the lines that need machines, the lines that run here, the Python example."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## On a cluster\n", 1)[1].split("\n## ", 1)[0]
    (machines, here), python = re.findall(r"```sh\n(.*?)```", section, re.S), re.search(r"```python\n(.*?)```", section, re.S)
    lines = lambda block: [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]  # noqa: E731
    return lines(machines), lines(here), python.group(1)


@pytest.mark.slow
def test_cluster_lines_that_need_machines_use_options_that_exist():
    """`ray start` and `vitembed encode` know every option these lines give."""
    pytest.importorskip("ray")
    ray = shutil.which("ray") or pytest.skip("no ray command")
    helps = {"ray": subprocess.run([ray, "start", "--help"], capture_output=True, text=True, timeout=120).stdout,
             "vitembed": subprocess.run([sys.executable, "-m", "vitembed", "encode", "--help"], capture_output=True,
                                        text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout}
    machines, _, _ = cluster_blocks()
    assert [line.split()[0] for line in machines] == ["ray", "ray", "export", "vitembed"]
    for line in machines:
        for option in re.findall(r"(?<=\s)--[a-z-]+", line):
            assert option in helps.get(line.split()[0], option), f"{option} in: {line}"


@pytest.mark.slow
def test_cluster_lines_and_python_example_run_on_a_local_cluster(tmp_path, sample_paths, address):
    """The lines that run here, in order, then the Python example, on the session's cluster."""
    _, here, python = cluster_blocks()
    assert all(line.startswith("vitembed encode ") and " --ray" in line for line in here)
    (tmp_path / "photos").mkdir()
    shutil.copytree(ROOT / "sample_images", tmp_path / "sample_images")
    for path in sample_paths:
        shutil.copy(path, tmp_path / "photos" / path.name)
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = "\n".join(["set -euo pipefail", 'vitembed() { "$PYTHON" -m vitembed "$@"; }', *here])
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {json.loads(line)["status"] for line in result.stdout.splitlines()} == {"skipped"}
    for made in ("tokens/chelsea.npy", "tokens-b16/chelsea.npy", "uri-tokens/shard-00001.npy", "uri-tokens/manifest.jsonl"):
        assert (tmp_path / made).is_file(), made
    result = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == python.split("# ")[-1].strip()  # what its comment says it prints
