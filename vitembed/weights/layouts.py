"""Model families: where each library keeps a ViT's input layer, and how it is read into vitembed's.

Every ViT's input layer is a patch embedding (a P x P convolution), prefix tokens, positions and,
in some families, a LayerNorm over the tokens before the first block. z0 is always what the first
transformer block receives, in eval mode: transformers' `hidden_states[0]`, timm's
`norm_pre(_pos_embed(patch_embed(x)))`, OpenAI CLIP's `ln_pre(cat(class, conv1(x)) + pos)`.

    family (layout)             patch embedding               prefix tokens           positions        pre-norm
    ViT book / vitembed         patch_emb_layer               cls, dist, reg          pos_emb          norm_pre
    timm ViT, Eva, Beit, DeiT   patch_embed.proj              cls, dist, reg          pos_embed / none norm_pre
    DINOv2 (its repository)     patch_embed.proj              cls, register_tokens    pos_embed (cls)  -
    DINOv3 (its repository)     patch_embed.proj              cls, storage_tokens     RoPE             -
    torchvision ViT             conv_proj                     class_token             encoder.pos_embedding
    transformers ViT, DeiT,     embeddings.patch_embeddings   cls, distillation,      position_embeddings,
      ViTMAE, BEiT, Dinov2(+reg)  .projection                 register_tokens         none (BEiT: relative)
    transformers DINOv3ViT      embeddings.patch_embeddings   cls, register_tokens    RoPE             -
    transformers CLIP, SigLIP   embeddings.patch_embedding    class_embedding (CLIP)  position_embedding pre_layrnorm
    OpenAI CLIP, open_clip      conv1                         class_embedding         positional_embedding ln_pre

Each may sit under a prefix (`vision_model.`, `visual.`, `model.`, `module.`, a full CLIP or SigLIP
model's vision tower, ...). A layout is recognised by its keys; the layer's shape (P, C, D, grid,
prefix tokens) comes from the tensors' shapes. Registers that DINOv2 inserts after adding E_pos
(its repository's and transformers' Dinov2WithRegisters) take no position: the class token's
position row is folded into the class token, and the table then covers the patches only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..layer.config import LayerConfig
from ..errors import ConfigError, WeightsError
from .files import LazyTensors, LoadedWeights, check_size, check_storage, shape_of

__all__ = ["LAYOUTS", "Layout", "convert_state_dict", "find_input_layer", "resample_how"]


@dataclass(frozen=True)
class Layout:
    """Where one library keeps the input layer's tensors, relative to the model's prefix.

    Attributes:
        source: the library and class, as shown to the user.
        proj_weight, proj_bias: the patch embedding convolution, weight (D, C, P, P) and bias (D,).
        cls, dist, reg: the class token ((1, 1, D) or (D,)), the distillation token (1, 1, D) and
            the register tokens (1, R, D), each where the layout has one.
        pos: the position table, (1, rows, D) or (rows, D).
        norm: the pre-norm (a LayerNorm: NORM.weight, NORM.bias), where the layout has one.
        pos_optional: a checkpoint may have no table (positions applied inside attention).
        regs_after_pos: the registers are inserted after E_pos is added, so that they take none.
        resample: how the library resamples E_pos for another grid (a `--pos-resample` method).
        attn_positions: what the family uses inside attention where it has no table.
        markers: keys of which one must be present for the layout to be this family's.
        absent: keys that must not be present.
    """

    source: str
    proj_weight: str
    proj_bias: str | None = None
    cls: str | None = None
    dist: str | None = None
    reg: str | None = None
    pos: str | None = None
    norm: str | None = None
    pos_optional: bool = False
    regs_after_pos: bool = False
    resample: str = "timm"
    attn_positions: str | None = None
    markers: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        norm = (f"{self.norm}.weight", f"{self.norm}.bias") if self.norm else ()
        return tuple(k for k in (self.proj_weight, self.proj_bias, self.cls, self.dist, self.reg, self.pos, *norm) if k)

    def fits(self, present: set[str], prefix: str) -> bool:
        """Whether a checkpoint's keys under `prefix` are this layout's."""
        return ((not self.markers or any(prefix + m in present for m in self.markers))
                and not any(prefix + a in present for a in self.absent)
                and (self.pos is None or self.pos_optional or prefix + self.pos in present))


_HF = "embeddings.patch_embeddings.projection"
# BEiT's relative position bias, shared or per block: under the names save_pretrained writes and under
# the names transformers' modules hold in memory (a `model.state_dict()` saved with torch.save).
_HF_RELATIVE = ("encoder.relative_position_bias.relative_position_bias_table",
                "encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table",
                "shared_position_bias.relative_position_bias_table",
                "layers.0.relative_position_bias.relative_position_bias_table")
_HF_VIT = dict(proj_weight=f"{_HF}.weight", proj_bias=f"{_HF}.bias", cls="embeddings.cls_token",
               pos="embeddings.position_embeddings", resample="hf")
_TIMM = dict(proj_weight="patch_embed.proj.weight", proj_bias="patch_embed.proj.bias", cls="cls_token")
_HF_CLIP = dict(proj_weight="embeddings.patch_embedding.weight", proj_bias="embeddings.patch_embedding.bias",
                pos="embeddings.position_embedding.weight", resample="hf")

# For one patch embedding, the first layout that fits is taken: the specific before the general.
LAYOUTS: tuple[Layout, ...] = (
    Layout("ViT book VitInputLayer", "patch_emb_layer.weight", "patch_emb_layer.bias", "cls_token", "dist_token",
           "reg_token", "pos_emb", "norm_pre", pos_optional=True),
    Layout("DINOv3 (facebookresearch/dinov3)", **_TIMM, reg="storage_tokens", attn_positions="rope",
           markers=("storage_tokens", "rope_embed.periods"), absent=("pos_embed",)),
    Layout("DINOv2 (facebookresearch/dinov2)", **_TIMM, reg="register_tokens", pos="pos_embed",
           regs_after_pos=True, resample="dinov2", markers=("mask_token",)),
    Layout("timm VisionTransformer", **_TIMM, dist="dist_token", reg="reg_token", pos="pos_embed", norm="norm_pre",
           pos_optional=True),
    Layout("torchvision VisionTransformer", "conv_proj.weight", "conv_proj.bias", "class_token",
           pos="encoder.pos_embedding", resample="torchvision"),
    Layout("transformers Dinov2WithRegistersModel", **{**_HF_VIT, "resample": "timm"},
           reg="embeddings.register_tokens", regs_after_pos=True, markers=("embeddings.register_tokens",)),
    Layout("transformers Dinov2Model", **_HF_VIT, markers=("encoder.layer.0.layer_scale1.lambda1",)),
    Layout("transformers BeitModel", **_HF_VIT, pos_optional=True, attn_positions="relative", markers=_HF_RELATIVE),
    Layout("transformers DeiTModel", **_HF_VIT, dist="embeddings.distillation_token",
           markers=("embeddings.distillation_token",)),
    Layout("transformers ViTModel (ViT, ViTMAE)", **_HF_VIT),
    Layout("transformers DINOv3ViTModel", "embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.bias",
           "embeddings.cls_token", reg="embeddings.register_tokens", attn_positions="rope",
           markers=("embeddings.register_tokens",)),
    Layout("transformers CLIPVisionModel", **_HF_CLIP, cls="embeddings.class_embedding", norm="pre_layrnorm",
           markers=("embeddings.class_embedding",)),
    Layout("transformers SiglipVisionModel", **_HF_CLIP, absent=("embeddings.class_embedding",)),
    Layout("OpenAI CLIP / open_clip VisionTransformer", "conv1.weight", None, "class_embedding",
           pos="positional_embedding", norm="ln_pre", markers=("class_embedding",)),
)

# How each method resamples, and whose it is: the layouts' defaults name their library's own.
_RESAMPLE_HOW = {
    "timm": "bicubic, antialiased",
    "hf": "bicubic, not antialiased",
    "torchvision": "bicubic, align_corners=True",
    "dinov2": "bicubic with DINOv2's scale factor (grid + 0.1) / old grid",
}
_RESAMPLE_WHOSE = {
    "timm VisionTransformer": "timm's resample_abs_pos_embed",
    "ViT book VitInputLayer": "timm's resample_abs_pos_embed",
    "DINOv2 (facebookresearch/dinov2)": "DINOv2's interpolate_pos_encoding",
    "torchvision VisionTransformer": "torchvision's interpolate_embeddings",
    "OpenAI CLIP / open_clip VisionTransformer": "open_clip's resize_pos_embed",
}


def resample_how(method: str, source: str | None = None, own: str | None = None) -> str:
    """'bicubic, antialiased, as timm's resample_abs_pos_embed': a method, and whose it is (the
    family's in `source` where `method` is that family's own, `own`)."""
    import re

    whose = None
    if source and method == own:
        whose = next((w for s, w in _RESAMPLE_WHOSE.items() if s in source), None)
        found = re.search(r"transformers (\w+)", source)
        if whose is None and found:
            whose = f"transformers' {found.group(1)}.interpolate_pos_encoding"
    if whose is None:
        whose = {"timm": "timm's resample_abs_pos_embed", "hf": "transformers' ViT interpolate_pos_encoding",
                 "torchvision": "torchvision's interpolate_embeddings",
                 "dinov2": "DINOv2's interpolate_pos_encoding"}.get(method, method)
    return f"{_RESAMPLE_HOW.get(method, method)}, as {whose}"


# --------------------------------------------------------------------------- recognising


def find_input_layer(keys: list[str]) -> list[tuple[Layout, str]]:
    """Every (layout, prefix) found: for each patch embedding, the first layout that fits its keys."""
    present = set(keys)
    found: dict[tuple[str, str], Layout] = {}
    for layout in LAYOUTS:
        anchor = layout.proj_weight
        for key in keys:
            if key == anchor or key.endswith("." + anchor):
                prefix = key[: len(key) - len(anchor)]
                if (anchor, prefix) not in found and layout.fits(present, prefix):
                    found[(anchor, prefix)] = layout
    return [(layout, prefix) for (_, prefix), layout in found.items()]


def convert_state_dict(state: Mapping[str, torch.Tensor], where: str,
                       hints: dict[str, Any] | None = None) -> LoadedWeights:
    """Recognise a checkpoint's input layer and rename it to vitembed's parameters.

    Args:
        state: tensors by name (a whole model or just its input layer); read lazily where possible.
        where: the file or name, for messages.
        hints: what a folder's config.json says (`model_type`, `layer_norm_eps`, `image_size`), where known.

    Raises:
        WeightsError: no known input layer, more than one, a family whose input layer is not one
            convolution (a hybrid, a linear or normalised patch embedding), or tensors of the wrong shape.
    """
    keys = list(state.keys())
    hints = hints or {}
    if str(hints.get("model_type", "")).startswith("siglip2"):
        raise WeightsError(_naflex(where))
    found = find_input_layer(keys)
    if not found:
        raise WeightsError(_not_found(keys, where))
    if len(found) > 1:
        which = ", ".join(f"{f.source} under {p or '(no prefix)'!r}" for f, p in found)
        raise WeightsError(f"{where}: holds more than one ViT input layer ({which}); save the one you want alone")
    layout, prefix = found[0]
    return _convert(state, layout, prefix, where, hints)


_SUPPORTED = ("timm (ViT, DeiT, Eva, Beit, DINOv2/v3, CLIP, SigLIP), transformers (ViT, DeiT, ViTMAE, BEiT, Dinov2, "
              "Dinov2WithRegisters, DINOv3ViT, CLIP, SigLIP), torchvision ViT, OpenAI CLIP / open_clip, and the "
              "DINOv2 and DINOv3 repositories' own state dicts")


def _not_found(keys: list[str], where: str) -> str:
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    if any(k.endswith(("embeddings.patch_embedding.weight", "patch_embed.proj.weight", "conv1.weight",
                       "embeddings.patch_embeddings.projection.weight")) for k in keys):
        why = "a patch embedding found, but not the class or position tensors its family's layout needs"
    else:
        why = "no ViT input layer recognised"
    anchors = ", ".join(dict.fromkeys(layout.proj_weight for layout in LAYOUTS))
    return (f"{where}: {why}; vitembed reads {_SUPPORTED} (a patch embedding {anchors}, optionally under a "
            f"prefix); found {len(keys)} keys: {sample or 'none'}")


def _naflex(where: str) -> str:
    return (f"{where}: a SigLIP2 NaFlex model: its patch embedding is a Linear layer over flattened patches and its "
            "position table is resampled per image (bilinear, antialiased) to a grid of its own rule, which "
            "vitembed's layer and --resize native do not compute; use a fixed-resolution SigLIP or SigLIP2 "
            "checkpoint (Conv2d patch embedding, e.g. google/siglip2-base-patch16-224)")


def _refuse_other_families(state: Mapping, layout: Layout, prefix: str, where: str) -> None:
    """Families whose patch embedding is not one convolution, or whose class token comes later."""
    stem = prefix + layout.proj_weight.rsplit(".", 2)[0] + "."  # patch_embed. / embeddings.patch_embeddings.
    if any(k.startswith(stem + "backbone.") for k in state.keys()):
        raise WeightsError(f"{where}: a hybrid ViT: its patch embedding runs a CNN stem ({stem}backbone) before the "
                           "projection, and vitembed's input layer is one P x P convolution of the pixels; "
                           f"vitembed reads plain ViTs: {_SUPPORTED}")
    if prefix + "patch_embed.norm.weight" in state:
        raise WeightsError(f"{where}: its patch embedding ends in a norm layer ({prefix}patch_embed.norm), "
                           f"which the ViT input layer does not have; vitembed reads {_SUPPORTED}")
    if any(k.startswith(prefix + "blocks_token_only.") for k in state.keys()):
        raise WeightsError(f"{where}: a CaiT model: its class token joins after the patch blocks, so the first block "
                           "receives no class token; vitembed's z0 would not be what that block receives; "
                           f"vitembed reads {_SUPPORTED}")


def _convert(state: Mapping[str, torch.Tensor], layout: Layout, prefix: str, where: str,
             hints: dict[str, Any]) -> LoadedWeights:
    _refuse_other_families(state, layout, prefix, where)
    config, keys = _config_from_shapes(state, layout, prefix, where, hints)
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
    d = config.emb_dim
    for name in ("pos_emb", "cls_token"):  # (rows, D) or (D,) -> (1, rows, D)
        if name in tensors:
            tensors[name] = tensors[name].reshape(1, -1, d)
    if config.pre_norm_eps is not None and "norm_pre.bias" not in tensors:  # LayerNorm(bias=False)
        tensors["norm_pre.bias"] = torch.zeros(d, dtype=tensors["norm_pre.weight"].dtype)
    notes = []
    if layout.regs_after_pos and config.pos_table and config.pos_embed_prefix and config.num_reg_tokens:
        config, tensors = _fold_class_position(config, tensors)
        notes.append("the class token's position row is added to it once (the registers take none, as "
                     f"{layout.source} inserts them after adding E_pos); E_pos then covers the patches")
    source = _label(layout, hints, state.keys(), prefix) + (f" (under {prefix[:-1]!r})" if prefix else "")
    return LoadedWeights(config, tensors, source=source, notes=notes, pos_resample=layout.resample)


def _label(layout: Layout, hints: dict[str, Any], keys, prefix: str) -> str:
    """The class a checkpoint is, for `info`: the layout's, or one its keys single out among those
    sharing a layout (timm's ViT, DeiT, Beit and Eva keep their input layers under the same names;
    transformers' ViT and ViTMAE too, told apart by config.json's model type)."""
    if layout.source.startswith("transformers ViTModel"):
        named = {"vit": "transformers ViTModel", "vit_mae": "transformers ViTMAEModel"}
        return named.get(hints.get("model_type"), layout.source)
    if layout.source == "timm VisionTransformer":
        keys = [k for k in keys if k.startswith(prefix)]
        if prefix + "dist_token" in keys:
            return "timm VisionTransformerDistilled (DeiT)"
        if any("relative_position_bias_table" in k for k in keys):
            return "timm Beit"
        if _eva_keys(keys, prefix):
            return "timm Eva"
    return layout.source


def _fold_class_position(config: LayerConfig, tensors: dict) -> tuple[LayerConfig, dict]:
    """x_class + E_pos[0] as the class token, E_pos[1:] as the table (of the patches only)."""
    import dataclasses

    k = int(config.class_token) + int(config.dist_token)
    pos = tensors["pos_emb"]
    tensors = dict(tensors)
    if config.class_token:
        tensors["cls_token"] = tensors["cls_token"] + pos[:, :1]
    if config.dist_token:
        tensors["dist_token"] = tensors["dist_token"] + pos[:, 1:2]
    tensors["pos_emb"] = pos[:, k:].contiguous()
    return dataclasses.replace(config, pos_embed_prefix=False), tensors


@dataclass(frozen=True)
class _Shapes:
    """The input layer's tensor shapes in a checkpoint, checked (no tensor read).

    Attributes:
        weight: the patch embedding's (D, C, P, P).
        found: vitembed's name -> the shape found (None: the layout's tensor is absent).
        norm: the pre-norm's weight shape, or None.
    """

    weight: tuple[int, ...]
    found: dict[str, tuple[int, ...] | None]
    norm: tuple[int, ...] | None

    @property
    def num_reg(self) -> int:
        return self.found["reg_token"][1] if self.found["reg_token"] is not None else 0


_OURS = (("patch_emb_layer.weight", "proj_weight"), ("patch_emb_layer.bias", "proj_bias"), ("cls_token", "cls"),
         ("dist_token", "dist"), ("reg_token", "reg"), ("pos_emb", "pos"))


def _read_shapes(state: Mapping[str, torch.Tensor], layout: Layout, prefix: str, where: str) -> _Shapes:
    """Each of the layout's tensors' shape, checked against the patch embedding's D."""

    def shape(name: str | None) -> tuple[int, ...] | None:
        return shape_of(state, prefix + name) if name and prefix + name in state else None

    weight = shape(layout.proj_weight)
    if len(weight) == 2 and layout.source.startswith("transformers Siglip"):
        raise WeightsError(_naflex(where))
    if len(weight) != 4 or weight[2] != weight[3]:
        raise _bad(where, prefix + layout.proj_weight, weight, "(D, C, P, P), a convolution over square patches")
    d, c = weight[:2]
    if c > 4:
        raise WeightsError(f"{where}: {prefix + layout.proj_weight} takes {c} input channels: not pixels (RGB or "
                           "grey), but another network's features, as in a hybrid ViT; vitembed reads plain ViTs")
    found = {ours: shape(getattr(layout, attr)) for ours, attr in _OURS}
    norm = shape(f"{layout.norm}.weight") if layout.norm else None
    for key, actual, expected in ((layout.proj_bias, found["patch_emb_layer.bias"], [(d,)]),
                                  (layout.cls, found["cls_token"], [(1, 1, d), (d,)]),
                                  (layout.dist, found["dist_token"], [(1, 1, d)]),
                                  (f"{layout.norm}.weight", norm, [(d,)])):
        if actual is not None and actual not in expected:
            raise _bad(where, prefix + key, actual, " or ".join(map(str, expected)))
    reg = found["reg_token"]
    if reg is not None and (len(reg) != 3 or reg[0] != 1 or reg[2] != d):
        raise _bad(where, prefix + layout.reg, reg, f"(1, R, {d})")
    pos = found["pos_emb"]
    if pos is not None:
        found["pos_emb"] = pos = (1, *pos) if len(pos) == 2 else pos  # (rows, D) -> (1, rows, D)
        if len(pos) != 3 or pos[0] != 1 or pos[2] != d:
            raise _bad(where, prefix + layout.pos, pos, f"(1, rows, {d}) or (rows, {d}) for D = {d} from "
                                                        f"{prefix + layout.proj_weight}")
    return _Shapes(weight, found, norm)


