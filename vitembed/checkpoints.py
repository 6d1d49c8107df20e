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
embedding as timm does. Files are read by `weightfiles.py`; named weights are `pretrained.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import LayerConfig, nearest_valid_sizes
from .errors import ConfigError, WeightsError
from .weightfiles import LazyTensors, LoadedWeights, read_state_dict

__all__ = [
    "FAMILIES",
    "KeyFamily",
    "WEIGHT_FILES",
    "convert_state_dict",
    "find_input_layer",
    "folder_preprocess",
    "hf_preprocess",
    "load_folder",
    "read_json",
    "read_weight_file",
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
    def get(name: str) -> torch.Tensor | None:
        return state[prefix + name] if prefix + name in state else None

    bad = functools.partial(_bad_shape, where, prefix)

    weight = get(family.proj_weight)
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise bad(family.proj_weight, weight, "(D, C, P, P), a convolution over square patches")
    d, c, p = weight.shape[0], weight.shape[1], weight.shape[2]
    if prefix + "patch_embed.norm.weight" in state:
        raise WeightsError(f"{where}: its patch embedding ends in a norm layer ({prefix}patch_embed.norm), "
                           "which the ViT input layer does not have")
    bias = get(family.proj_bias)
    if bias is None:
        bias = torch.zeros(d, dtype=weight.dtype)  # timm's bias=False models (CLIP-style): exactly no bias
    elif tuple(bias.shape) != (d,):
        raise bad(family.proj_bias, bias, f"({d},) for D = {d} from {prefix + family.proj_weight}")

    cls = get(family.cls)
    if cls is not None and tuple(cls.shape) != (1, 1, d):
        raise bad(family.cls, cls, f"(1, 1, {d})")
    extra_name = next((n for n in family.extra if get(n) is not None), None)
    extra = get(extra_name) if extra_name else None
    if extra is not None and (extra.ndim != 3 or extra.shape[0] != 1 or extra.shape[2] != d):
        raise bad(extra_name, extra, f"(1, R, {d})")

    pos = get(family.pos)
    if pos.ndim == 2:
        pos = pos[None]  # (rows, D) -> (1, rows, D)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
        raise bad(family.pos, pos, f"(1, rows, {d}) for D = {d} from {prefix + family.proj_weight}")
    num_prefix = int(cls is not None) + (extra.shape[1] if extra is not None else 0)
    rows = pos.shape[1]
    grid, pos_embed_prefix = _grid(rows, num_prefix)
    if grid is None:
        raise bad(family.pos, pos, f"N + {num_prefix} or N rows with N a square number of patches "
                                   f"({num_prefix} prefix token(s))")

    config = LayerConfig(
        image_size=grid * p, patch_size=p, emb_dim=d, in_channels=c, class_token=cls is not None,
        num_reg_tokens=extra.shape[1] if extra is not None else 0, pos_embed_prefix=pos_embed_prefix,
    )
    tensors = {"patch_emb_layer.weight": weight, "patch_emb_layer.bias": bias, "pos_emb": pos}
    if cls is not None:
        tensors["cls_token"] = cls
    if extra is not None:
        tensors["reg_token"] = extra
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    source = family.source + (f" (under {prefix[:-1]!r})" if prefix else "")
    return LoadedWeights(config, tensors, source=source)


def _bad_shape(where: str, prefix: str, name: str, t: torch.Tensor, expected: str) -> WeightsError:
    return WeightsError(f"{where}: {prefix + name} has shape {tuple(t.shape)}; expected {expected}")


def _grid(rows: int, num_prefix: int) -> tuple[int | None, bool]:
    """Patches per side, and whether the table has rows for the prefix tokens."""
    for with_prefix, n in ((True, rows - num_prefix), (False, rows)):
        side = math.isqrt(n) if n > 0 else 0
        if side and side * side == n and (with_prefix or num_prefix):
            return side, with_prefix
    return None, True


# --------------------------------------------------------------------------- resolution


def resample_pos_embed(pos: torch.Tensor, new_grid: int, old_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Resize a square position table as timm's `resample_abs_pos_embed` does.

    Bicubic, antialias=True, align_corners=False, computed in float32 and cast back; the first
    `num_prefix_tokens` rows (class, register tokens) are kept as they are.

    Args:
        pos: (1, prefix + old_grid^2, D).

    Returns:
        (1, prefix + new_grid^2, D).
    """
    prefix, patches = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    d = pos.shape[-1]
    x = patches.float().reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2)  # (1, N, D) -> (1, D, h, w)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d)  # (1, D, h', w') -> (1, N', D)
    return torch.cat([prefix, x.to(pos.dtype)], dim=1)  # (1, prefix + N', D)


def resize_weights(loaded: LoadedWeights, image_size: int) -> LoadedWeights:
    """The same weights for another image size: the position embedding resampled to the new grid.

    Raises:
        ConfigError: `image_size` is not a multiple of the checkpoint's patch size.
    """
    cfg = loaded.config
    if image_size == cfg.image_size:
        return loaded
    if image_size < 1 or image_size % cfg.patch_size:
        lower, upper = nearest_valid_sizes(max(image_size, 1), cfg.patch_size)
        hint = f"--image-size {lower} or {upper}" if lower else f"--image-size {upper}"
        raise ConfigError(f"image size ({image_size}) is not a multiple of the weights' patch size "
                          f"({cfg.patch_size}); pass {hint}")
    new_cfg = dataclasses.replace(cfg, image_size=image_size)
    num_prefix = cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0
    state = dict(loaded.state_dict)
    state["pos_emb"] = resample_pos_embed(state["pos_emb"], new_cfg.num_patch_row, cfg.num_patch_row, num_prefix)
    note = (f"resampled the position embedding from {cfg.num_patch_row}x{cfg.num_patch_row} to "
            f"{new_cfg.num_patch_row}x{new_cfg.num_patch_row} patches (bicubic, as timm's resample_abs_pos_embed) "
            f"for --image-size {image_size}")
    return dataclasses.replace(loaded, config=new_cfg, state_dict=state, notes=[*loaded.notes, note])


# --------------------------------------------------------------------------- folders


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "open_clip_model.safetensors")


def load_folder(path: Path) -> LoadedWeights:
    """A `save_pretrained` folder (transformers or timm): weights, sharded or not, plus its preprocessing."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            state = read_weight_file(path / name)
            break
    else:
        raise WeightsError(f"{path}: a folder without weights; expected one of {', '.join(WEIGHT_FILES)}")
    loaded = convert_state_dict(state, str(path))
    loaded.preprocess = folder_preprocess(path)
    return loaded


def read_weight_file(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.name.endswith(".index.json"):
        return read_state_dict(path)[0]
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: not a shard index with a 'weight_map': {exc}") from None
    return LazyTensors({k: path.parent / v for k, v in weight_map.items()})


def folder_preprocess(path: Path) -> dict[str, Any]:
    proc = read_json(path / "preprocessor_config.json")
    if proc:
        return hf_preprocess(proc)
    config = read_json(path / "config.json")
    if isinstance(config.get("pretrained_cfg"), dict):  # a timm folder (push_to_hf_hub / save_for_hf)
        return timm_preprocess(config["pretrained_cfg"])
    return {}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- preprocessing


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def hf_preprocess(proc: dict[str, Any]) -> dict[str, Any]:
    """An HF image processor config (ViTImageProcessor and kin) -> `images.Preprocess` fields."""
    out: dict[str, Any] = {}
    resample = proc.get("resample")
    if isinstance(resample, int):
        out["interpolation"] = _PIL_RESAMPLE.get(resample, "bilinear")
    size = proc.get("size") or {}
    crop = proc.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if proc.get("do_center_crop") and crop.get("height") and size.get("shortest_edge"):
        out["resize"] = "crop"
        out["crop_pct"] = _crop_pct(int(crop["height"]), int(size["shortest_edge"]))
    elif proc.get("do_resize", True):
        out["resize"] = "squash"
    if proc.get("do_normalize", True) and proc.get("image_mean") is not None:
        out["mean"] = tuple(float(v) for v in proc["image_mean"])
        out["std"] = tuple(float(v) for v in proc["image_std"])
    elif not proc.get("do_normalize", True):
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def timm_preprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    """A timm pretrained cfg -> `images.Preprocess` fields (timm: Resize(floor(S / crop_pct)) + CenterCrop)."""
    out: dict[str, Any] = {}
    if cfg.get("interpolation") in _INTERPOLATIONS:
        out["interpolation"] = cfg["interpolation"]
    out["resize"] = "squash" if cfg.get("crop_mode") == "squash" else "crop"
    if cfg.get("crop_pct"):
        out["crop_pct"] = float(cfg["crop_pct"])
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        out["mean"] = tuple(float(v) for v in cfg["mean"])
        out["std"] = tuple(float(v) for v in cfg["std"])
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


def _crop_pct(crop: int, resize: int) -> float:
    """crop / resize, nudged so that int(crop / crop_pct) is exactly `resize` (images.py's formula)."""
    pct = crop / resize
    while int(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return min(pct, 1.0)
