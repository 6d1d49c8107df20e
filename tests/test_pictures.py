"""`vitembed show` and the numbers behind it: read back the PNGs, check the pixels.

Each picture carries the boxes of its drawn arrays in a PNG text chunk ("vitembed"), so the tests
find a patch, a norm cell or a similarity tile in the pixels and compare it with what it shows.
The CLI runs in-process (Typer's CliRunner).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import make_image, slow_but
from vitembed.cli.main import app
from vitembed.show.colormaps import VIRIDIS
from vitembed.layer.config import PRESETS, LayerConfig
from vitembed.files.writes import is_temporary
from vitembed.show.figures import (filter_pca, grid_positions, grid_tokens, patch_boxes, patch_rows, position_similarity,
                              token_norms, token_pca)
from vitembed.images.decode import Preprocess, load_image
from vitembed.layer.reference import build_layer
from vitembed.show.pictures import GRID_COLOUR, draw_patches
from vitembed.layer.posembed import sincos_2d
from vitembed.weights.load import load_weights

SMALL = LayerConfig(32, 8, 48)  # 4 x 4 patches of 8 x 8 x 3, D = 48
SMALL_OPTS = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "48"]


def show(*args):
    """`vitembed show ARGS` in-process; the result has exit_code, stdout_bytes and stderr."""
    return CliRunner().invoke(app, ["show", *map(str, args)])


def read_png(source) -> tuple[np.ndarray, dict]:
    """(H, W, 3) uint8 pixels and the picture's panel boxes and scales."""
    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    im.load()
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im), json.loads(im.text["vitembed"])


def viridis_values(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """Colours back to values: the nearest viridis entry of each pixel, mapped onto [low, high]."""
    dist = ((rgb[..., None, :].astype(int) - VIRIDIS.astype(int)) ** 2).sum(-1)  # (..., 256)
    return low + dist.argmin(-1) / 255.0 * (high - low)


def cell_centres(pixels: np.ndarray, box, shape) -> np.ndarray:
    """The pixel at the centre of each cell of a (rows, cols) array drawn in `box`."""
    left, top, right, bottom = box
    rows, cols = shape
    ys = top + ((np.arange(rows) + 0.5) * (bottom - top) / rows).astype(int)
    xs = left + ((np.arange(cols) + 0.5) * (right - left) / cols).astype(int)
    return pixels[ys][:, xs]  # (rows, cols, 3)


def assert_one_line_error(result, code: int, *substrings: str) -> None:
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err, result.exception)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert result.stdout_bytes == b""
    for s in substrings:
        assert s in err, err


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize("opts", slow_but([[], ["--preset", "vit-b16", "--resize", "crop"], SMALL_OPTS], SMALL_OPTS))
def test_patch_grid_lines_fall_at_multiples_of_the_patch_size(opts, sample_paths, tmp_path):
    out = tmp_path / "p.png"
    result = show("patches", sample_paths[0], "-o", out, *opts)
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(out)
    left, top, right, bottom = meta["panels"]["image"]
    k = meta["scale"]["image"]
    config = PRESETS["vit-b16"] if "vit-b16" in opts else SMALL if opts else PRESETS["vitbook-s14"]
    p, g = config.patch_size, config.num_patch_row
    assert (right - left, bottom - top) == (config.image_size * k, config.image_size * k)
    image = pixels[top:bottom + 1, left:right + 1]  # the lines one past the last patch included
    full_columns = np.flatnonzero((image == GRID_COLOUR).all(-1).all(0))
    full_rows = np.flatnonzero((image == GRID_COLOUR).all(-1).all(1))
    np.testing.assert_array_equal(full_columns, np.arange(g + 1) * p * k)
    np.testing.assert_array_equal(full_rows, np.arange(g + 1) * p * k)
    # Between the lines: the image as the layer sees it, enlarged k x k (patch corners checked).
    prep = Preprocess(image_size=config.image_size, resize="crop" if "crop" in opts else "squash")
    seen = load_image(sample_paths[0], prep)
    for r, c in [(0, 0), (g - 1, g - 1), (g // 2, 1)]:
        assert (image[r * p * k + 1, c * p * k + 1] == seen[r * p, c * p]).all()
        assert (image[(r + 1) * p * k - 1, (c + 1) * p * k - 1] == seen[(r + 1) * p - 1, (c + 1) * p - 1]).all()


def test_patch_geometry_arrays():
    rows = patch_rows(PRESETS["vitbook-s14"])
    assert rows.shape == (16, 16) and rows[0, 0] == 1 and rows[0, 1] == 2 and rows[1, 0] == 17 and rows[-1, -1] == 256
    boxes = patch_boxes(PRESETS["vitbook-s14"])
    assert boxes.shape == (256, 4)
    np.testing.assert_array_equal(boxes[0], [0, 0, 14, 14])
    np.testing.assert_array_equal(boxes[17], [14, 14, 28, 28])  # token 18: row 1, column 1
    np.testing.assert_array_equal(boxes[-1], [210, 210, 224, 224])
    reg = LayerConfig(32, 8, 24, num_reg_tokens=4)
    assert patch_rows(reg)[0, 0] == 5  # class token, 4 registers, then the patches


def test_patches_library_draws_lines_on_a_plain_image():
    pixels = np.full((32, 32, 3), 40, dtype=np.uint8)
    picture = draw_patches(pixels, SMALL, "plain")
    left, top, right, bottom = picture.panels["image"]
    k = picture.scale["image"]
    a = np.asarray(picture.image)
    line = (a[top:bottom, :] == GRID_COLOUR).all(-1).all(0)  # columns that are grid colour top to bottom
    assert list(np.flatnonzero(line)) == [left + j * 8 * k for j in range(5)]


# --------------------------------------------------------------------------- tokens


def test_norm_map_brightest_cell_is_the_largest_norm(tmp_path):
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=SMALL.token_shape).astype(np.float32)  # (17, 48)
    z0[1 + 6] *= 4.0  # patch (1, 2): token 7
    z0[0] *= 100.0  # the class token is not a patch: it must not take the brightest cell
    np.save(tmp_path / "z.npy", z0)
    result = show("tokens", tmp_path / "z.npy", *SMALL_OPTS, "-o", tmp_path / "t.png")
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(tmp_path / "t.png")
    assert "image" not in meta["panels"]  # saved tokens without --image: no picture of the image
    norms = token_norms(grid_tokens(z0, SMALL))
    shown = viridis_values(cell_centres(pixels, meta["panels"]["norms"], (4, 4)), norms.min(), norms.max())
    assert np.unravel_index(shown.argmax(), shown.shape) == (1, 2)
    np.testing.assert_allclose(shown, norms, atol=(norms.max() - norms.min()) / 255 + 1e-9)
    # Each patch is one block of equal pixels: no smoothing across patch borders.
    left, top, right, bottom = meta["panels"]["norms"]
    cell = meta["scale"]["norms"]
    block = pixels[top + cell:top + 2 * cell, left + 2 * cell:left + 3 * cell]
    assert (block == block[0, 0]).all()


def test_token_pca_recovers_a_planted_direction():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=32)
    direction /= np.linalg.norm(direction)
    weights = np.linspace(-3, 3, 36).reshape(6, 6)  # a ramp across the grid
    patches = weights[..., None] * direction + 0.01 * rng.normal(size=(6, 6, 32))
    pca = token_pca(patches, 3)
    assert pca.values.shape == (6, 6, 3) and pca.explained[0] > 0.99
    assert abs(np.corrcoef(pca.values[..., 0].ravel(), weights.ravel())[0, 1]) > 0.999


