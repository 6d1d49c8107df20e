"""Other libraries' Vision Transformer checkpoints -> vitembed's input layer: layouts, folders,
preprocessing configs and resolution.

A ViT's input layer is the same four tensors in every library, under different names:

    library       patch embedding (conv)                  class token        position embedding
    seed/vitembed patch_emb_layer.{weight,bias}           cls_token          pos_emb
    timm          patch_embed.proj.{weight,bias}          cls_token          pos_embed
    torchvision   conv_proj.{weight,bias}                 class_token        encoder.pos_embedding
    transformers  embeddings.patch_embeddings.projection  embeddings.cls_token  embeddings.position_embeddings

Each may sit under a prefix (`vit.`, `module.`, `input_layer.`, ...). The family is found from the
key names, the layer shape (P, C, D, grid, prefix tokens) from the tensors' shapes. timm's register
tokens (`reg_token`) and DeiT's distillation token come right after the class token, as in timm's
`_pos_embed`; `no_embed_class` models are recognised by a position table without prefix rows.

A `save_pretrained` folder (transformers or timm) is read with its preprocessing config
(`preprocessor_config.json`, timm's `pretrained_cfg`); `--image-size` resamples the position
embedding as timm (or transformers) does, `--patch-size` the patch embedding as FlexiViT does. Files are read by `weightfiles.py`; named weights are `pretrained.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LayerConfig, check_divisible, format_size, parse_image_size
from .errors import ConfigError, WeightsError
from .resolution import resample_patch_embed, resample_pos
from .weightfiles import (
    MAX_LAYER_VALUES,
    LazyTensors,
    LoadedWeights,
    check_size,
    check_storage,
    read_json,
    read_weight_file,
    shape_of,
)

__all__ = [
    "FAMILIES",
    "KeyFamily",
    "WEIGHT_FILES",
    "convert_state_dict",
    "find_input_layer",
    "folder_preprocess",
    "hf_preprocess",
    "load_folder",
    "resample_pos_embed",
    "resize_weights",
    "timm_preprocess",
    "torchvision_preprocess",
]


@dataclass(frozen=True)
class KeyFamily:
    """Where one library keeps the input layer's tensors, relative to the model's prefix.

    Attributes:
        source: the library and class, as shown to the user.
        proj_weight, proj_bias: the patch embedding convolution, weight (D, C, P, P) and bias (D,).
        pos: the position embedding, (1, rows, D).
        cls: the class token, (1, 1, D); absent in class-token-free models.
        extra: tokens that follow the class token, first match wins (timm's register tokens,
            DeiT's distillation token), (1, R, D).
    """

    source: str
    proj_weight: str
    proj_bias: str
    pos: str
    cls: str
    extra: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        return (self.proj_weight, self.proj_bias, self.cls, self.pos, *self.extra)


FAMILIES: tuple[KeyFamily, ...] = (
    KeyFamily("seed VitInputLayer", "patch_emb_layer.weight", "patch_emb_layer.bias", "pos_emb", "cls_token",
              ("reg_token",)),
    KeyFamily("timm VisionTransformer", "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token",
              ("reg_token", "dist_token")),
    KeyFamily("torchvision VisionTransformer", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding",
              "class_token"),
    KeyFamily("transformers ViT", "embeddings.patch_embeddings.projection.weight",
              "embeddings.patch_embeddings.projection.bias", "embeddings.position_embeddings", "embeddings.cls_token",
              ("embeddings.distillation_token",)),
)


# --------------------------------------------------------------------------- state dicts


def find_input_layer(keys: list[str]) -> list[tuple[KeyFamily, str]]:
    """Every (family, prefix) whose patch embedding weight and position embedding are both present."""
    present = set(keys)
    found = []
    for family in FAMILIES:
        anchor = family.proj_weight
        for key in keys:
            if key == anchor or key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                if prefix + family.pos in present:
                    found.append((family, prefix))
    return found


def convert_state_dict(state: Mapping[str, torch.Tensor], where: str) -> LoadedWeights:
    """Recognise a checkpoint's input layer and rename it to vitembed's parameters.

    Args:
        state: tensors by name (a whole model or just its input layer); read lazily where possible.
        where: the file or name, for messages.

    Raises:
        WeightsError: no known input layer, more than one, or tensors of the wrong shape.
    """
    keys = list(state.keys())
    found = find_input_layer(keys)
    if not found:
        looked = "; ".join(f"{f.source} ({f.proj_weight}, {f.pos})" for f in FAMILIES)
        sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise WeightsError(
            f"{where}: no ViT input layer recognised; looked for {looked}, optionally under a prefix; "
            f"found {len(keys)} keys: {sample or 'none'}"
        )
    if len(found) > 1:
        which = ", ".join(f"{f.source} under {p or '(no prefix)'!r}" for f, p in found)
        raise WeightsError(f"{where}: holds more than one ViT input layer ({which}); save the one you want alone")
    family, prefix = found[0]
    return _convert(state, family, prefix, where)


def _convert(state: Mapping[str, torch.Tensor], family: KeyFamily, prefix: str, where: str) -> LoadedWeights:
    if prefix + "patch_embed.norm.weight" in state:
        raise WeightsError(f"{where}: its patch embedding ends in a norm layer ({prefix}patch_embed.norm), "
                           "which the ViT input layer does not have")
    config, keys = _config_from_shapes(state, family, prefix, where)
    # Nothing is copied before every check has passed: torch.load's tensors cost nothing to check
    # (memory-mapped), a safetensors file's are read only once the layer's size is known to be sane.
    for key in keys.values() if not isinstance(state, LazyTensors) else ():
        check_storage(state[key], key, where)
    check_size(config, where)
    tensors = {}
    for ours, key in keys.items():
        tensor = state[key]
        check_storage(tensor, key, where)
        tensors[ours] = tensor.detach().to("cpu").contiguous()
    if tensors["pos_emb"].ndim == 2:
        tensors["pos_emb"] = tensors["pos_emb"][None]  # (rows, D) -> (1, rows, D)
    if "patch_emb_layer.bias" not in tensors:  # timm's bias=False models (CLIP-style): exactly no bias
        tensors["patch_emb_layer.bias"] = torch.zeros(config.emb_dim, dtype=tensors["patch_emb_layer.weight"].dtype)
    source = family.source + (f" (under {prefix[:-1]!r})" if prefix else "")
    return LoadedWeights(config, tensors, source=source)


def _config_from_shapes(state: Mapping[str, torch.Tensor], family: KeyFamily, prefix: str,
                        where: str) -> tuple[LayerConfig, dict[str, str]]:
    """The layer's shape from the tensors' shapes alone (no tensor read), and vitembed's name -> key."""

    def shape(name: str | None) -> tuple[int, ...] | None:
        return shape_of(state, prefix + name) if name and prefix + name in state else None

    def bad(name: str, actual: tuple[int, ...], expected: str) -> WeightsError:
        return WeightsError(f"{where}: {prefix + name} has shape {actual}; expected {expected}")

    weight = shape(family.proj_weight)
    if len(weight) != 4 or weight[2] != weight[3]:
        raise bad(family.proj_weight, weight, "(D, C, P, P), a convolution over square patches")
    d, c, p = weight[:3]
    bias = shape(family.proj_bias)
    if bias is not None and bias != (d,):
        raise bad(family.proj_bias, bias, f"({d},) for D = {d} from {prefix + family.proj_weight}")
    cls = shape(family.cls)
    if cls is not None and cls != (1, 1, d):
        raise bad(family.cls, cls, f"(1, 1, {d})")
    extra_name = next((n for n in family.extra if prefix + n in state), None)
    extra = shape(extra_name)
    if extra is not None and (len(extra) != 3 or extra[0] != 1 or extra[2] != d):
        raise bad(extra_name, extra, f"(1, R, {d})")
    pos = shape(family.pos)
    pos = (1, *pos) if len(pos) == 2 else pos  # (rows, D) -> (1, rows, D)
    if len(pos) != 3 or pos[0] != 1 or pos[2] != d:
        raise bad(family.pos, pos, f"(1, rows, {d}) for D = {d} from {prefix + family.proj_weight}")
    num_prefix = int(cls is not None) + (extra[1] if extra is not None else 0)
    grid, pos_embed_prefix = _grid(pos[1], num_prefix)
    if grid is None:
        raise bad(family.pos, pos, f"N + {num_prefix} or N rows with N a square number of patches "
                                   f"({num_prefix} prefix token(s))")
    try:
        config = LayerConfig(image_size=grid * p, patch_size=p, emb_dim=d, in_channels=c, class_token=cls is not None,
                             num_reg_tokens=extra[1] if extra is not None else 0, pos_embed_prefix=pos_embed_prefix)
    except ConfigError as exc:  # a dimension of 0
        raise WeightsError(f"{where}: {prefix + family.proj_weight} has shape {weight}: {exc}") from None
    names = {"patch_emb_layer.weight": family.proj_weight, "patch_emb_layer.bias": family.proj_bias if bias is not None else None,
             "cls_token": family.cls if cls is not None else None, "reg_token": extra_name, "pos_emb": family.pos}
    return config, {ours: prefix + theirs for ours, theirs in names.items() if theirs}


def _grid(rows: int, num_prefix: int) -> tuple[int | None, bool]:
    """Patches per side, and whether the table has rows for the prefix tokens."""
    for with_prefix, n in ((True, rows - num_prefix), (False, rows)):
        side = math.isqrt(n) if n > 0 else 0
        if side and side * side == n and (with_prefix or num_prefix):
            return side, with_prefix
    return None, True


# --------------------------------------------------------------------------- resolution


def resample_pos_embed(pos: torch.Tensor, new_grid, old_grid, num_prefix_tokens: int,
                       method: str = "timm") -> torch.Tensor:
    """A position table for another patch grid, as timm's `resample_abs_pos_embed` ("timm":
    bicubic, antialiased) or transformers' `interpolate_pos_encoding` ("hf": bicubic) resamples
    it (`resolution.resample_pos`, in float64, cast back); the first `num_prefix_tokens` rows
    (class, register tokens) are kept as they are.

    Args:
        pos: (1, prefix + gh gw, D).
        new_grid, old_grid: (rows, columns), or one side for a square grid.

    Returns:
        (1, prefix + rows x columns, D), in pos's dtype.
    """
    old, new = (tuple(g) if isinstance(g, (tuple, list)) else (g, g) for g in (old_grid, new_grid))
    table = resample_pos(pos[0].float().numpy(), old, new, num_prefix_tokens, method)  # (prefix + N', D)
    return torch.from_numpy(table)[None].to(pos.dtype)  # (rows, D) -> (1, rows, D)


_HOW = {"timm": "bicubic, antialiased, as timm's resample_abs_pos_embed",
        "hf": "bicubic, as transformers' interpolate_pos_encoding"}


def resize_weights(loaded: LoadedWeights, size=None, patch_size: int | None = None,
                   method: str = "timm") -> LoadedWeights:
    """The same weights for another image size (H, W) and patch size: E resampled for the patch
    size (FlexiViT's pseudo-inverse resize, as timm's `resample_patch_embed`), the position
    embedding for the new grid (`resample_pos_embed`); each change told in a note.

    Args:
        size: (H, W), "HxW" or a side; None keeps the weights' image size.
        patch_size: None keeps the weights' patch size.

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
    if new_cfg.grid != cfg.grid:
        state["pos_emb"] = resample_pos_embed(state["pos_emb"], new_cfg.grid, cfg.grid, cfg.num_pos_prefix, method)
        why = f"--image-size {format_size(new_cfg.size)}" if new_cfg.size != cfg.size else f"--patch-size {p}"
        notes.append(f"resampled the position embedding from {cfg.grid[0]}x{cfg.grid[1]} to "
                     f"{new_cfg.grid[0]}x{new_cfg.grid[1]} patches ({_HOW[method]}) for {why}")
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
    loaded = convert_state_dict(state, str(path))
    loaded.preprocess = folder_preprocess(path)
    return loaded


def folder_preprocess(path: Path) -> dict[str, Any]:
    """The preprocessing a weights folder comes with: its HF processor's, or timm's pretrained cfg's."""
    proc = read_json(path / "preprocessor_config.json")
    if proc:
        return hf_preprocess(proc, str(path / "preprocessor_config.json"))
    config = read_json(path / "config.json")
    if isinstance(config.get("pretrained_cfg"), dict):  # a timm folder (push_to_hf_hub / save_for_hf)
        return timm_preprocess(config["pretrained_cfg"], str(path / "config.json"))
    return {}


# --------------------------------------------------------------------------- preprocessing


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_MAX_SIDE = 1 << 16  # pixels on a side in a processor config; far beyond any ViT's input
_MAX_STAT = 1e4  # |mean|, std: they are of pixels / 255 (0..1); far beyond, a config is broken


def hf_preprocess(proc: dict[str, Any], where: str = "preprocessor_config.json") -> dict[str, Any]:
    """An HF image processor config (ViTImageProcessor and kin) -> `images.Preprocess` fields.

    Raises:
        WeightsError: a size that is not a number of pixels, a mean or std that is not 1 or 3
            finite numbers (std > 0), naming `where` and the field.
    """
    out: dict[str, Any] = {}
    resample = proc.get("resample")
    if isinstance(resample, int):
        out["interpolation"] = _PIL_RESAMPLE.get(resample, "bilinear")
    size = _size(proc.get("size"), "size", where, ("shortest_edge",))
    crop = _size(proc.get("crop_size"), "crop_size", where, ("height", "width"))
    if proc.get("do_center_crop") and crop.get("height") and size.get("shortest_edge"):
        out["resize"] = "crop"
        out["crop_pct"] = _crop_pct(crop["height"], size["shortest_edge"])
    elif proc.get("do_resize", True):
        out["resize"] = "squash"
    if proc.get("do_normalize", True) and proc.get("image_mean") is not None:
        out["mean"] = _channel_stats(proc["image_mean"], "image_mean", where)
        out["std"] = _channel_stats(proc.get("image_std"), "image_std", where, std=True)
    elif not proc.get("do_normalize", True):
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def timm_preprocess(cfg: dict[str, Any], where: str = "timm pretrained_cfg") -> dict[str, Any]:
    """A timm pretrained cfg -> `images.Preprocess` fields (timm: Resize(floor(S / crop_pct)) + CenterCrop).

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
    """crop / resize, nudged so that int(crop / crop_pct) is exactly `resize` (images.py's formula)."""
    pct = crop / resize
    while int(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return min(pct, 1.0)