def _bad(where: str, key: str, actual: tuple[int, ...], expected: str) -> WeightsError:
    return WeightsError(f"{where}: {key} has shape {actual}; expected {expected}")


def _config_from_shapes(state: Mapping[str, torch.Tensor], layout: Layout, prefix: str, where: str,
                        hints: dict[str, Any]) -> tuple[LayerConfig, dict[str, str]]:
    """The layer's shape from the tensors' shapes alone (no tensor read), and vitembed's name -> key."""
    shapes = _read_shapes(state, layout, prefix, where)
    found, (d, c, p) = shapes.found, shapes.weight[:3]
    has_cls, has_dist, pos = found["cls_token"] is not None, found["dist_token"] is not None, found["pos_emb"]
    if not (has_cls or has_dist or shapes.num_reg or pos is not None):
        raise WeightsError(_not_found(list(state.keys()), where))
    num_prefix = int(has_cls) + int(has_dist) + (0 if layout.regs_after_pos else shapes.num_reg)
    grid, pos_embed_prefix = _grid(pos, num_prefix, where, prefix + layout.pos) if pos is not None else (None, True)
    try:
        size = (grid or _default_grid(p, hints.get("image_size"))) * p
        config = LayerConfig(image_size=size, patch_size=p, emb_dim=d, in_channels=c,
                             class_token=has_cls, num_reg_tokens=shapes.num_reg, pos_embed_prefix=pos_embed_prefix,
                             dist_token=has_dist, conv_bias=found["patch_emb_layer.bias"] is not None,
                             pos_table=pos is not None,
                             attn_positions=layout.attn_positions or _attn_positions(state.keys(), prefix,
                                                                                     pos is not None),
                             pre_norm_eps=float(hints.get("layer_norm_eps", 1e-5)) if shapes.norm else None)
    except ConfigError as exc:  # a dimension of 0, a register count over the limit
        raise WeightsError(f"{where}: {prefix + layout.proj_weight} has shape {shapes.weight}: {exc}") from None
    keys = {ours: prefix + getattr(layout, attr) for ours, attr in _OURS
            if ours == "patch_emb_layer.weight" or found[ours] is not None}
    if shapes.norm is not None:
        keys["norm_pre.weight"] = f"{prefix}{layout.norm}.weight"
        if prefix + f"{layout.norm}.bias" in state:
            keys["norm_pre.bias"] = f"{prefix}{layout.norm}.bias"
    return config, keys


