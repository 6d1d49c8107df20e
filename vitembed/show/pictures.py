"""The four pictures of `vitembed show`, drawn from the arrays of `figures.py` (Pillow + numpy).

    draw_patches    the image as the layer sees it, the P x P grid over it, patches numbered
    draw_tokens     beside the image: each patch token's L2 norm, and its first 3 PCs as RGB
    draw_filters    the first 28 principal components of E's filters (ViT paper, Figure 7 left)
    draw_positions  cosine similarity of E_pos between patches (ViT paper, Figure 7 centre)

Arrays are enlarged by whole factors with nearest-neighbour (no smoothing), so that a patch is a
block of equal pixels with visible borders. Colour maps: viridis (`colormaps.py`). Each function
returns a `drawing.Picture`: the image, plus the box of every drawn array, for tests and readers.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .colormaps import apply_colormap
from ..layer.config import LayerConfig
from .drawing import (BACKGROUND, TEXT_SIZE, Box, Picture, colour_bar, colour_bar_width, draw_text, enlarge, frame,
                      line_height, minmax_uint8, text_width, to_rgb, vertical_text)
from ..errors import ConfigError
from .figures import patch_rows

__all__ = ["GRID_COLOUR", "Picture", "draw_filters", "draw_patches", "draw_positions", "draw_tokens",
           "token_layout"]

GRID_COLOUR = (255, 230, 0)  # the patch grid's lines: a yellow rare in photos, visible on dark and light
FILTER_COLUMNS = 7  # the ViT paper's Figure 7 left: 4 rows x 7 components


def token_layout(config: LayerConfig) -> str:
    """Which rows of z0 are what, in words: 'Token 0: class token (no patch); tokens 1..256: the patches, row-major'."""
    words = {"class token": "class token (no patch)", "distillation token": "distillation token (no patch)",
             "register tokens": "register tokens",
             "patches": "the patches, row-major"}
    parts = [f"token {first}: {words[what]}" if first == last else f"tokens {first}..{last}: {words[what]}"
             for first, last, what in config.token_rows()]
    text = "; ".join(parts)
    return text[0].upper() + text[1:]


def _patch_scale(patch: int, image: int, digits: int) -> int:
    """Enlargement that gives each patch room for its number, the picture at most ~2000 px wide."""
    wanted = max(44, 11 * digits + 16)  # pixels per patch for a number of `digits` at ~18 px
    return max(1, min(math.ceil(wanted / patch), 2000 // image))


def draw_patches(pixels: np.ndarray, config: LayerConfig, title: str, notes: list[str] = ()) -> Picture:
    """The image as the layer sees it, the P x P grid drawn over it, each patch numbered with its
    row in z0 (1..N with a class token at 0).

    Grid lines are 1 pixel wide at every multiple of the patch size: in the picture, at columns
    and rows `panels["image"][0 or 1] + j * P * k` for j = 0..gw or 0..gh, k = `scale["image"]`.

    Args:
        pixels: (H, W, C) uint8 (S x S for a square layer), after the resize policy, before normalisation.
        config: the layer.
        title: first line of the picture.
        notes: extra caption lines (preprocessing, source).

    Returns:
        The picture; panels["image"] is the enlarged image, scale["image"] its factor k.
    """
    (h, w), p, (gh, gw) = config.size, config.patch_size, config.grid
    rows = patch_rows(config)  # (gh, gw) token row of each patch
    k = _patch_scale(p, max(h, w), len(str(int(rows.max()))))
    cell = p * k
    body = Image.new("RGB", (w * k + 1, h * k + 1), BACKGROUND)
    body.paste(Image.fromarray(enlarge(to_rgb(pixels), k), "RGB"), (0, 0))
    draw = ImageDraw.Draw(body)
    for j in range(gw + 1):  # a line on the first pixel of each patch, and one past the last
        draw.line((j * cell, 0, j * cell, h * k), fill=GRID_COLOUR)
    for j in range(gh + 1):
        draw.line((0, j * cell, w * k, j * cell), fill=GRID_COLOUR)
    size = min(16, int(cell * 0.34), int((cell - 8) / (0.6 * len(str(int(rows.max()))))))
    if size >= 7:
        for (r, c), row in np.ndenumerate(rows):
            draw_text(draw, ((c + 0.5) * cell + 0.5, (r + 0.5) * cell + 0.5), str(row), size, fill=(255, 255, 255),
                      anchor="mm", stroke_width=max(1, size // 7), stroke_fill=(0, 0, 0))
    caption = [
        f"{f'S = {h}' if h == w else f'H x W = {h} x {w}'} px, P = {p} px: grid {gh} x {gw}, N = {config.num_patches} patches of {p} x {p} x "
        f"{config.in_channels} = {config.patch_dim} values, D = {config.emb_dim}.",
        token_layout(config) + ("." if size >= 7 else " (too many patches to number here)."),
        *notes,
        f"Drawn at {k}x (nearest); grid lines at every multiple of P.",
    ]
    return frame(title, body, caption, {"image": (0, 0, w * k, h * k)}, {"image": k})


def _panel_title(draw: ImageDraw.ImageDraw, x: int, text: str) -> None:
    draw_text(draw, (x, 0), text, TEXT_SIZE + 1)


def draw_tokens(norms: np.ndarray, scores: np.ndarray, explained: np.ndarray, title: str,
                pixels: np.ndarray | None = None, notes: list[str] = ()) -> Picture:
    """Beside the image: the L2 norm of each patch token as a heat map (viridis, with a colour
    bar), and the first three principal components of the patch tokens as R, G, B (each scaled
    to its own min..max), both on the patch grid, one block of equal pixels per patch.

    Args:
        norms: (gh, gw), `figures.token_norms`.
        scores: (gh, gw, k) with k <= 3, `figures.token_pca(...).values`.
        explained: (k,), their shares of variance.
        title: first line of the picture.
        pixels: (S, S, C) uint8, the preprocessed image, or None (tokens read from a file).
        notes: extra caption lines.

    Returns:
        The picture; panels "image" (if any), "norms" and "pca"; scale = pixels per patch.
    """
    gh, gw = norms.shape
    cell = max(1, 448 // max(gh, gw)) if pixels is None else pixels.shape[0] // gh * max(1, round(384 / pixels.shape[0]))
    pw, ph = gw * cell, gh * cell
    low, high = float(norms.min()), float(norms.max())
    ticks = [low, (low + high) / 2, high] if high > low else [low]
    bar_w = 14 + colour_bar_width(ticks, None)
    rgb = np.zeros((gh, gw, 3), dtype=np.uint8)
    for j in range(min(3, scores.shape[2])):
        rgb[:, :, j] = minmax_uint8(scores[:, :, j])
    arrays = [("norms", apply_colormap(norms, low, high), "L2 norm of each patch token")]
    arrays.append(("pca", rgb, "patch tokens' PC 1, 2, 3 as R, G, B"))
    if pixels is not None:
        arrays.insert(0, ("image", to_rgb(pixels), "preprocessed image"))
    head = line_height(TEXT_SIZE + 1) + 4
    widths = [pw + (bar_w if name == "norms" else 0) for name, _, _ in arrays]
    body = Image.new("RGB", (sum(widths) + 24 * (len(arrays) - 1), head + ph + 8), BACKGROUND)
    draw = ImageDraw.Draw(body)
    panels, scale, x = {}, {}, 0
    for (name, array, label), width in zip(arrays, widths):
        k = pw // array.shape[1]
        body.paste(Image.fromarray(enlarge(array, k), "RGB"), (x, head))
        panels[name], scale[name] = (x, head, x + pw, head + ph), k
        _panel_title(draw, x, label)
        if name == "norms":
            colour_bar(body, (x + pw + 8, head, x + pw + 20, head + ph), low, high, ticks)
        x += width + 24
    shares = ", ".join(f"PC{j + 1} {e:.1%}" for j, e in enumerate(explained[:3]))
    caption = [
        f"Patch tokens on the {gh} x {gw} patch grid, one block per patch (no smoothing); prefix tokens left out.",
        f"Norms {low:.4g} to {high:.4g}. PCA over the {gh * gw} patch tokens: {shares} of their variance; "
        "each component scaled to its own min..max.",
        *notes,
    ]
    return frame(title, body, caption, panels, scale)


def draw_filters(components: np.ndarray, explained: np.ndarray, num_filters: int, title: str,
                 notes: list[str] = ()) -> Picture:
    """Principal components of E's filters as P x P tiles, 7 per row (RGB, or grey for C = 1),
    each scaled to its own min..max.

    Args:
        components: (k, P, P, C), `figures.filter_pca(...).values`, C 1 or 3.
        explained: (k,), their shares of the filters' variance.
        num_filters: D, for the caption.
        title: first line of the picture.
        notes: extra caption lines.

    Returns:
        The picture; panels "pc 1" .. "pc k", scale = pixels per filter pixel.
    """
    k, p, _, c = components.shape
    if c not in (1, 3):
        raise ConfigError(f"filters with {c} channels cannot be drawn as RGB or grey; only C = 1 or 3")
    f = max(1, round(64 / p))
    tile, gap, label_h = p * f, 10, line_height(TEXT_SIZE - 2)
    cols = min(FILTER_COLUMNS, k)
    rows = -(-k // cols)
    body = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * (tile + label_h + gap) - gap), BACKGROUND)
    draw = ImageDraw.Draw(body)
    panels, scale = {}, {}
    for i in range(k):
        x, y = (i % cols) * (tile + gap), (i // cols) * (tile + label_h + gap)
        body.paste(Image.fromarray(enlarge(to_rgb(minmax_uint8(components[i])), f), "RGB"), (x, y))
        panels[f"pc {i + 1}"], scale[f"pc {i + 1}"] = (x, y, x + tile, y + tile), f
        draw_text(draw, (x + tile / 2, y + tile + 1), f"PC {i + 1}", TEXT_SIZE - 2, anchor="ma")
    caption = [
        f"E has D = {num_filters} filters of P x P x C = {p} x {p} x {c}; these are the first {k} principal "
        f"components of the {num_filters} filters (centred), explaining {explained[:k].sum():.1%} of their "
        f"variance (PC 1: {explained[0]:.1%}).",
        f"Each tile is scaled to its own min..max, drawn at {f}x (nearest).",
        *notes,
    ]
    return frame(title, body, caption, panels, scale)


def _tick_step(count: int, cell: int, size: int) -> int:
    """Label every n-th tile so that tick labels do not touch."""
    need = text_width(str(count), size) + 4
    return next(n for n in (1, 2, 4, 5, 10, 20, 50) if n * cell >= need or n == 50)


def _tiles(similarity, cell: int, gap: int) -> np.ndarray:
    """(gh, gw, gh, gw) similarities -> one RGB array of gh x gw tiles, `gap` white pixels apart.

    Filled one row of tiles at a time (`similarity[i]`: (gw, gh, gw)), so that an array computed
    row by row (`figures.SimilarityRows`) is never held whole."""
    gh, gw = similarity.shape[:2]
    th, tw = gh * cell, gw * cell
    grid = np.full((gh * (th + gap) - gap, gw * (tw + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(gh):
        colours = apply_colormap(similarity[i], -1.0, 1.0)  # (gw, gh, gw) -> (j, r, c, 3)
        colours = enlarge(colours.transpose(1, 2, 0, 3), cell)  # -> (r, c, j, 3) -> (r k, c k, j, 3)
        padded = np.full((th, gw, tw + gap, 3), 255, dtype=np.uint8)
        padded[:, :, :tw] = colours.transpose(0, 2, 1, 3)  # (th, tw, j, 3) -> (th, j, tw, 3)
        top = i * (th + gap)
        grid[top:top + th] = padded.reshape(th, gw * (tw + gap), 3)[:, : grid.shape[1]]  # (y, j, x, 3) -> (y, X, 3)
    return grid


def _axes(body: Image.Image, box: Box, shape: tuple[int, int], pitch: tuple[int, int]) -> None:
    """Tick numbers 1..gh left of `box` and 1..gw below it, every n-th where room is short, and
    the axis labels "input patch row" (turned) and "input patch column"."""
    left, top, right, bottom = box
    (gh, gw), (py, px), size = shape, pitch, TEXT_SIZE - 1
    draw = ImageDraw.Draw(body)
    for i in range(0, gh, _tick_step(gh, py, size)):
        draw_text(draw, (left - 6, top + i * py + (py - 2) / 2), str(i + 1), size, anchor="rm")
    for j in range(0, gw, _tick_step(gw, px, size)):
        draw_text(draw, (left + j * px + (px - 2) / 2, bottom + 4), str(j + 1), size, anchor="ma")
    vertical_text(body, (line_height(TEXT_SIZE) // 2, (top + bottom) // 2), "input patch row", TEXT_SIZE)
    draw_text(draw, ((left + right) / 2, bottom + line_height(size) + 6), "input patch column", TEXT_SIZE, anchor="ma")


def draw_positions(similarity: np.ndarray, title: str, notes: list[str] = ()) -> Picture:
    """A gh x gw grid of tiles; tile (i, j) is the gh x gw map of cosine similarities between
    patch (i, j)'s E_pos row and every patch's, on one viridis scale from -1 to 1.

    Args:
        similarity: (gh, gw, gh, gw), `figures.position_similarity`, or the same row by row
            (`figures.position_similarity_rows`): anything with that `shape` whose [i] is tile row i.
        title: first line of the picture.
        notes: extra caption lines.

    Returns:
        The picture; panels "tiles" (all of them) and "tile i,j" (0-based); scale = pixels per cell.
    """
    gh, gw = similarity.shape[:2]
    g = max(gh, gw)
    cell = max(1, round(min(64, 800 / g) / g))
    gap = 2 if g <= 24 else 1
    th, tw = gh * cell, gw * cell
    grid = _tiles(similarity, cell, gap)
    ticks = [-1.0, -0.5, 0.0, 0.5, 1.0]
    left = line_height(TEXT_SIZE) + 6 + text_width(str(gh), TEXT_SIZE - 1) + 8
    top, height, width = 8, grid.shape[0], grid.shape[1]  # top: room for the colour bar's top label
    below = 2 * line_height(TEXT_SIZE) + 12
    body = Image.new("RGB", (left + width + 32 + colour_bar_width(ticks, "cosine similarity"), top + height + below),
                     BACKGROUND)
    body.paste(Image.fromarray(grid, "RGB"), (left, top))
    _axes(body, (left, top, left + width, top + height), (gh, gw), (th + gap, tw + gap))
    x = left + width + 16
    colour_bar(body, (x, top, x + 16, top + height), -1.0, 1.0, ticks, "cosine similarity")
    panels = {"tiles": (left, top, left + width, top + height)}
    for i, j in np.ndindex(gh, gw):
        x0, y0 = left + j * (tw + gap), top + i * (th + gap)
        panels[f"tile {i},{j}"] = (x0, y0, x0 + tw, y0 + th)
    caption = [
        f"Tile (i, j) maps the cosine similarity between the position embedding of patch (i, j) and those of "
        f"all {gh} x {gw} patches (1 at its own position); the class token's row is left out. One scale, -1 to 1.",
        *notes,
    ]
    return frame(title, body, caption, panels, {name: cell for name in panels})
