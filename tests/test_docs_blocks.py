"""Every shell and Python block of the README, ARCHITECTURE.md and docs/*.md runs as written, so the documentation
cannot drift from the program; a block that cannot run here is marked, and the marks are counted.

How a page's blocks run (docs/contributing.md says the same for writers): in page order, in one
folder per page holding `photos/` and `sample_images/` (copies of the sample images) and `cat.png`;
`vitembed` and `python` are this checkout's, with this interpreter (`encode` with `--workers 0`
unless the line picks its decoders or Ray). A `console` block's output
must match (`...` is any text; a line of `...` any lines); a `python` block's `print(...)  # TEXT`
must print TEXT. A block marked `<!-- not run: REASON -->` on the line before its fence is not
run, but its `vitembed` lines must use options that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]  # ARCHITECTURE.md: the site includes it
RUN = {"sh", "console", "python"}
SHOWN = {"text", "json"}  # shown, never run
MARK = re.compile(r"^<!-- not run: (.+) -->$")
PIP_PREFIX = re.compile(r"^pip install -e \S+ && ")  # the checkout under test is already importable
# Blocks marked as not run, per page: a new block that cannot run must be marked and counted here.
NOT_RUN = {
    "README.md": 3,  # two installs, the whole test suite
    "index.md": 2,  # two installs
    "weights.md": 1,  # named pretrained weights (downloads)
    "pictures.md": 1,  # a trained model's pictures (downloads)
    "cluster.md": 1,  # a cluster of machines
    "performance.md": 8,  # benchmarks (minutes), the GPU check
    "safety.md": 1,  # the fuzzer (minutes)
    "contributing.md": 3,  # the test suite, the inner loop, mkdocs serve
}


@dataclass
class Block:
    page: str
    lang: str
    code: str
    line: int
    not_run: str | None  # the reason, for a marked block


def page_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page, with the mark on the line before each fence."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.match(lines[i - 1]) if i else None
        blocks.append(Block(path.name, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1,
                            mark.group(1) if mark else None))
        i = end + 1
    return blocks


def test_every_block_runs_or_is_marked_and_counted():
    """Every fence is one of the run or shown languages, every mark sits on a runnable block, and
    each page has exactly the marks NOT_RUN counts."""
    counted = {}
    for path in PAGES:
        blocks = page_blocks(path)
        for block in blocks:
            assert block.lang in RUN | SHOWN, f"{path.name}:{block.line}: a ```{block.lang} block is neither run nor shown"
            assert block.not_run is None or block.lang in RUN, f"{path.name}:{block.line}: a mark on a shown block"
        marks = sum(bool(MARK.match(line)) for line in path.read_text().splitlines())
        assert marks == sum(b.not_run is not None for b in blocks), f"{path.name}: a mark not on the line before a fence"
        if marks:
            counted[path.name] = marks
    assert counted == NOT_RUN


def test_readme_test_command_is_what_ci_runs():
    """The README's second Quick-start command is .ci/run's last line, less the site build CI adds."""
    readme = next(b for b in page_blocks(ROOT / "README.md") if "pytest" in b.code)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    ci_steps = [step.strip() for step in ci.split("&&")]
    assert any("mkdocs build --strict" in step for step in ci_steps)
    assert [step.strip() for step in readme.code.split("&&")] == [s for s in ci_steps if "mkdocs" not in s]
    assert readme.not_run


def vitembed_lines(code: str) -> list[list[str]]:
    """The words of each `vitembed ...` command in a shell block (after pipes and `&&` too)."""
    commands = []
    for line in code.splitlines():
        line = line.split("  #")[0].removeprefix("$ ")
        for part in re.split(r"\||&&", line):
            words = part.split()
            if words[:1] == ["vitembed"]:
                commands.append(words[1:])
    return commands


def test_marked_blocks_use_options_that_exist():
    """A block that is not run still names only commands and options the program has."""
    import typer.main

    from vitembed.cli.main import app

    checked = 0
    for path in PAGES:
        for block in page_blocks(path):
            if block.not_run is None or block.lang == "python":
                continue
            for words in vitembed_lines(block.code):
                command = typer.main.get_command(app)
                while hasattr(command, "commands") and words and words[0] in command.commands:
                    command, words = command.commands[words[0]], words[1:]
                known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
                for option in (w.split("=")[0] for w in words if w.startswith("--")):
                    assert option in known, f"{path.name}:{block.line}: {command.name} has no {option}"
                checked += 1
    assert checked >= 5  # the downloads, the cluster and pictures lines at least


@pytest.mark.slow
def test_cluster_lines_that_need_machines_use_ray_options_that_exist():
    """`ray start` knows every option the cluster page's lines give it."""
    scripts = pytest.importorskip("ray.scripts.scripts")
    known = {opt for param in scripts.cli.commands["start"].params for opt in param.opts}
    lines = [line for b in page_blocks(ROOT / "docs" / "cluster.md") if b.not_run
             for line in b.code.splitlines() if line.startswith("ray start")]
    assert len(lines) == 2
    for line in lines:
        for option in re.findall(r"(?<=\s)--[a-z-]+", line.split("  #")[0]):
            assert option in known, f"ray start has no {option}"


