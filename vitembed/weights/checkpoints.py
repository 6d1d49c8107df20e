"""Other libraries' Vision Transformer checkpoints -> vitembed's input layer: folders, preprocessing
configs and resolution. The families' layouts are `layouts.py`'s.

A `save_pretrained` folder (transformers or timm) is read with its configs: `config.json` (the model
type, the pre-norm's epsilon) and its preprocessing (`preprocessor_config.json`, timm's
`pretrained_cfg`). `--image-size` resamples the position embedding as the checkpoint's own library
does (or as `--pos-resample` says), `--patch-size` the patch embedding as FlexiViT does. Files are
read by `files/writes.py`; named weights are `pretrained.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..layer.config import check_divisible, format_size, parse_image_size
from ..errors import ConfigError, WeightsError
from .layouts import LAYOUTS, Layout, convert_state_dict, find_input_layer, resample_how
from ..layer.resolution import resample_patch_embed, resample_pos
from .files import MAX_LAYER_VALUES, LoadedWeights, read_json, read_weight_file

__all__ = [
    "LAYOUTS",
    "Layout",
    "WEIGHT_FILES",
    "convert_state_dict",
    "find_input_layer",
    "folder_hints",
    "folder_preprocess",
    "hf_preprocess",
    "load_folder",
    "resample_pos_embed",
    "resize_weights",
    "hf_input_size",
    "timm_preprocess",
    "torchvision_preprocess",
]


# --------------------------------------------------------------------------- resolution


def resample_pos_embed(pos: torch.Tensor, new_grid, old_grid, num_prefix_tokens: int,
                       method: str = "timm") -> torch.Tensor:
    """A position table for another patch grid, resampled as `method` says (`resolution.resample_pos`:
    "timm" bicubic antialiased, "hf" bicubic, "torchvision" bicubic with align_corners, "dinov2"
    DINOv2's scale factor), in float64, cast back; the first `num_prefix_tokens` rows (class,
    register tokens) are kept as they are.

    Args:
        pos: (1, prefix + gh gw, D).
        new_grid, old_grid: (rows, columns), or one side for a square grid.

    Returns:
        (1, prefix + rows x columns, D), in pos's dtype.
    """
    old, new = (tuple(g) if isinstance(g, (tuple, list)) else (g, g) for g in (old_grid, new_grid))
    table = resample_pos(pos[0].float().numpy(), old, new, num_prefix_tokens, method)  # (prefix + N', D)
    return torch.from_numpy(table)[None].to(pos.dtype)  # (rows, D) -> (1, rows, D)


def resize_weights(loaded: LoadedWeights, size=None, patch_size: int | None = None,
                   method: str | None = None) -> LoadedWeights:
    """The same weights for another image size (H, W) and patch size: E resampled for the patch
    size (FlexiViT's pseudo-inverse resize, as timm's `resample_patch_embed`), the position
    embedding for the new grid (`resample_pos_embed`); each change told in a note.

    Args:
        size: (H, W), "HxW" or a side; None keeps the weights' image size.
        patch_size: None keeps the weights' patch size.
        method: how E_pos is resampled; None: as the checkpoint's own library does.

    Raises:
        ConfigError: a size that is not a multiple of the patch size, or a layer over the size limit.
    """
    cfg = loaded.config
    height, width = parse_image_size(size) or cfg.size
    p = patch_size or cfg.patch_size
    if ((height, width), p) == (cfg.size, cfg.patch_size):
        return loaded
    check_divisible((height, width), p)
    new_cfg = dataclasses.replace(cfg, image_size=height, image_width=width, patch_size=p)
    if new_cfg.num_params > MAX_LAYER_VALUES:  # checked before the resampling allocates it
        raise ConfigError(f"--image-size {format_size(new_cfg.size)} would need a position embedding of "
                          f"{new_cfg.num_pos_rows:,} x {cfg.emb_dim} values, over vitembed's limit of "
                          f"{MAX_LAYER_VALUES:,} for a layer; pass a smaller --image-size")
    state, notes = dict(loaded.state_dict), []
    if p != cfg.patch_size:
        weight = state["patch_emb_layer.weight"]
        state["patch_emb_layer.weight"] = torch.from_numpy(resample_patch_embed(weight.float().numpy(), p)).to(weight.dtype)
        notes.append(f"resampled the patch embedding E from {cfg.patch_size}x{cfg.patch_size} to {p}x{p} pixels "
                     f"(FlexiViT's pseudo-inverse resize, as timm's resample_patch_embed) for --patch-size {p}")
    if new_cfg.grid != cfg.grid and cfg.pos_table:
        method = method or loaded.pos_resample
        state["pos_emb"] = resample_pos_embed(state["pos_emb"], new_cfg.grid, cfg.grid, cfg.num_pos_prefix, method)
        why = f"--image-size {format_size(new_cfg.size)}" if new_cfg.size != cfg.size else f"--patch-size {p}"
        if loaded.image_size == new_cfg.size and new_cfg.size != cfg.size and why.startswith("--image-size"):
            why = f"the {format_size(new_cfg.size)} input its preprocessing config gives"
        notes.append(f"resampled the position embedding from {cfg.grid[0]}x{cfg.grid[1]} to "
                     f"{new_cfg.grid[0]}x{new_cfg.grid[1]} patches ({resample_how(method, loaded.source, loaded.pos_resample)}) for {why}")
    return dataclasses.replace(loaded, config=new_cfg, state_dict=state, notes=[*loaded.notes, *notes])


# --------------------------------------------------------------------------- folders


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "open_clip_model.safetensors")


def load_folder(path: Path) -> LoadedWeights:
    """A `save_pretrained` folder (transformers or timm): weights, sharded or not, plus its preprocessing."""
    for name in WEIGHT_FILES:
        if os.path.lexists(path / name):  # a link to a device, or a FIFO, is refused, not passed over
            state = read_weight_file(path / name)
            break
    else:
        raise WeightsError(f"{path}: a folder without weights; expected one of {', '.join(WEIGHT_FILES)}")
    loaded = convert_state_dict(state, str(path), folder_hints(path))
    loaded.preprocess, loaded.image_size = folder_preprocess(path)
    return loaded


def folder_hints(path: Path) -> dict[str, Any]:
    """What a folder's config.json says of the input layer: `model_type`, the pre-norm's
    `layer_norm_eps` (a CLIP or SigLIP model's from its `vision_config`), and the `image_size` it
    was trained at (the layer's size where no position table gives it: RoPE, relative bias)."""
    config = read_json(path / "config.json")
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    hints = {"model_type": vision.get("model_type") or config.get("model_type")}
    eps = _number(vision.get("layer_norm_eps", config.get("layer_norm_eps")))
    if eps is not None and 0 < eps < 1:
        hints["layer_norm_eps"] = eps
    size = _number(vision.get("image_size", config.get("image_size")))
    if size is not None and size.is_integer() and 1 <= size <= _MAX_SIDE:
        hints["image_size"] = int(size)
    return {k: v for k, v in hints.items() if v is not None}


def folder_preprocess(path: Path) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """The preprocessing a weights folder comes with (its HF processor's, or timm's pretrained
    cfg's), and the input size (H, W) it feeds the model where that is not its table's grid (None:
    the table's; a timm cfg's input_size is always its table's)."""
    proc = read_json(path / "preprocessor_config.json")
    if proc:
        where = str(path / "preprocessor_config.json")
        return hf_preprocess(proc, where), hf_input_size(proc, where)
    config = read_json(path / "config.json")
    if isinstance(config.get("pretrained_cfg"), dict):  # a timm folder (push_to_hf_hub / save_for_hf)
        return timm_preprocess(config["pretrained_cfg"], str(path / "config.json")), None
    return {}, None


# --------------------------------------------------------------------------- preprocessing


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_MAX_SIDE = 1 << 16  # pixels on a side in a processor config; far beyond any ViT's input
_MAX_STAT = 1e4  # |mean|, std: they are of pixels / 255 (0..1); far beyond, a config is broken


def hf_preprocess(proc: dict[str, Any], where: str = "preprocessor_config.json") -> dict[str, Any]:
    """An HF image processor config (ViTImageProcessor and kin) -> `decode.Preprocess` fields.

    Raises:
        WeightsError: a size that is not a number of pixels, a mean or std that is not 1 or 3
            finite numbers (std > 0), naming `where` and the field.
    """
    out: dict[str, Any] = {}
    resample = proc.get("resample")
    if isinstance(resample, int):
        out["interpolation"] = _PIL_RESAMPLE.get(resample, "bilinear")
    size = _size(proc.get("size"), "size", where, _plain_size(proc))
    crop = _size(proc.get("crop_size"), "crop_size", where, ("height", "width"))
    if proc.get("do_center_crop") and crop.get("height") and size.get("shortest_edge"):
        out["resize"] = "crop"
        out["crop_pct"] = _crop_pct(crop["height"], size["shortest_edge"])
    elif proc.get("do_center_crop") and crop.get("height") and _squash_crop(size, crop):
        out["resize"] = "squash-crop"  # resized to height x width, then the centre crop (DeiT's 256, then 224)
        out["crop_pct"] = _crop_pct(crop["height"], size["height"])
    elif proc.get("do_resize", True):
        out["resize"] = "squash"
    # Pixels x are rescaled (x r, r = rescale_factor, 1 / 255 unless said) then normalised: (x r - mean) / std
    # = (x / 255 - mean') / std' with mean' = mean / (255 r), std' = std / (255 r), vitembed's form.
    scale = 1.0
    if proc.get("do_rescale", True) is False:
        scale = 1.0 / 255.0
    elif proc.get("rescale_factor") is not None:
        factor = _number(proc["rescale_factor"])
        if factor is None or not 0 < factor < _MAX_STAT:
            raise WeightsError(f"{where}: rescale_factor must be a positive number, got {_show(proc['rescale_factor'])}")
        scale = 1.0 / (255.0 * factor)
    if proc.get("do_normalize", True) and proc.get("image_mean") is not None:
        out["mean"] = tuple(v * scale for v in _channel_stats(proc["image_mean"], "image_mean", where))
        out["std"] = tuple(v * scale for v in _channel_stats(proc.get("image_std"), "image_std", where, std=True))
    elif not proc.get("do_normalize", True):
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (scale, scale, scale)
    return out


def hf_input_size(proc: dict[str, Any], where: str = "preprocessor_config.json") -> tuple[int, int] | None:
    """(H, W) an HF image processor feeds the model: its crop size when it crops, else its
    size's height and width; None where it says neither."""
    crop = _size(proc.get("crop_size"), "crop_size", where, ("height", "width"))
    if proc.get("do_center_crop") and crop.get("height") and crop.get("width"):
        return crop["height"], crop["width"]
    size = _size(proc.get("size"), "size", where, _plain_size(proc))
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    return None


def timm_preprocess(cfg: dict[str, Any], where: str = "timm pretrained_cfg") -> dict[str, Any]:
    """A timm pretrained cfg -> `decode.Preprocess` fields (timm: Resize(floor(S / crop_pct)) + CenterCrop;
    with crop_mode "squash", both sides resized to floor(S / crop_pct), then the centre crop).

    Raises:
        WeightsError: a crop_pct outside (0, 1], a mean or std as in `hf_preprocess`.
    """
    out: dict[str, Any] = {}
    if cfg.get("interpolation") in _INTERPOLATIONS:
        out["interpolation"] = cfg["interpolation"]
    out["resize"] = "squash" if cfg.get("crop_mode") == "squash" else "crop"
    if cfg.get("crop_pct") is not None:
        pct = _number(cfg["crop_pct"])
        if pct is None or not 0 < pct <= 1:
            raise WeightsError(f"{where}: crop_pct must be a number in (0, 1], got {_show(cfg['crop_pct'])}")
        out["crop_pct"] = pct
    if out["resize"] == "squash" and out.get("crop_pct", 1.0) < 1.0:
        out["resize"] = "squash-crop"  # timm squashes to S / crop_pct, then crops the centre S
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        out["mean"] = _channel_stats(cfg["mean"], "mean", where)
        out["std"] = _channel_stats(cfg["std"], "std", where, std=True)
    return out


def torchvision_preprocess(transforms: Any) -> dict[str, Any]:
    """torchvision's ImageClassification preset (Resize(r) shorter side + CenterCrop(c)) -> fields."""
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    interpolation = getattr(transforms.interpolation, "value", str(transforms.interpolation))
    return {
        "resize": "crop",
        "crop_pct": _crop_pct(crop, resize),
        "interpolation": interpolation if interpolation in _INTERPOLATIONS else "bilinear",
        "mean": tuple(float(v) for v in transforms.mean),
        "std": tuple(float(v) for v in transforms.std),
    }


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for a bool, a string, or an int too large for a float (10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _channel_stats(value: Any, name: str, where: str, std: bool = False) -> tuple[float, ...]:
    """A per-channel mean or std: 1 or 3 numbers (one stands for all channels), finite and in range."""
    values = value if isinstance(value, (list, tuple)) else [value]
    numbers = [_number(v) for v in values] if len(values) in (1, 3) else [None]
    low = 1e-6 if std else -_MAX_STAT
    if any(v is None or not low <= v <= _MAX_STAT for v in numbers):  # NaN fails every comparison
        raise WeightsError(f"{where}: {name} must be 1 or 3 finite numbers from {low:g} to {_MAX_STAT:g} "
                           f"(of pixels / 255), got {_show(value)}")
    return tuple(numbers * 3 if len(numbers) == 1 else numbers)


def _size(value: Any, name: str, where: str, plain: tuple[str, ...]) -> dict[str, int]:
    """An HF size: a number (standing for the `plain` keys), [height, width] or a dict; in pixels."""
    if value is None:
        return {}
    if _number(value) is not None:
        value = dict.fromkeys(plain, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2:  # as transformers' get_size_dict reads it
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict):
        raise WeightsError(f"{where}: {name} must be a number of pixels, [height, width] or a dict such as "
                           f'{{"shortest_edge": 224}}, got {_show(value)}')
    return {k: _pixels(v, f"{name}.{k}", where) for k, v in value.items()
            if k in ("height", "width", "shortest_edge", "longest_edge") and v is not None}


# Processors that read a plain number as the height and width (transformers' default_to_square); the
# others (CLIP, Bit for DINOv2, SigLIP, ConvNext, ...) read it as the shorter side.
_SQUARE_SIZE = re.compile(r"(ViT|DeiT|Beit|Data2VecVision)(ImageProcessor|FeatureExtractor)")


def _plain_size(proc: dict[str, Any]) -> tuple[str, ...]:
    """What a plain number as `size` stands for, as the processor class named in the config reads it."""
    kind = str(proc.get("image_processor_type") or proc.get("feature_extractor_type") or "")
    return ("height", "width") if _SQUARE_SIZE.fullmatch(kind.removesuffix("Fast").removesuffix("Pil")) else ("shortest_edge",)


def _squash_crop(size: dict[str, int], crop: dict[str, int]) -> bool:
    """Whether resizing to size's height x width then cropping the centre is `squash-crop` (one
    crop_pct for both sides) and not a plain squash to the crop size."""
    h, w, ch, cw = size.get("height"), size.get("width"), crop.get("height"), crop.get("width")
    if not (h and w and ch and cw) or (ch, cw) == (h, w) or ch > h or cw > w:
        return False
    pct = _crop_pct(ch, h)
    return int(cw / pct) == w


def _pixels(value: Any, name: str, where: str) -> int:
    number = _number(value)
    if number is None or not number.is_integer() or not 1 <= number <= _MAX_SIDE:
        raise WeightsError(f"{where}: {name} must be a whole number of pixels from 1 to {_MAX_SIDE}, "
                           f"got {_show(value)}")
    return int(number)


def _show(value: Any) -> str:
    text = "nothing" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _crop_pct(crop: int, resize: int) -> float:
    """crop / resize, nudged so that int(crop / crop_pct) is exactly `resize` (`images.decode`'s formula)."""
    pct = crop / resize
    while int(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return min(pct, 1.0)
