"""Image files -> uint8 RGB arrays of the layer's size. The only module of a run that imports
Pillow (`show` draws with it too).

`load_image` opens a file, applies its EXIF orientation, converts any mode to RGB (alpha over a
background colour, 16-bit scaled to 8 bits), resizes to H x W (S x S for a square layer; the
image's own grid with `--resize native`, see `resolution.resize_plan`) and returns an (H, W, C)
uint8 array. Normalisation to floats happens later, batched, on the layer's device (`Preprocess.mean`
and `.std`). This module imports neither torch nor torchvision, so decoding workers start fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import warnings
from dataclasses import dataclass
from struct import error as struct_error
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageColor, ImageOps

from ..choices import NORMALIZATION_STATS, RESIZE_MODES, unknown
from ..layer.config import LIMITS
from ..errors import ConfigError, InputError, one_line
from ..layer.resolution import ResizePlan, resize_plan, resize_strain
from ..files.reads import Held, NotRegularFile, open_regular
from ..files.uris import Uri

__all__ = ["NORMALIZATIONS", "PlainJpeg", "Preprocess", "ResizePlan", "image_extensions", "is_image_path",
           "load_image", "max_file_bytes", "parse_color", "pillow_limit", "read_plain_jpeg", "resize_plan",
           "set_pillow_limit"]

# (mean, std) per channel, applied to pixels / 255.
NORMALIZATIONS = NORMALIZATION_STATS  # --normalize: name -> (mean, std) of pixels / 255
INTERPOLATIONS = {  # choices.INTERPOLATIONS -> Pillow's filter
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb error threshold (2 x 89.5 MP)
MIN_CROP_PCT = 0.1  # --crop-pct: the crop covers at most 10 x the layer's size (models use 0.8 to 1)


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes the layer's input.

    Attributes:
        image_size: side S of the output square; its height H when `image_width` is set.
        resize: `squash` (straight to H x W), `crop` (the aspect ratio kept, the image covering
            (H, W) / crop_pct, then the centre H x W), `pad` (the aspect ratio kept, the image
            inside H x W, padded with `background`), `native` (the image's own aspect ratio:
            a grid of at most `max_patches` patches of `patch_size`) or `squash-crop` (squashed
            to (H, W) / crop_pct, then the centre H x W: DeiT's processor); see
            `resolution.resize_plan`.
        crop_pct: for `crop` and `squash-crop`; 0.875 is torchvision's Resize(256) + CenterCrop(224).
        interpolation: nearest, bilinear, bicubic or lanczos (antialiased, as Pillow does).
        background: RGB colour under transparent pixels and around `pad`ded images.
        mean, std: per-channel normalisation of pixels / 255.
        channels: 3 for RGB, 1 for grey.
        max_pixels: refuse images whose header claims more pixels than this.
        fast_decode: let JPEG decoding scale down by 1/2, 1/4 or 1/8 (DCT scaling) when the
            image stays at least twice the target size; slightly different pixels, much faster.
        image_width: W of a rectangular output (None: square).
        max_patches, patch_size: for `native` (and only there): the most patches an image's
            grid may have, and the layer's P.
    """

    image_size: int = 224
    resize: str = "squash"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    background: tuple[int, int, int] = (255, 255, 255)
    mean: tuple[float, ...] = NORMALIZATIONS["imagenet"][0]
    std: tuple[float, ...] = NORMALIZATIONS["imagenet"][1]
    channels: int = 3
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = False
    image_width: int | None = None
    max_patches: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ConfigError(unknown("resize mode", self.resize, RESIZE_MODES))
        if self.image_width == self.image_size:
            object.__setattr__(self, "image_width", None)  # H x H is the square, one record
        native = (self.max_patches, self.patch_size) if self.resize == "native" else (1, 1)
        if not all(isinstance(v, int) and 0 < v <= LIMITS["max_patches"] for v in native):
            raise ConfigError(f"--resize native needs max-patches from 1 to {LIMITS['max_patches']} and the "
                              f"patch size, got {self.max_patches} and {self.patch_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(unknown("interpolation", self.interpolation, INTERPOLATIONS))
        if not MIN_CROP_PCT <= self.crop_pct <= 1.0:  # NaN too; below: a cover of over 10 x the layer's size
            raise ConfigError(f"crop-pct must be from {MIN_CROP_PCT} to 1, got {self.crop_pct}")
        if self.channels not in (1, 3):
            raise ConfigError(
                f"images can be read with 1 (grey) or 3 (RGB) channels, not {self.channels}; "
                "use --in-channels 1 or 3"
            )
        if self.max_pixels < 1:
            raise ConfigError(f"max-pixels must be positive, got {self.max_pixels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) == 3 and self.channels == 1:
                # Grey images use the average of the RGB statistics.
                object.__setattr__(self, name, (sum(values) / 3,))
            elif len(values) != self.channels:
                raise ConfigError(f"{name} has {len(values)} values for {self.channels} channels")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")

    def with_normalize(self, name: str) -> Preprocess:
        if name not in NORMALIZATIONS:
            raise ConfigError(unknown("normalization", name, NORMALIZATIONS))
        mean, std = NORMALIZATIONS[name]
        return dataclasses.replace(self, mean=mean, std=std)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the output, pixels (with `native`, of the layer the grid's budget comes from)."""
        return self.image_size, self.image_width or self.image_size

    def to_dict(self) -> dict:
        """Every field (run.json's record of the preprocessing)."""
        return dataclasses.asdict(self)


def parse_color(text: str) -> tuple[int, int, int]:
    """A colour name, '#rrggbb' or 'r,g,b' -> an RGB triple."""
    try:
        if "," in text:
            parts = tuple(int(v) for v in text.split(","))
            if len(parts) != 3 or not all(0 <= v <= 255 for v in parts):
                raise ValueError
            return parts  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ConfigError(f"cannot read colour {text!r}; use a name, #rrggbb or r,g,b") from None


_EXTENSIONS: frozenset[str] | None = None


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions that Pillow registers for a format it can open."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        Image.init()
        _EXTENSIONS = frozenset(
            ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
        )
    return _EXTENSIONS


# Extensions no Pillow plugin registers (a test checks): files found beside images in a folder,
# recognised without importing every plugin (about 20 ms).
_NOT_IMAGES = frozenset({
    "", ".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".xml", ".html", ".yaml", ".yml", ".log",
    ".py", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".zip", ".gz", ".tar", ".mp4", ".mov",
})


def is_image_path(path: str | os.PathLike) -> bool:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in _NOT_IMAGES:
        return False
    Image.preinit()  # JPEG, PNG, GIF, BMP, PPM: enough for most files without importing every plugin
    return Image.EXTENSION.get(ext) in Image.OPEN or ext in image_extensions()


def max_file_bytes(prep: Preprocess) -> int:
    """The most bytes of one image file read into memory at once (a URI's, a JPEG's for the
    device): 4 a pixel of --max-pixels, an uncompressed 8-bit RGBA image of the largest size allowed."""
    return 4 * prep.max_pixels


def load_image(path: str | os.PathLike | BinaryIO, prep: Preprocess, gate=None, strains: list | None = None) -> np.ndarray:
    """Read one image (a path, a `uris.Uri`, a `reads.Held`, an open binary file) as (S, S, C) uint8.

    Args:
        gate: a lock (a semaphore shared by a run's decoder processes) held while an image of more
            than LARGE_PIXELS is decoded, so that the decoders' memory adds up to one large image
            at a time, not one per core.
        strains: where given, gets the image's `resize_strain`, if it has one.

    Raises:
        InputError: the file is missing, unreadable, not a regular file, not an image, too large
            or corrupt; the message is one line and names the reason (the caller adds the path).
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd headers, EXIF and palettes while opening; not ours to show.
            warnings.simplefilter("ignore")
            with _open(path, prep) as f, Image.open(f) as im:
                if strains is not None:
                    strains.extend(filter(None, [resize_strain(*im.size, prep)]))
                return _prepare(im, prep, gate)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except PermissionError:
        raise InputError("permission denied") from None
    except NotRegularFile as exc:
        raise InputError(str(exc)) from None
    except Image.UnidentifiedImageError:
        raise InputError("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise InputError(f"refused as a decompression bomb (over Pillow's limit of {limit} pixels)") from None
    except MemoryError:
        raise InputError("out of memory while decoding") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct_error, IndexError, TypeError,
            KeyError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        # Pillow's decoders signal corrupt data with any of these.
        raise InputError(f"cannot decode: {one_line(exc)}") from None
    except Exception as exc:  # a plugin's bug on odd bytes costs this file, never the run
        raise InputError(f"cannot decode: {type(exc).__name__}: {one_line(exc)}") from None


def _open(path: str | os.PathLike | BinaryIO, prep: Preprocess):
    """A file object for Pillow: a path is opened only if it is a regular file (never a FIFO); a
    URI is read whole through pyarrow, and a held input's bytes taken, if within `max_file_bytes`."""
    if isinstance(path, (Uri, Held)):
        return contextlib.nullcontext(io.BytesIO(path.fetch(max_file_bytes(prep))))
    if hasattr(path, "read"):
        return contextlib.nullcontext(path)
    return open_regular(path)


def set_pillow_limit(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit so that it never refuses below `max_pixels`.

    For vitembed's decoder processes only (their own Pillow): vitembed checks --max-pixels itself,
    from the header, with a clear message. A program that imports vitembed keeps Pillow's limits.
    """
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


_pillow_own: list[int | None] = []  # Pillow's own limit, while any `pillow_limit` is open
_limits_open: list[int] = []  # the `pillow_limit`s open now, in any thread
_limits_lock = threading.Lock()


@contextlib.contextmanager
def pillow_limit(max_pixels: int):
    """Pillow's limit raised as `set_pillow_limit` does, for a while: a run that decodes in this
    process (--workers 0), as its decoder processes would. Runs in other threads may overlap: the
    limit is what the largest of them needs, and Pillow's own again once the last one ends."""
    with _limits_lock:
        _pillow_own[:] = _pillow_own or [Image.MAX_IMAGE_PIXELS]
        _limits_open.append(max_pixels)
        set_pillow_limit(max_pixels)
    try:
        yield
    finally:
        with _limits_lock:
            _limits_open.remove(max_pixels)
            if not _limits_open:
                Image.MAX_IMAGE_PIXELS = _pillow_own.pop()


ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class PlainJpeg:
    """A JPEG file's bytes, and the EXIF orientation (1-8) to apply once it is decoded."""

    data: bytearray
    orientation: int = 1
    pixels: int = 0  # width x height, from the header


def read_plain_jpeg(path: str | os.PathLike, prep: Preprocess) -> PlainJpeg | None:
    """A JPEG that any JPEG decoder turns into the pixels `load_image` starts from, else None.

    That is a whole (ends with its EOI marker), single-frame, non-progressive JPEG in YCbCr or grey,
    within `prep.max_pixels`, read as RGB. Such files can be decoded elsewhere (on a GPU, by
    nvJPEG, which ignores EXIF: hence the orientation); everything else, errors included, is left
    to `load_image`, so that which files fail and why does not depend on the decoder.
    """
    if prep.channels != 3:
        return None
    try:
        if isinstance(path, Held):
            data = bytearray(path.fetch(max_file_bytes(prep)))
        else:
            with open_regular(path) as f:
                if os.fstat(f.fileno()).st_size > max_file_bytes(prep):  # far over any JPEG of that many pixels
                    return None
                data = bytearray(f.read())
    except (OSError, NotRegularFile, InputError):
        return None
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if (im.format != "JPEG" or im.mode not in ("RGB", "L") or "progressive" in im.info
                    or "progression" in im.info or getattr(im, "n_frames", 1) > 1):
                return None
            orientation = im.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever is wrong with it, load_image will say
        return None
    if not 0 < width * height <= prep.max_pixels:
        return None
    return PlainJpeg(data, orientation if orientation in range(1, 9) else 1, width * height)


def keep_pixel_blocks(blocks: int = 4) -> None:
    """Let Pillow keep a few freed 16 MB pixel blocks for the next image (a decoder process's
    setting: global to Pillow). Large images then skip most of the page faults of a fresh block."""
    Image.core.set_blocks_max(blocks)


LARGE_PIXELS = 16_000_000  # decoded one at a time across a run's decoders (`load_image`'s `gate`)


def _prepare(im: Image.Image, prep: Preprocess, gate=None) -> np.ndarray:
    width, height = im.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width} x {height})")
    if width * height > prep.max_pixels:
        raise InputError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of "
            f"{prep.max_pixels}; raise it with --max-pixels"
        )
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # the first frame of an animation or a multi-page file
    shown = _draft(im, prep) if prep.fast_decode and im.format == "JPEG" else None
    large = gate is not None and width * height > LARGE_PIXELS
    with gate if large else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF and palettes; not ours to show
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an unrotated image
        im = _to_rgb(im, prep.background) if prep.channels == 3 else _to_grey(im, prep.background)
        # native: the grid of the image as it is, not as DCT scaling rounded it
        im = _resize(im, prep, shown if prep.resize == "native" else None)
    array = np.array(im, dtype=np.uint8)  # a writable copy, safe to hand to torch.from_numpy
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    return array


def _draft(im: Image.Image, prep: Preprocess) -> tuple[int, int]:
    """JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 size while the image stays at least twice the
    size it is resized to (for crop and squash-crop, the size it covers: (W, H) / crop_pct).

    Returns:
        The image's size before the scaling, as shown (EXIF orientation applied): (width, height).
    """
    h, w = prep.size
    turned = im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    shown = im.size[::-1] if turned else im.size
    if prep.resize in ("crop", "squash-crop"):
        need = (int(2 * w / prep.crop_pct), int(2 * h / prep.crop_pct))
    elif prep.resize == "native":
        target = resize_plan(*shown, prep).target
        need = (2 * target[0], 2 * target[1])
    else:
        need = (2 * w, 2 * h)
    im.draft("RGB" if prep.channels == 3 else "L", need[::-1] if turned else need)  # in the file's orientation
    return shown


_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images -> mode L, scaled (not clipped) to 0..255.

    Converted a band of rows at a time, so that a large 16-bit image costs about 6 bytes a pixel
    at the peak (its decode, one copy, the 8-bit result) rather than several float64 copies.
    """
    a = np.asarray(im)  # (H, W), one copy of the decoded image
    out = np.empty(a.shape, np.uint8)
    bands = [slice(top, top + _BAND_ROWS) for top in range(0, a.shape[0], _BAND_ROWS)]
    if a.dtype.kind == "f":
        finite = lambda rows: np.nan_to_num(a[rows].astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)  # noqa: E731
        top = max((finite(rows).max(initial=0.0) for rows in bands), default=0.0)
        scale = 255.0 if top <= 1.0 else 1.0  # floats in [0, 1], else pixel values
        for rows in bands:
            out[rows] = np.clip(np.rint(finite(rows) * scale), 0, 255)
    elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
        for rows in bands:  # 0..65535 -> 0..255: round(a / 257), exactly (257 is odd: no ties)
            out[rows] = np.clip((a[rows].astype(np.int64) + 128) // 257, 0, 255)
    else:
        for rows in bands:
            out[rows] = np.clip(a[rows], 0, 255)
    return Image.fromarray(out, mode="L")


_BAND_ROWS = 256


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode in _HIGH_BIT_MODES:
        im = _to_8bit(im)
    if im.mode == "La":
        im = im.convert("LA")  # Pillow converts premultiplied grey + alpha to nothing else
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        base = Image.new("RGB", im.size, background)
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return im.convert("RGB")


def _to_grey(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode in _HIGH_BIT_MODES:
        return _to_8bit(im)
    return _to_rgb(im, background).convert("L") if im.mode != "L" else im


def _resize(im: Image.Image, prep: Preprocess, source: tuple[int, int] | None = None) -> Image.Image:
    """`resolution.resize_plan` carried out with Pillow; `source`: the size to plan for, if not im's."""
    plan = resize_plan(*(source or im.size), prep)
    if plan.size != im.size:
        im = im.resize(plan.size, INTERPOLATIONS[prep.interpolation])
    if plan.crop is not None:
        left, top = plan.crop
        return im.crop((left, top, left + plan.target[0], top + plan.target[1]))
    if plan.paste is not None:
        fill = prep.background if im.mode == "RGB" else _grey(prep.background)
        canvas = Image.new(im.mode, plan.target, fill)
        canvas.paste(im, plan.paste)
        return canvas
    return im


def _grey(rgb: tuple[int, int, int]) -> int:
    r, g, b = rgb
    return (r * 299 + g * 587 + b * 114) // 1000  # ITU-R 601-2 luma, as Pillow's convert("L")