def test_tokens_of_an_image_and_from_saved_output(sample_paths, tmp_path):
    result = show("tokens", sample_paths[1], *SMALL_OPTS, "-o", tmp_path / "t.png")
    assert result.exit_code == 0, result.output
    _, meta = read_png(tmp_path / "t.png")
    assert set(meta["panels"]) == {"image", "norms", "pca"}
    wrong = np.zeros((197, 768), dtype=np.float32)
    np.save(tmp_path / "w.npy", wrong)
    bad = show("tokens", tmp_path / "w.npy")
    assert_one_line_error(bad, 2, "197 x 768", "--preset vit-b16")


# --------------------------------------------------------------------------- filters


def gratings(p: int = 8) -> np.ndarray:
    """Three orthonormal (P, P, C) gratings of different frequency, orientation and colour."""
    y, x = np.mgrid[0:p, 0:p] / p
    waves = [np.cos(2 * np.pi * x), np.cos(2 * np.pi * (x + y)), np.sin(2 * np.pi * 2 * y)]
    colours = [np.array([1.0, 1.0, 1.0]), np.array([1.0, -1.0, 0.0]), np.array([0.0, 1.0, -1.0])]
    out = np.stack([w[..., None] * c for w, c in zip(waves, colours)])  # (3, P, P, C)
    return out / np.linalg.norm(out.reshape(3, -1), axis=1)[:, None, None, None]