def _attn_positions(keys, prefix: str, table: bool) -> str | None:
    """What a checkpoint's keys say of positions inside attention: a relative position bias (BEiT),
    or, for a timm Eva without a table, RoPE (its `vit_*_rope_*` and DINOv3 models); the
    RoPE of an Eva with a table (EVA-02) leaves no tensor in the state dict, so it is not known."""
    if any("relative_position_bias_table" in k for k in keys):
        return "relative"
    if not table and _eva_keys(keys, prefix):
        return "rope"
    return None


def _eva_keys(keys, prefix: str) -> bool:
    """Whether a timm-layout checkpoint's first block is an Eva block: q and v biases apart (EVA-02,
    the RoPE ViTs) or layer scale as gamma_1 (timm's DINOv3) where a VisionTransformer has ls1.gamma
    (Beit's blocks have both, and are told apart by their relative position bias first)."""
    return prefix + "blocks.0.attn.q_bias" in keys or prefix + "blocks.0.gamma_1" in keys


def _default_grid(patch_size: int, image_size: int | None = None) -> int:
    """The grid of a layer without a position table (RoPE, relative bias): the image size its
    config.json names, else 224 pixels' worth, rounded down."""
    return max((image_size or 224) // patch_size, 1)


def _grid(shape: tuple[int, ...], num_prefix: int, where: str, key: str) -> tuple[int, bool]:
    """Patches per side, and whether the table has rows for the prefix tokens (timm's
    `no_embed_class` tables have none).

    Raises:
        WeightsError: rows that are no square grid with or without the prefix rows, or, for tiny
            grids, both (9 rows and 5 prefix tokens: 2 x 2 patches after 5 prefix rows, or 3 x 3):
            the patch grid cannot be told, and a guess could give wrong tokens.
    """
    rows, fits = shape[1], []
    for with_prefix, n in ((True, rows - num_prefix), (False, rows)):
        side = math.isqrt(n) if n > 0 else 0
        if side and side * side == n and (with_prefix or num_prefix):
            fits.append((side, with_prefix))
    if not fits:
        raise WeightsError(f"{where}: {key} has shape {shape}; expected N + {num_prefix} or N rows with N a "
                           f"square number of patches ({num_prefix} prefix token(s))")
    if len(fits) > 1:
        (a, _), (b, _) = fits
        raise WeightsError(f"{where}: {key} has {rows} rows, which fit {a} x {a} patches after {num_prefix} prefix "
                           f"rows and {b} x {b} patches without them; the patch grid cannot be told from the "
                           "weights, so they are refused rather than guessed")
    return fits[0]
