"""ARCHITECTURE.md stays true: its module table names every module of the package and nothing
else, and the one-way rules it states hold for every import in vitembed/ (those inside
functions included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vitembed"
DOC = (ROOT / "ARCHITECTURE.md").read_text()


def _module(path: Path) -> str:
    """vitembed/pipeline/skeleton.py -> pipeline.skeleton; vitembed/__init__.py -> "" (the root)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The vitembed modules `path` imports (relative to the package: "pipeline.plan"), anywhere in it."""
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "vitembed":
                base = []
            else:
                continue
            target = ".".join(base + (node.module.split(".") if node.module else []))
            if node.module and not node.level:
                target = ".".join(node.module.split(".")[1:])
            for alias in node.names:  # `from ..pipeline import skeleton` names a module
                named = f"{target}.{alias.name}".lstrip(".")
                found.add(named if named in MODULES else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vitembed":
                    found.add(".".join(alias.name.split(".")[1:]))
    return found - {module}


def _block(title: str) -> list[list[str]]:
    """The levels of the code block under the line that starts with `title`, bottom first."""
    match = re.search(re.escape(title) + r".*?\n```text\n(.*?)```", DOC, re.S)
    assert match, f"ARCHITECTURE.md has no block of {title!r}"
    return [line.split()[1:] for line in match.group(1).splitlines() if line.strip()]


def _part(module: str) -> str:
    return module.split(".")[0] or "vitembed"


def test_the_module_table_lists_every_module_and_nothing_else():
    listed = re.findall(r"^\| `vitembed/([\w/]+\.py)` \|", DOC, re.M)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    actual = {str(path.relative_to(PACKAGE)) for path in MODULES.values()}
    assert set(listed) - actual == set(), "listed, but not in the package"
    assert actual - set(listed) == set(), "in the package, but not in ARCHITECTURE.md"


PARTS = _block("The parts, from the bottom up")
RUN = _block("Inside the run, from the bottom up")


def test_the_stated_rules_name_every_part_and_every_module_of_the_run():
    parts = [part for level in PARTS for part in level]
    assert sorted(parts) == sorted({_part(m) for m in MODULES if m}), "the parts block is stale"
    run = [m for level in RUN for m in level]
    assert sorted(run) == sorted(m for m in MODULES if _part(m) in ("pipeline", "executors") and "." in m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m))
def test_each_import_goes_down_the_parts(module):
    """A part imports its own modules and those of the parts below it; never a part beside or
    above it, except that pipeline/ and executors/ are one level, the run, with a rule of its own.
    The root package (its `__version__`; its public names load lazily) is everyone's."""
    level = {part: i for i, parts in enumerate(PARTS) for part in parts}
    run = {_part(m) for modules in RUN for m in modules}
    mine = _part(module)
    for target in _imports(MODULES[module]):
        if target == "" or _part(target) == mine or {mine, _part(target)} <= run:
            continue
        assert level[_part(target)] < level[mine], f"{module} imports {target}: not below {mine}"


@pytest.mark.parametrize("module", sorted(m for levels in RUN for m in levels))
def test_inside_the_run_each_import_goes_down_the_levels(module):
    """In pipeline/ and executors/, a module imports those of its own level or below."""
    level = {m: i for i, modules in enumerate(RUN) for m in modules}
    for target in _imports(MODULES[module]):
        if target in level:
            assert level[target] <= level[module], f"{module} imports {target}, a level above it"


def test_the_sub_packages_import_nothing():
    for module, path in MODULES.items():
        if module and path.name == "__init__.py":
            assert _imports(path) == set(), f"{module}/__init__.py imports its modules"
