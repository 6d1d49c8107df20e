"""The documentation site: `mkdocs build --strict` passes (no broken links, images or anchors), the
CLI reference is generated from the program and names every option, and the Python API page
documents every public name."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def hooks():
    """docs/hooks.py, the module mkdocs.yml names under `hooks:`."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_commands():
    """Every command of the app, groups' subcommands included, with its path of names."""
    import typer.main

    from vitembed.cli.main import app

    todo = [(("vitembed",), typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        yield path, command
        todo += [((*path, name), sub) for name, sub in getattr(command, "commands", {}).items()]


def test_cli_reference_names_every_command_and_option():
    """The generated page has a heading per command and every option of each (so `--help` and the
    site cannot disagree about what exists)."""
    page = hooks().cli_reference()
    commands = list(all_commands())
    assert len(commands) >= 9  # vitembed, encode, init, info, inspect, show and show's four
    for path, command in commands:
        assert f"`{' '.join(path)}`" in page, path
        section = page.split(f"`{' '.join(path)}`", 1)[1]
        for param in command.params:
            for option in param.opts:
                if option.startswith("-"):
                    assert f"`{option}" in section or f" {option}" in section, f"{' '.join(path)} {option}"


def test_api_reference_lists_every_public_name():
    """One mkdocstrings entry per name that `vitembed/__init__.py` exports, at its defining module."""
    import vitembed

    page = hooks().api_reference()
    for name in vitembed.__all__:
        if name != "__version__":
            assert f"::: vitembed.{vitembed._EXPORTS[name]}.{name}\n" in page + "\n", name


def test_readme_links_and_images_lead_to_files():
    """The README is not part of the site, so mkdocs does not check it: every relative link and
    image of it names a file of the repository, and it links every page of the site's nav."""
    readme = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t]
    assert targets and all((ROOT / t).is_file() for t in targets), [t for t in targets if not (ROOT / t).is_file()]
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav) >= 12 and all(f"docs/{page}" in targets or page == "architecture.md" for page in nav)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict` into tmp_path: any warning (a broken link, image or anchor, a name
    mkdocstrings cannot find) fails it. The built pages hold the generated references."""
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cli = (site / "cli" / "index.html").read_text()
    assert "vitembed encode" in cli and "--skip-existing" in cli
    api = (site / "api" / "index.html").read_text()
    assert 'id="vitembed.encoder.Encoder"' in api and 'id="vitembed.pipeline.job.encode"' in api
    assert (site / "assets" / "patches.png").is_file() and not (site / "hooks.py").exists()
