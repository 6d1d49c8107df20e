"""Regenerate the documentation's pictures in docs/assets/ with `vitembed show`, so they never drift from the code.

    python docs/make_pictures.py            # writes docs/assets/*.png (about 30 s on 2 cores)

Every picture is made by the CLI itself (`python -m vitembed show ...`, this checkout's package),
from sample_images/ and random layers; nothing is downloaded. One layer is made here: its E is
384 patches cut from the sample photos (a stand-in with natural-image structure, not a trained
ViT), to show what structured filters look like beside random ones. The copies in docs/assets/ are
reduced to 256 colours (Pillow's median cut, no dithering) to keep the repository small; the CLI
itself writes full RGB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "assets"
SAMPLES = ROOT / "sample_images"
sys.path.insert(0, str(ROOT))  # this checkout's vitembed, as the CLI runs below


def show(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "vitembed", "show", *map(str, args)], check=True, cwd=ROOT, env=env)


def shrink(path: Path) -> None:
    """256 colours, no dithering: a quarter of the bytes, no visible change at these sizes."""
    im = Image.open(path).convert("RGB")
    im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def patch_layer(path: Path, count: int = 384, patch: int = 14, seed: int = 0) -> Path:
    """A seed-layout state dict (224 px, P = 14, D = 384) whose filters are patches of the sample
    photos, each centred to mean 0: `vitembed show filters --weights` then shows the principal
    components of natural-image patches, smooth and low-frequency like a trained ViT's."""
    from vitembed.layer.config import DEFAULT_PRESET, PRESETS
    from vitembed.images.decode import Preprocess, load_image
    from vitembed.layer.posembed import sincos_2d

    rng = np.random.default_rng(seed)
    photos = [load_image(p, Preprocess()) for p in sorted(SAMPLES.glob("*.png")) + sorted(SAMPLES.glob("*.jpg"))]
    filters = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))].astype(np.float32) / 255.0  # (224, 224, 3)
        y, x = rng.integers(0, 224 - patch, size=2)
        cut = photo[y:y + patch, x:x + patch]  # (P, P, 3)
        filters.append((cut - cut.mean()).transpose(2, 0, 1))  # (P, P, 3) -> (3, P, P)
    grid = PRESETS[DEFAULT_PRESET].num_patch_row
    state = {
        "patch_emb_layer.weight": torch.from_numpy(np.stack(filters)) * 0.05,  # (D, 3, P, P)
        "patch_emb_layer.bias": torch.zeros(count),
        "cls_token": torch.zeros(1, 1, count),
        "pos_emb": torch.from_numpy(sincos_2d(count, (grid, grid), num_prefix=1))[None],  # (1, 257, D)
    }
    torch.save(state, path)
    return path


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    astronaut = SAMPLES / "astronaut.png"
    jobs = [
        ("patches.png", ["patches", astronaut]),
        ("tokens.png", ["tokens", astronaut]),
        ("positions-sincos.png", ["positions", "--pos-init", "sincos"]),
        ("positions-random.png", ["positions"]),
        ("filters-random.png", ["filters"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        layer = patch_layer(Path(tmp) / "photo-patches.pt")
        jobs.append(("filters-photo-patches.png", ["filters", "--weights", layer]))
        for name, args in jobs:
            show(*args, "-o", DOCS / name)
            shrink(DOCS / name)
    for name, _ in jobs:
        print(f"{DOCS / name}: {(DOCS / name).stat().st_size // 1024} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
