"""Drawing helpers for `pictures.py`: text, colour bars, nearest-neighbour enlargement, framing.

Pillow and numpy only. Text uses Pillow's bundled scalable font (`ImageFont.load_default(size=)`,
Pillow >= 10.1 with FreeType; without FreeType Pillow falls back to its small bitmap font).
Boxes are (left, top, right, bottom) in pixels, right and bottom exclusive.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .colormaps import VIRIDIS
from ..files.pngfile import PNG_KEY  # the PNG text chunk that holds the panels' boxes

__all__ = ["PNG_KEY", "Picture", "enlarge", "frame", "text_width"]

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
GREY_INK = (90, 90, 90)
MARGIN = 16
TITLE_SIZE = 18
TEXT_SIZE = 14
Box = tuple[int, int, int, int]


@dataclass
class Picture:
    """A drawn picture and where its parts lie in it.

    Attributes:
        image: the RGB picture.
        panels: name -> box of each drawn array (e.g. "image", "norms", "tile 2,3").
        scale: name -> pixels of the picture per cell of that panel's array (a patch, a pixel).
    """

    image: Image.Image
    panels: dict[str, Box] = field(default_factory=dict)
    scale: dict[str, int] = field(default_factory=dict)

    def png(self) -> bytes:
        """The picture as PNG bytes; `panels` and `scale` ride along as JSON in a compressed text
        chunk named "vitembed" (`Image.open(f).text["vitembed"]`), so that a reader (or a test)
        can find each drawn array in the pixels."""
        info = PngInfo()
        info.add_text(PNG_KEY, json.dumps({"panels": self.panels, "scale": self.scale}, separators=(",", ":")),
                      zip=True)
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=True, pnginfo=info)
        return buf.getvalue()


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def line_height(size: int) -> int:
    return int(size * 1.35) + 1


def enlarge(array: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour enlargement: each value becomes a k x k block (no smoothing).

    Args:
        array: (h, w) or (h, w, C).

    Returns:
        (h k, w k) or (h k, w k, C), same dtype.
    """
    return np.repeat(np.repeat(array, k, axis=0), k, axis=1)  # (h, w, ...) -> (h k, w k, ...)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """(h, w), (h, w, 1) or (h, w, 3) uint8 -> (h, w, 3) uint8 (grey repeated)."""
    a = np.asarray(array, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]  # (h, w) -> (h, w, 1)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a  # (h, w, 1) -> (h, w, 3)


def minmax_uint8(values: np.ndarray) -> np.ndarray:
    """Scale an array to 0..255 by its own min and max (a constant array gives 128)."""
    v = np.asarray(values, dtype=np.float64)
    low, high = float(v.min()), float(v.max())
    if high <= low:
        return np.full(v.shape, 128, dtype=np.uint8)
    return np.rint((v - low) / (high - low) * 255.0).astype(np.uint8)


def wrap(text: str, size: int, width: int) -> list[str]:
    """Greedy word wrap of one paragraph to `width` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if current and text_width(trial, size) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int,
              fill=INK, anchor: str = "la", **kwargs) -> None:
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor, **kwargs)


def vertical_text(canvas: Image.Image, centre: tuple[int, int], text: str, size: int, fill=INK) -> None:
    """Text turned 90 degrees counter-clockwise (read bottom to top), centred at `centre`."""
    w, h = text_width(text, size) + 4, line_height(size)
    strip = Image.new("L", (w, h), 0)
    ImageDraw.Draw(strip).text((w / 2, h / 2), text, font=font(size), fill=255, anchor="mm")
    strip = strip.rotate(90, expand=True)  # (w, h) -> (h, w)
    left, top = centre[0] - strip.width // 2, centre[1] - strip.height // 2
    canvas.paste(Image.new("RGB", strip.size, fill), (left, top), mask=strip)


def colour_bar(canvas: Image.Image, box: Box, low: float, high: float, ticks: list[float],
               label: str | None = None) -> None:
    """A vertical viridis bar in `box` (high at the top), tick labels right of it, and an
    optional label turned on its side further right."""
    left, top, right, bottom = box
    h = bottom - top
    ramp = np.linspace(high, low, h)  # (h,): top row = high
    colours = np.clip(np.rint((ramp - low) / (high - low) * 255), 0, 255).astype(np.intp) if high > low \
        else np.full(h, 128, dtype=np.intp)
    bar = np.repeat(VIRIDIS[colours][:, None, :], right - left, axis=1)  # (h, 3) -> (h, w, 3)
    canvas.paste(Image.fromarray(bar, "RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left - 1, top - 1, right, bottom), outline=INK)
    widest = 0
    for value in ticks:
        y = top + (high - value) / (high - low) * (h - 1) if high > low else top + h / 2
        draw.line((right, y, right + 4, y), fill=INK)
        text = f"{value:.3g}"
        draw_text(draw, (right + 7, y), text, TEXT_SIZE - 1, anchor="lm")
        widest = max(widest, text_width(text, TEXT_SIZE - 1))
    if label:
        vertical_text(canvas, (right + 7 + widest + 6 + line_height(TEXT_SIZE) // 2, top + h // 2), label, TEXT_SIZE)


def colour_bar_width(ticks: list[float], label: str | None) -> int:
    """Pixels right of the bar that `colour_bar` writes into."""
    widest = max(text_width(f"{v:.3g}", TEXT_SIZE - 1) for v in ticks)
    return 7 + widest + (6 + line_height(TEXT_SIZE) if label else 0) + 4


def frame(title: str, body: Image.Image, caption: list[str], panels: dict[str, Box] | None = None,
          scale: dict[str, int] | None = None) -> Picture:
    """Put a title above `body` and wrapped caption paragraphs below it, on a white sheet.

    Args:
        panels: boxes within `body`; returned shifted to their place in the picture.
    """
    width = max(body.width, 560)
    title_lines = wrap(title, TITLE_SIZE, width)
    caption_lines = [line for paragraph in caption for line in wrap(paragraph, TEXT_SIZE, width)]
    title_h = len(title_lines) * line_height(TITLE_SIZE)
    top = MARGIN + title_h + 10
    height = top + body.height + 12 + len(caption_lines) * line_height(TEXT_SIZE) + MARGIN
    sheet = Image.new("RGB", (width + 2 * MARGIN, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw_text(draw, (MARGIN, MARGIN + i * line_height(TITLE_SIZE)), line, TITLE_SIZE)
    sheet.paste(body, (MARGIN, top))
    y = top + body.height + 12
    for i, line in enumerate(caption_lines):
        draw_text(draw, (MARGIN, y + i * line_height(TEXT_SIZE)), line, TEXT_SIZE, fill=GREY_INK)
    shifted = {name: (a + MARGIN, b + top, c + MARGIN, d + top) for name, (a, b, c, d) in (panels or {}).items()}
    return Picture(sheet, shifted, dict(scale or {}))
