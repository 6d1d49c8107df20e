"""What a user types and reads first: help, option spellings, the table, what goes to stdout, --version."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from vitembed.files.formats import DTYPE_ALIASES

COMMANDS = [[], ["encode"], ["init"], ["info"], ["inspect"]]


def help_at_80_columns(*command: str) -> str:
    result = run_cli(*command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def flat(text: str) -> str:
    """Help text as one line: words, without rich's wrapping and panel borders."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_what_users_type(command):
    text = help_at_80_columns(*command)
    assert all(len(line) <= 80 for line in text.splitlines())
    # Typer's type labels are not what anyone types.
    for label in ("<bool>", "<list[str]>", "<int>", "<str>", "<float>", "<path>", "{inputs}", "{files}"):
        assert label not in text, label
    # No example is wrapped into a line that starts in the middle of a pipeline.
    assert not any(line.strip(" │").startswith("|") for line in text.splitlines())


def test_encode_help_metavars():
    text = help_at_80_columns("encode")
    assert "encode [OPTIONS] INPUTS..." in text
    assert re.search(r"-b, --batch-size\s+INTEGER", text)
    assert re.search(r"-o, --output\s+PATH", text)
    assert re.search(r"-f, --format\s+\[npy\|pt\|parquet\|wds\]", text)
    assert re.search(r"-q, --quiet\s+No table", text)  # a flag: no placeholder
    assert "jq .output" in text


def test_init_help_has_no_weights():
    text = flat(help_at_80_columns("init"))
    assert "ignored with --weights" not in text and "--seed INTEGER Seed of the random layer." in text


@pytest.mark.parametrize(("alias", "dtype"), [("fp16", "float16"), ("FP16", "float16"), ("half", "float16"),
                                              ("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_aliases(sample_paths, tmp_path, alias, dtype):
    fmt = "pt" if dtype == "bfloat16" else "npy"
    result = run_cli("encode", sample_paths[0], "-o", tmp_path / "out", "--dtype", alias, "--format", fmt, "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["dtype"] == dtype


def test_dtype_help_lists_every_alias():
    text = flat(help_at_80_columns("encode"))
    assert "--dtype DTYPE Output dtype: float32, float16 or bfloat16" in text
    assert all(alias in text for alias in DTYPE_ALIASES)


def test_wrong_dtype_suggests_the_spelling(sample_paths):
    result = run_cli("encode", sample_paths[0], "--dtype", "flaot16")
    assert result.returncode == 2
    assert b"did you mean float16?" in result.stderr and b"Traceback" not in result.stderr


def test_table_never_wraps_a_file_name():
    from rich.console import Console

    from vitembed.pipeline.report import print_table

    name = "photos/" + "a-long-folder-name/" * 5 + "astronaut.png"
    rows = [(name, "tokens/astronaut.npy", "257 x 384", "float32", "ok")]
    header = ("input", "output", "shape", "dtype", "status")
    log = io.StringIO()  # not a terminal: one line per file, however long
    print_table(Console(file=log, width=40), header, rows, paths=(0, 1))
    assert name in log.getvalue() and len(log.getvalue().splitlines()) == 2
    terminal = io.StringIO()  # a terminal: the path is shortened from the left to fit
    print_table(Console(file=terminal, width=70, force_terminal=True, color_system=None), header, rows, paths=(0, 1))
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 2 and all(len(line) <= 70 for line in lines)
    assert "…" in lines[1] and "astronaut.png" in lines[1]


def test_what_was_asked_for_goes_to_stdout(sample_paths, tmp_path):
    presets = run_cli("info", "--presets")
    assert presets.returncode == 0 and presets.stderr == b""
    assert [line for line in presets.stdout.decode().splitlines() if "b16" in line]
    assert run_cli("encode", sample_paths[0], "-o", tmp_path / "a.npy", "-q").returncode == 0
    listed = run_cli("inspect", tmp_path / "a.npy")
    assert listed.returncode == 0 and b"257 x 384" in listed.stdout and listed.stderr == b""


def test_run_json_records_the_device_used(sample_paths, tmp_path):
    assert run_cli("encode", sample_paths[0], "-o", tmp_path / "out", "-q").returncode == 0  # --device auto
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["device"] == "cpu"


def test_version():
    from importlib import metadata

    import vitembed

    result = run_cli("--version")
    assert result.returncode == 0
    line = result.stdout.decode()
    assert line.startswith(f"vitembed {vitembed.__version__} (")
    for name in ("torch", "Pillow", "numpy"):
        assert f"{name} {metadata.version(name)}" in line


@pytest.mark.slow
def test_version_imports_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom vitembed.cli.main import app\n"
            "assert CliRunner().invoke(app, ['--version']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