PRELUDE = "\n".join([
    "set -euo pipefail",
    # `encode` decodes in the main process (no decoder pool to start), as run_cli's commands do, unless
    # the line picks its decoders or Ray: the outputs are the same bytes
    'vitembed() {',
    '  if [ "${1-}" = encode ] && ! printf "%s\\n" "$@" | grep -qE "^(-j|--workers|--ray)"; then',
    '    set -- encode --workers 0 "${@:2}"',
    '  fi',
    '  "$PYTHON" -m vitembed "$@"',
    '}',
    'python() { "$PYTHON" "$@"; }',
    "" if shutil.which("jq") else 'jq() { cat > /dev/null; }',  # the only tool outside Python a block uses
])


def expected_pattern(expected: list[str]) -> re.Pattern:
    """A console block's output as a regular expression: `...` is any text, a line of it any lines."""
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(map(re.escape, line.rstrip().split("..."))) + r"[ \t]*\n")
    return re.compile("".join(parts))


def console_steps(code: str) -> list[tuple[str, list[str]]]:
    """A console block's commands, each with the lines shown after it."""
    steps = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before a command: {line}"
            steps[-1][1].append(line)
    return steps


def run_block(block: Block, sandbox: Path, env: dict) -> None:
    where = f"{block.page}:{block.line}"
    if block.lang == "python":
        result = subprocess.run([sys.executable, "-c", block.code], cwd=sandbox, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"
        prints = [line for line in block.code.splitlines() if line.startswith("print(")]
        expected = [re.search(r"  # (.*)$", line).group(1) for line in prints]  # every print says what it prints
        printed = iter(result.stdout.splitlines())
        assert all(line in printed for line in expected), f"{where}: printed {result.stdout!r}, expected {expected}"
    elif block.lang == "sh":
        code = "\n".join(PIP_PREFIX.sub("", line) for line in block.code.splitlines())
        result = subprocess.run(["bash", "-xc", PRELUDE + "\n" + code], cwd=sandbox, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"
    else:
        for command, expected in console_steps(block.code):
            result = subprocess.run(["bash", "-c", PRELUDE + "\n" + command + " 2>&1"], cwd=sandbox, env=env,
                                    stdout=subprocess.PIPE, text=True, timeout=600)
            assert result.returncode == 0, f"{where}: {command}\n{result.stdout[-3000:]}"
            shown = "\n".join(expected) + "\n" if expected else ""
            assert expected_pattern(expected).fullmatch(result.stdout), \
                f"{where}: {command}\nprinted:\n{result.stdout}\nthe page shows:\n{shown}"


RUNNABLE = [path for path in PAGES if any(b.not_run is None and b.lang in RUN for b in page_blocks(path))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[path.name for path in RUNNABLE])
def test_page_blocks_run_in_order(page, tmp_path, sample_paths, request):
    """Each runnable block of the page, in order, in the page's own folder."""
    blocks = [b for b in page_blocks(page) if b.not_run is None and b.lang in RUN]
    (tmp_path / "photos").mkdir()
    for path in sample_paths:
        shutil.copy(path, tmp_path / "photos" / path.name)
    shutil.copytree(ROOT / "sample_images", tmp_path / "sample_images")
    shutil.copy(next(p for p in sample_paths if p.name == "chelsea.png"), tmp_path / "cat.png")
    ray = {}
    if any("--ray" in b.code or "import ray" in b.code for b in blocks):  # the session's cluster, not one per command
        ray = {"RAY_ADDRESS": request.getfixturevalue("address")}  # first: starting it sets what joining it needs
    env = {**os.environ, **ray, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for block in blocks:
        run_block(block, tmp_path, env)