def grating_layer(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A seed state dict whose E rows are gratings times distinct scales, plus small noise."""
    rng = np.random.default_rng(2)
    g = gratings()
    coef = rng.normal(size=(64, 3)) * np.array([6.0, 3.0, 1.5])
    coef -= coef.mean(0)
    filters = coef @ g.reshape(3, -1) + 0.01 * rng.normal(size=(64, g[0].size))  # (64, P P C)
    weight = filters.reshape(64, 8, 8, 3).transpose(0, 3, 1, 2)  # (D, P, P, C) -> (D, C, P, P)
    state = {"patch_emb_layer.weight": torch.tensor(weight, dtype=torch.float32), "patch_emb_layer.bias": torch.zeros(64),
             "cls_token": torch.zeros(1, 1, 64), "pos_emb": torch.randn(1, 17, 64)}
    torch.save(state, tmp_path / "gratings.pt")
    return tmp_path / "gratings.pt", g


def test_filter_pca_recovers_gratings(tmp_path):
    path, g = grating_layer(tmp_path)
    weight = load_weights(path).state_dict["patch_emb_layer.weight"].numpy()
    pca = filter_pca(weight, 28)
    assert pca.values.shape == (28, 8, 8, 3)
    for j in range(3):
        assert abs((pca.values[j] * g[j]).sum()) > 0.999, j  # unit vectors: |cos| ~ 1, up to sign
    assert pca.explained[:3].sum() > 0.999
    result = show("filters", "--weights", path, "-o", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(tmp_path / "f.png")
    assert len(meta["panels"]) == 28
    for j in range(3):  # the drawn tiles, min-max scaled to 0..255, are the gratings (up to sign)
        left, top, right, bottom = meta["panels"][f"pc {j + 1}"]
        k = meta["scale"][f"pc {j + 1}"]
        tile = pixels[top:bottom:k, left:right:k].astype(float)  # one pixel per filter pixel, (P, P, 3)
        assert abs(np.corrcoef(tile.ravel(), g[j].ravel())[0, 1]) > 0.99


def test_grey_filters_are_grey(tmp_path):
    result = show("filters", "--in-channels", "1", "-o", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(tmp_path / "f.png")
    left, top, right, bottom = meta["panels"]["pc 1"]
    tile = pixels[top:bottom, left:right].astype(int)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all() and tile.std() > 10


# --------------------------------------------------------------------------- positions


def test_sincos_positions_peak_at_their_own_patch(tmp_path):
    config = PRESETS["vitbook-s14"]
    layer = build_layer(config, 0, "sincos")
    sim = position_similarity(grid_positions(layer.pos_emb.detach().numpy(), config))  # (16, 16, 16, 16)
    g = config.num_patch_row
    for i in range(g):
        for j in range(g):
            tile = sim[i, j]
            assert np.unravel_index(tile.argmax(), tile.shape) == (i, j)
            assert tile[i, j] == pytest.approx(1.0)
            near = tile[i, j + 1] if j + 1 < g else tile[i, j - 1]
            far = tile[g - 1 - i // 8 * (g - 1), g - 1 - j // 8 * (g - 1)]  # the opposite corner
            assert near > far
    result = show("positions", "--pos-init", "sincos", "-o", tmp_path / "pos.png")
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(tmp_path / "pos.png")
    for i in range(g):
        for j in range(g):
            shown = viridis_values(cell_centres(pixels, meta["panels"][f"tile {i},{j}"], (g, g)), -1.0, 1.0)
            peak = np.unravel_index(shown.argmax(), shown.shape)
            assert shown[i, j] == shown.max() and shown[i, j] > 0.99, (i, j, peak)
            near = shown[i, j + 1] if j + 1 < g else shown[i, j - 1]
            assert near > shown[g - 1 - i // 8 * (g - 1), g - 1 - j // 8 * (g - 1)]


def test_position_similarity_rectangular_grid():
    positions = sincos_2d(64, (3, 5))[:, None, :].reshape(3, 5, 64)  # (15, 64) -> (3, 5, 64)
    sim = position_similarity(positions)
    assert sim.shape == (3, 5, 3, 5)
    for i in range(3):
        for j in range(5):
            assert np.unravel_index(sim[i, j].argmax(), (3, 5)) == (i, j)
    from vitembed.show.pictures import draw_positions

    picture = draw_positions(sim, "rectangular")
    left, top, right, bottom = picture.panels["tile 2,4"]
    assert (right - left) / (bottom - top) == pytest.approx(5 / 3)


# --------------------------------------------------------------------------- checkpoint kinds


def checkpoint(kind: str, tmp_path: Path) -> Path:
    """A small (32 px, P = 8, D = 48) random checkpoint of each kind --weights accepts."""
    torch.manual_seed(0)
    if kind == "init":
        path = tmp_path / "layer.safetensors"
        assert CliRunner().invoke(app, ["init", *SMALL_OPTS, "-o", str(path)]).exit_code == 0
        return path
    if kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, reg_tokens=2)
    elif kind == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=48, mlp_dim=96)
    elif kind == "transformers":
        import transformers

        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=96)
        model = transformers.ViTForImageClassification(config)
    else:
        from tests.seed_reference import SeedVitInputLayer

        model = SeedVitInputLayer(emb_dim=48, num_patch_row=4, image_size=32)
    path = tmp_path / f"{kind}.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", slow_but(["init", "seed", "torchvision", "timm", "transformers"], "init"))
def test_every_checkpoint_kind_draws(kind, sample_paths, tmp_path):
    weights = checkpoint(kind, tmp_path)
    image = sample_paths[0]
    for picture, args in [("patches", [image]), ("tokens", [image]), ("filters", []), ("positions", [])]:
        out = tmp_path / f"{picture}.png"
        result = show(picture, *args, "--weights", weights, "-o", out)
        assert result.exit_code == 0, (picture, result.output)
        pixels, meta = read_png(out)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 500
    for i in range(4):  # whatever E_pos is, each patch is most similar to itself
        shown = viridis_values(cell_centres(pixels, meta["panels"][f"tile {i},{3 - i}"], (4, 4)), -1, 1)
        assert shown[i, 3 - i] == shown.max()


# --------------------------------------------------------------------------- errors and outputs


def test_bad_inputs_get_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert_one_line_error(show("patches", tmp_path / "notes.txt", "-o", tmp_path / "x.png"), 1, "not an image")
    assert_one_line_error(show("tokens", tmp_path / "missing.png"), 1, "no such file")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for picture in ("filters", "positions"):
        assert_one_line_error(show(picture, "--weights", tmp_path / "bad.pt", "-o", tmp_path / "x.png"), 1, "bad.pt")
    assert_one_line_error(show("positions", "--pos-init", "sincos", "--emb-dim", "30"), 2, "divisible by 4")
    assert_one_line_error(show("filters", "-o", tmp_path / "f.jpg"), 2, ".png")
    assert not list(tmp_path.glob("*.png"))


def test_stdout_gets_only_the_png(sample_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = show("patches", sample_paths[0], *SMALL_OPTS, "-o", "-")
    assert result.exit_code == 0 and result.stderr == ""
    data = result.stdout_bytes
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    read_png(data)
    assert os.listdir(tmp_path) == []


def test_default_names_and_replacing(sample_paths, tmp_path, monkeypatch):
    image = tmp_path / "cat.png"
    image.write_bytes(sample_paths[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    first = show("patches", image, *SMALL_OPTS)
    assert first.exit_code == 0 and "wrote cat.patches.png" in first.stderr
    again = show("patches", image, *SMALL_OPTS)
    assert again.exit_code == 0 and "replaced" in again.stderr  # an earlier picture: replaced, and said
    assert show("filters", *SMALL_OPTS).exit_code == 0 and (tmp_path / "filters.png").exists()
    (tmp_path / "out").mkdir()
    assert show("positions", *SMALL_OPTS, "-o", "out").exit_code == 0 and (tmp_path / "out" / "positions.png").exists()
    assert_one_line_error(show("patches", image, "-o", image), 1, "the input itself")
    (tmp_path / "notes.png").write_text("my notes")
    assert_one_line_error(show("filters", *SMALL_OPTS, "-o", "notes.png"), 1, "not a PNG")
    assert (tmp_path / "notes.png").read_text() == "my notes"
    victim = tmp_path / "victim.png"
    Image.new("RGB", (2, 2)).save(victim)
    before = victim.read_bytes()
    (tmp_path / "planted.png").symlink_to(victim)
    assert_one_line_error(show("filters", *SMALL_OPTS, "-o", "planted.png"), 1, "symbolic link")
    assert victim.read_bytes() == before and (tmp_path / "planted.png").is_symlink()
    assert not [p for p in os.listdir(tmp_path) if is_temporary(p)]


def test_write_png_never_follows_a_link_planted_after_the_check(tmp_path, monkeypatch):
    """A link that appears between the check and the rename is replaced, never written through."""
    from vitembed.files import writes as files
    from vitembed.files import pngfile

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = tmp_path / "p.png"
    real_create = files._create_temporary

    def plant_then_create(*args, **kwargs):
        target.symlink_to(victim)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(files, "_create_temporary", plant_then_create)
    pngfile.write_png(b"\x89PNG\r\n\x1a\nrest", target)
    assert victim.read_text() == "keep" and not target.is_symlink()
    assert oct(target.stat().st_mode & 0o777) != "0o600"  # an ordinary file's mode, not mkstemp's


def test_pad_resize_shows_the_background(tmp_path):
    """A wide image with --resize pad: the picture shows the padding the layer sees."""
    path = make_image(tmp_path / "wide.png", size=(90, 30))
    result = show("patches", path, *SMALL_OPTS, "--resize", "pad", "--background", "black", "-o", tmp_path / "w.png")
    assert result.exit_code == 0, result.output
    pixels, meta = read_png(tmp_path / "w.png")
    left, top, _, _ = meta["panels"]["image"]
    assert (pixels[top + 2, left + 2] == 0).all()  # the padding, black
