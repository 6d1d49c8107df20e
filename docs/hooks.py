"""mkdocs hooks: the CLI reference page is generated from the Typer app at build time, so it cannot
drift from the program; the Python API page lists every public name of `vitembed/__init__.py`.

mkdocs.yml names this file under `hooks:`; `exclude_docs` keeps it out of the built site.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's vitembed, whatever is installed
CLI_MARK = "<!-- cli-reference -->"
API_MARK = "<!-- api-reference -->"


def cli_reference() -> str:
    """Markdown for every command and option of `vitembed`, from the click command Typer builds."""
    import click
    import typer.cli
    import typer.main

    from vitembed.cli.main import app

    command = typer.main.get_command(app)
    return typer.cli.get_docs_for_click(obj=command, ctx=click.Context(command), name="vitembed", indent=1)


def api_reference() -> str:
    """One mkdocstrings entry per public name, in `vitembed.__init__`'s order, at its defining module."""
    import vitembed

    return "\n\n".join(f"::: vitembed.{module}.{name}" for name, module in vitembed._EXPORTS.items())


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    if API_MARK in markdown:
        markdown = markdown.replace(API_MARK, api_reference())
    return markdown
