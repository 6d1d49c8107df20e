"""Help as plain text at 80 columns: every help string whole (no markup read in it, nothing cut),
and `encode --help` short enough to read."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

COMMANDS = [["encode"], ["init"], ["info"], ["inspect"], ["show"], ["show", "patches"], ["show", "tokens"],
            ["show", "filters"], ["show", "positions"], []]


def _help(command: list[str]) -> str:
    result = run_cli(*command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def _help_strings(command: list[str]) -> list[str]:
    import click
    import typer.main

    from vitembed.cli.main import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    cmd = group
    for name in command:
        cmd = cmd.get_command(ctx, name)
    return [p.help for p in cmd.get_params(ctx) if getattr(p, "help", None)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "vitembed")
def test_help_at_80_columns_prints_every_help_string_whole(command):
    text = _help(command)
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    squeezed = "".join(text.split())
    for help_text in _help_strings(command):
        assert "".join(help_text.split()) in squeezed, help_text


def test_tokens_help_keeps_its_brackets():
    text = " ".join(_help(["encode"]).split())
    assert "[x_class; x_p E] + E_pos" in text
    assert "(.pt/.pth/.bin/.safetensors)" in text  # --weights, not cut


def test_group_help_gives_each_command_its_whole_first_line():
    text = " ".join(_help([]).split())
    assert "Write a freshly initialised layer to a file, to encode with later via --weights." in text


def test_encode_help_fits_in_170_lines_at_80_columns():
    assert len(_help(["encode"]).splitlines()) <= 170
