"""Shared fixtures: the sample photos, images the tests make, and a CLI runner."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"


RAY_FIXTURES = {"ray_session", "address"}
# Files whose tests build transformers models: one group, so that one worker pays the import (3 s)
TRANSFORMERS_FILES = {"test_families_transformers.py", "test_families_timm.py", "test_checkpoints.py",
                      "test_resolution.py"}
_INNER_LOOP = False  # set by pytest_configure, before any test module is imported


def pytest_configure(config):
    global _INNER_LOOP
    _INNER_LOOP = config.getoption("markexpr", "") == "not slow"


def examples(n: int) -> int:
    """A property test's max_examples: `n` in the full suite, a fifth of them (at least 20) in the
    inner loop (`-m "not slow"`), which checks the property on fewer draws."""
    return max(20, n // 5) if _INNER_LOOP else n


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups for `--dist loadgroup` (pyproject's addopts run the suite on `-n auto` workers): a test
    that touches Ray (its fixtures, or a test_ray* file) joins the group "ray", so that one worker
    process holds the one session cluster and no second cluster competes with it; any other test
    joins its file's group (the files that build transformers models, one group), so that a module's
    fixtures and imports are paid on one worker. A test that names its own xdist_group keeps it.

    The groups are handed out in this order (`--no-loadscope-reorder` keeps it): Ray's, then those
    with a test marked long, then those with slow tests, then the rest, larger groups first within
    each; the long runs start at once and the many short tests fill the workers' ends."""
    if not config.pluginmanager.hasplugin("xdist"):  # `-p no:xdist`: no groups to form
        return
    groups = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            ray = RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name.startswith("test_ray")
            group = "transformers" if item.path.name in TRANSFORMERS_FILES else item.nodeid.split("::")[0]
            mark = pytest.mark.xdist_group("ray" if ray else group)
            item.add_marker(mark)
        groups[item] = str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    size = Counter(groups.values())
    long, slow = ({g for item, g in groups.items() if item.get_closest_marker(name)} for name in ("long", "slow"))
    rank = {g: (g != "ray", g not in long, g not in slow, -size[g]) for g in size}
    items.sort(key=lambda item: rank[groups[item]])  # stable: a group's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def layer_cache(tmp_path_factory) -> Path:
    """A fresh cache of random layers for the session (see vitembed.kernel), never the user's."""
    folder = tmp_path_factory.mktemp("layer-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITEMBED_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    """The real photos shipped in sample_images/, sorted."""
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    assert len(paths) >= 4
    return paths


PHOTO_NAMES = ["a.png", "b.png", "sub/c.png"]


@pytest.fixture(scope="session")
def photo_bytes(sample_paths: list[Path]) -> dict[str, bytes]:
    """The first three sample photos as RGB PNG files, by their name in `photo_dir`: encoded once
    per session (a PNG encode of a photo takes a tenth of a second; a copy of its bytes does not)."""
    made = {}
    for src, dst in zip(sample_paths[:3], PHOTO_NAMES):
        buffer = io.BytesIO()
        Image.open(src).convert("RGB").save(buffer, format="PNG")
        made[dst] = buffer.getvalue()
    return made


@pytest.fixture
def photo_dir(tmp_path: Path, photo_bytes: dict[str, bytes]) -> Path:
    """A writable copy of three sample photos, one of them in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, data in photo_bytes.items():
        (folder / name).write_bytes(data)
    return folder


def make_image(path: Path, size=(64, 48), mode="RGB", seed=0, **save_kwargs) -> Path:
    """A random image of the given size and mode, saved at `path` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    w, h = size
    array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(array, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **save_kwargs)
    return path


def make_images(folder: Path, names: list[str]) -> Path:
    """Small random images of slightly different sizes at `folder`/NAME for each name (subfolders
    made as needed); returns `folder`."""
    for i, name in enumerate(names):
        make_image(folder / name, size=(40 + i, 30 + i), seed=i)
    return folder


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """300 small photo-like images: enough that a run is still going when it is signalled or its
    disk fills."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def slow_but(values, *keep, ids=None, several: bool = False) -> list:
    """`values` for parametrize, each marked slow but those in `keep`: the inner loop (`-m 'not
    slow'`) runs the kept cases, the full suite every one. With `several`, each value is a tuple
    that fills several arguments."""
    missing = [value for value in keep if value not in values]
    assert not missing, f"slow_but keeps values that are not among the cases: {missing}"
    params = []
    for i, value in enumerate(values):
        marks = () if value in keep else (pytest.mark.slow,)
        args = value if several else (value,)
        params.append(pytest.param(*args, marks=marks, id=None if ids is None else ids[i]))
    return params


def npy_outputs(folder: Path) -> dict[str, bytes]:
    """The bytes of each .npy file directly in `folder`, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


_READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TORCH_HOME")  # settings libraries read once, when imported


def run_cli(*args: str, input: bytes | None = None, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """`vitembed ARGS`, bytes in and out: in this process with Typer's CliRunner, or, with
    `process` (signals, start-up, an environment that must not leak: PYTHONPATH), as
    `python -m vitembed` in a subprocess. In this process, `encode` decodes in this process too
    (`--workers 0`) unless ARGS name --workers/-j or --ray: a test about decoder processes says so.
    An exception that escapes the command comes back as a traceback on stderr and exit code 1, as
    from a real process."""
    if process or any(k == "PYTHONPATH" or k.startswith(_READ_AT_IMPORT) for k in env or {}):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", "vitembed", *map(str, args)], input=input,
                              capture_output=True, cwd=cwd, timeout=timeout, env=full_env)
    import traceback

    from typer.testing import CliRunner

    from vitembed.cli.main import app

    args = _decoding_here(args)
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=True)
    finally:
        os.chdir(here)
    stderr = result.stderr_bytes or b""
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception)).encode()
        code = 1
    return subprocess.CompletedProcess(["vitembed", *map(str, args)], code, result.stdout_bytes, stderr)


def _decoding_here(args: tuple) -> tuple:
    """`encode ARGS` with `--workers 0` first, unless ARGS choose the decoders (-j, --workers) or Ray."""
    if not args or str(args[0]) != "encode":
        return args
    options = [str(a) for a in args[1:]]
    options = options[:options.index("--")] if "--" in options else options  # after --: inputs
    if any(a in ("-j", "--workers") or a.startswith(("-j", "--workers=", "--ray")) for a in options):
        return args
    return ("encode", "--workers", "0", *args[1:])


def json_lines(stdout: bytes | str) -> list[dict]:
    """The JSON objects of `--json` output, one per line."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_manifest(folder: Path) -> list[dict]:
    """The records of an -o folder's manifest.jsonl, in order."""
    return json_lines((folder / "manifest.jsonl").read_text())


def encode_with(inputs, out, layer, prep=None, *, engine: str = "auto", device: str = "cpu", dtype: str = "float32",
                stdout=None, **options):
    """The library's run (`pipeline.run`) over files or folders, with `layer` (any form an Encoder
    takes); returns (summary, outcomes in the order they were reported)."""
    from vitembed.encoder import Encoder
    from vitembed.images.inputs import iter_sources
    from vitembed.pipeline.plan import OutputPlan
    from vitembed.pipeline.skeleton import EncodeOptions, run

    outcomes = []
    encoder = Encoder(layer, prep, engine=engine, device=device, dtype=dtype)
    plan = OutputPlan.from_option(None if out is None else str(out), None)
    summary = run(iter_sources([str(i) for i in inputs]), encoder, plan, EncodeOptions(**options),
                  on_result=outcomes.append, stdout=stdout)
    return summary, outcomes


POISONED_TORCH = "raise ImportError('torch was imported')\n"


@pytest.fixture
def no_torch_env(tmp_path) -> dict:
    """Environment variables for a subprocess in which `import torch` fails."""
    fake = tmp_path / "fake-torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(POISONED_TORCH)
    return {"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the session (or the one a caller started): 2 CPUs, 512 MiB of object
    store. Its workers import this checkout's vitembed, whichever folder a driver runs in."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    started = not ray.is_initialized()
    if started:
        with pytest.MonkeyPatch.context() as mp:  # the environment the cluster's processes start with
            mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
            ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False,
                     logging_level="error")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def address(ray_session) -> str:
    """The session cluster's address, for drivers in subprocesses."""
    return ray_session.get_runtime_context().gcs_address
