"""What a new user meets in the first hour (issue #13): help, messages, output names, the README."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli
from vitembed.request import DTYPE_ALIASES

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
    assert re.search(r"--batch-size\s+-b\s+INTEGER", text)
    assert re.search(r"--output\s+-o\s+PATH", text)
    assert re.search(r"--format\s+-f\s+\[npy\|pt\]", text)
    assert re.search(r"--quiet\s+-q\s+No table", text)  # a flag: no placeholder
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
