"""The README's Usage block runs as written, top to bottom, so that it cannot drift from the program."""

from __future__ import annotations

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
