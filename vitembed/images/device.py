"""JPEGs decoded and resized on the layer's device: torchvision's `decode_jpeg`, which is nvJPEG on
a CUDA device, and its antialiased resize, in batches.

The decoder processes still open every file: they pass on the bytes of plain JPEGs
(`decode.read_plain_jpeg`) and decode everything else with Pillow as usual, so that which files
fail, and why, does not depend on where the decoding runs. A JPEG that the device decoder refuses
is decoded by Pillow here instead.

Pixels differ slightly from Pillow's. Measured on the CPU, where the decode itself is identical
(both are libjpeg-turbo): torch's antialiased resize is within 1 level of Pillow's (bilinear) or 5
(bicubic, at sharp edges), 0.2 levels on average at the worst scale factors
(tests/test_devicedecode.py). nvJPEG's IDCT and chroma upsampling may add small differences.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict

from ..errors import InputError
from .decode import PlainJpeg, Preprocess, load_image
from ..layer.resolution import resize_plan

__all__ = ["DEVICE_INTERPOLATIONS", "decode_jpegs", "orient", "unsupported"]

DEVICE_INTERPOLATIONS = ("bilinear", "bicubic")  # those whose antialiased torch resize matches Pillow's


def unsupported(prep: Preprocess) -> str | None:
    """Why images prepared as `prep` cannot be decoded on the device, or None if they can."""
    if prep.channels != 3:
        return "the layer takes grey (1-channel) images, which only Pillow decodes; use --decode cpu"
    if prep.resize == "native":
        return "--resize native gives each image a grid of its own, which only Pillow's decoders follow; use --decode cpu"
    if prep.interpolation not in DEVICE_INTERPOLATIONS:
        return (f"--interpolation {prep.interpolation} is Pillow's alone; use "
                f"{' or '.join(DEVICE_INTERPOLATIONS)}, or --decode cpu")
    return None


CHUNK_PIXELS = 64 << 20  # decoded together: about 200 MB of uint8 RGB, 800 MB as floats in the resize


def decode_jpegs(jpegs: list[PlainJpeg], prep: Preprocess, device) -> list:
    """JPEG files -> (H, W, 3) uint8 tensors on `device`, or an error message, per file.

    They are decoded in chunks of at most CHUNK_PIXELS (one image alone may be larger), so that a
    batch of 12-megapixel photos does not need gigabytes of device memory at once.
    """
    out: list = []
    chunk: list[PlainJpeg] = []
    pixels = 0
    for jpeg in jpegs:
        if chunk and pixels + jpeg.pixels > CHUNK_PIXELS:
            out += _decode_chunk(chunk, prep, device)
            chunk, pixels = [], 0
        chunk.append(jpeg)
        pixels += jpeg.pixels
    if chunk:
        out += _decode_chunk(chunk, prep, device)
    return out


def _decode_chunk(jpegs: list[PlainJpeg], prep: Preprocess, device) -> list:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(jpeg.data, dtype=torch.uint8) for jpeg in jpegs]
    # torchvision applies EXIF orientations on the CPU only: the orientation is applied below, on
    # every device alike.
    kwargs = dict(mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(encoded, **kwargs)
        except (RuntimeError, ValueError):  # one file the device refuses fails the batch: one by one
            decoded = [_decode_one(e, kwargs) for e in encoded]
    out: list = [None] * len(jpegs)
    # Anything but (3, H, W) is refused as well: the layer takes RGB, and nvJPEG's RGB output for
    # grey JPEGs, read from torchvision's source, has not been seen on a GPU here.
    raw = [i for i, im in enumerate(decoded) if im is not None and im.dim() == 3 and im.shape[0] == 3]
    upright = [orient(decoded[i], jpegs[i].orientation) for i in raw]
    for i, pixels in zip(raw, _resize(upright, prep)):
        out[i] = pixels
    for i in [i for i, pixels in enumerate(out) if pixels is None]:
        # Pillow's turn, from the bytes in hand: pixels, or why it cannot either.
        try:
            out[i] = torch.from_numpy(load_image(io.BytesIO(jpegs[i].data), prep)).to(device)
        except InputError as exc:
            out[i] = str(exc)
    return out


def orient(image, orientation: int):
    """A (C, H, W) tensor as EXIF orientation 1-8 says to display it (Pillow's `exif_transpose`)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)  # 5: transpose; 6, 7, 8 continue from it
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation, ())
    return image.flip(flips) if flips else image


def _decode_one(encoded, kwargs):
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(encoded, **kwargs)
    except (RuntimeError, ValueError):
        return None


def _resize(images: list, prep: Preprocess) -> list:
    """(3, H, W) uint8 tensors -> the layer's (H', W', 3) uint8 tensors, as `decode._resize` does
    with Pillow (`resolution.resize_plan`); images of one size are resized together."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    interpolation = InterpolationMode(prep.interpolation)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_size[tuple(im.shape[-2:])].append(i)
    out: list = [None] * len(images)
    for (height, width), members in by_size.items():
        x = torch.stack([images[i] for i in members])  # (G, 3, H, W)
        plan = resize_plan(width, height, prep)
        w, h = plan.target
        if plan.size != (width, height):
            x = F.resize(x, [plan.size[1], plan.size[0]], interpolation=interpolation, antialias=True)
        if plan.crop is not None:
            left, top = plan.crop
            x = x[:, :, top:top + h, left:left + w]
        elif plan.paste is not None:
            left, top = plan.paste
            canvas = torch.tensor(prep.background, dtype=torch.uint8, device=x.device).view(1, 3, 1, 1)
            canvas = canvas.expand(len(members), 3, h, w).clone()
            canvas[:, :, top:top + plan.size[1], left:left + plan.size[0]] = x
            x = canvas
        x = x.permute(0, 2, 3, 1)  # (G, 3, H', W') -> (G, H', W', 3), as the layer takes pixels
        for j, i in enumerate(members):
            out[i] = x[j]
    return out
