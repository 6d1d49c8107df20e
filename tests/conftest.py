"""Shared fixtures: the sample photos, images the tests make, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"


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


@pytest.fixture
def photo_dir(tmp_path: Path, sample_paths: list[Path]) -> Path:
    """A writable copy of three sample photos, one of them in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for src, dst in zip(sample_paths[:3], ["a.png", "b.png", "sub/c.png"]):
        Image.open(src).convert("RGB").save(folder / dst)
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
