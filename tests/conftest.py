"""Shared fixtures: the sample photos, images the tests make, and a CLI runner."""

from __future__ import annotations

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


def run_cli(*args: str, input: bytes | None = None, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m vitembed ARGS` in a subprocess, bytes in and out."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vitembed", *map(str, args)],
        input=input, capture_output=True, cwd=cwd, timeout=timeout, env=full_env,
    )
