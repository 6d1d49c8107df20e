"""Layer shapes: the typed config of the input layer, its named presets, and option resolution.

Kept free of torch so that `vitembed info` and `--help` start fast; `reference.py` builds the module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["DEFAULT_PRESET", "PRESETS", "PRESET_ALIASES", "PRESET_PREPROCESS", "LayerConfig", "nearest_valid_sizes",
           "parse_image_size", "preset_name", "preset_preprocess", "resolve_config"]


# Far above every ViT (ViT-G: 224 px, P = 14, D = 1664; 896 px grids exist), far below what would
# exhaust a machine before a check could say so.
LIMITS = {"image_size": 8192, "patch_size": 1024, "emb_dim": 16384, "in_channels": 4, "num_reg_tokens": 64,
          "max_patches": 1 << 16}  # max_patches: 256 x 256 patches, far above NaViT's and Pix2Struct's 4096
MAX_PARAMS = 1 << 30  # 4 GB of float32

ATTN_POSITIONS = (None, "rope", "relative")
ATTN_POSITIONS_TEXT = {"rope": "rotary (RoPE)", "relative": "relative position bias"}
_RECORDED_WHEN_SET = ("dist_token", "conv_bias", "pos_table", "attn_positions", "pre_norm_eps")


@dataclass(frozen=True)
class LayerConfig:
    """Hyper-parameters of the input layer.

    Attributes:
        image_size: side S of the square input image, in pixels; its height H when `image_width` is set.
        patch_size: side P of a square patch; H and W must be multiples of P.
        emb_dim: D, the length of each token.
        in_channels: C, channels of the input image.
        class_token: whether a class token x_class is prepended (step 4).
        num_reg_tokens: register tokens after the class (and distillation) token; 0 in the ViT book.
        pos_embed_prefix: whether E_pos has rows for the prefix tokens (the ViT book: yes, N_p + 1
            rows); timm's `no_embed_class` models add position only to the patches.
        image_width: W of a rectangular input (None: square, W = H); the patch grid is then
            (H / P) x (W / P), patches in row-major order.
        dist_token: a distillation token right after the class token (DeiT).
        conv_bias: whether the patch embedding's convolution has a bias (CLIP's has none).
        pos_table: whether the layer adds a position table E_pos; False where positions are
            applied inside attention (rotary or relative), so that z0 has none.
        attn_positions: what a layer without E_pos uses inside attention, for the record: "rope",
            "relative" or None (not known from the weights).
        pre_norm_eps: a LayerNorm over each token after step 5 (CLIP's `ln_pre`, timm's
            `norm_pre`), with this epsilon; None: none (the ViT book).

    Fields at their defaults are left out of `to_dict`, so that the ViT book's and the 2020 ViTs'
    configs read as they always have.
    """

    image_size: int = 224
    patch_size: int = 14  # the ViT book's worked example: 224 = 16 patches of 14 pixels per side
    emb_dim: int = 384
    in_channels: int = 3
    class_token: bool = True
    num_reg_tokens: int = 0
    pos_embed_prefix: bool = True
    image_width: int | None = None
    dist_token: bool = False
    conv_bias: bool = True
    pos_table: bool = True
    attn_positions: str | None = None
    pre_norm_eps: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "emb_dim", "in_channels", "image_width"):
            value = getattr(self, name)
            if name == "image_width" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
            limit = LIMITS.get(name, LIMITS["image_size"])  # image_width: as image_size
            if value > limit:
                raise ConfigError(f"{name.replace('_', '-')} ({value}) is over the limit of {limit}")
        if not 0 <= self.num_reg_tokens <= LIMITS["num_reg_tokens"]:
            raise ConfigError(f"num-reg-tokens must be 0 to {LIMITS['num_reg_tokens']}, got {self.num_reg_tokens}")
        if self.attn_positions not in ATTN_POSITIONS:
            raise ConfigError(f"attn-positions must be one of {', '.join(map(str, ATTN_POSITIONS))}, "
                              f"got {self.attn_positions!r}")
        eps = self.pre_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ConfigError(f"pre-norm-eps must be a number in (0, 1), got {eps!r}")
        if self.num_params > MAX_PARAMS:
            raise ConfigError(f"this layer would have {self.num_params:,} parameters, over the limit of {MAX_PARAMS:,}")
        if self.image_width == self.image_size:
            object.__setattr__(self, "image_width", None)  # H x H is the square layer, one config
        check_divisible(self.size, self.patch_size)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the input image, pixels."""
        return self.image_size, self.image_width or self.image_size

    @property
    def grid(self) -> tuple[int, int]:
        """(H / P, W / P): rows and columns of the patch grid."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    @property
    def num_patch_row(self) -> int:
        """Patches per side of a square layer, S / P (the ViT book's name); the grid's rows in general."""
        return self.grid[0]

    @property
    def num_patches(self) -> int:
        """N_p = HW / P^2."""
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        """P^2 C, the length of one flattened patch."""
        return self.patch_size**2 * self.in_channels

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.num_reg_tokens

    @property
    def num_pos_prefix(self) -> int:
        """Rows of E_pos before the patches': the prefix tokens', or none (no_embed_class)."""
        return self.num_prefix_tokens if self.pos_embed_prefix and self.pos_table else 0

    @property
    def num_tokens(self) -> int:
        """Rows of z0: N_p plus the prefix tokens (N_p + 1 in the ViT book)."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.num_tokens, self.emb_dim)

    @property
    def num_pos_rows(self) -> int:
        """Rows of E_pos (0 where the layer has none)."""
        return self.num_patches + self.num_pos_prefix if self.pos_table else 0

    @property
    def num_params(self) -> int:
        conv = self.patch_dim * self.emb_dim + self.emb_dim * int(self.conv_bias)
        norm = 2 * self.emb_dim if self.pre_norm_eps is not None else 0
        return conv + norm + (self.num_prefix_tokens + self.num_pos_rows) * self.emb_dim

    def token_rows(self) -> list[tuple[int, int, str]]:
        """What the rows of z0 hold: (first row, last row, "class token" | "distillation token" |
        "register tokens" | "patches")."""
        rows, row = [], 0
        for present, what in ((self.class_token, "class token"), (self.dist_token, "distillation token")):
            if present:
                rows.append((row, row, what))
                row += 1
        if self.num_reg_tokens:
            rows.append((row, row + self.num_reg_tokens - 1, "register tokens"))
            row += self.num_reg_tokens
        rows.append((row, row + self.num_patches - 1, "patches"))
        return rows

    def steps(self) -> dict:
        """What the layer does, step by step, for `info` and run.json: the patch embedding's bias,
        the prefix tokens by kind, the positions (a table, or inside attention) and the pre-norm."""
        prefix = [what for present, what in ((self.class_token, "class"), (self.dist_token, "distillation"))
                  if present] + ["register"] * self.num_reg_tokens
        if self.pos_table:
            covers = "prefix tokens and patches" if self.num_pos_prefix else "patches only"
            positions = f"table E_pos of {self.num_pos_rows} rows ({covers})"
            if self.attn_positions:
                positions += f", and {ATTN_POSITIONS_TEXT[self.attn_positions]} inside attention"
        else:
            how = ATTN_POSITIONS_TEXT.get(self.attn_positions, "rotary or relative")
            positions = f"no table: {how} positions, applied inside attention"
        return {"conv_bias": self.conv_bias, "prefix_tokens": prefix, "positions": positions,
                "pre_norm": None if self.pre_norm_eps is None else f"LayerNorm (eps {self.pre_norm_eps:g})"}

    def to_dict(self) -> dict:
        """The fields, less those of other families' layers (and image_width) at their defaults:
        the compact form of layer files, `info` and the random-layer cache key, in which a
        seed-style layer's record holds its seven shape fields only. run.json records every
        field (`dataclasses.asdict`)."""
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("image_width", *_RECORDED_WHEN_SET):
            if data[name] == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LayerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown layer config keys: {', '.join(unknown)}")
        return cls(**data)


def nearest_valid_sizes(image_size: int, patch_size: int) -> tuple[int, int]:
    """The multiples of `patch_size` just below and just above `image_size` (below may be 0)."""
    lower = (image_size // patch_size) * patch_size
    return lower, lower + patch_size


def format_size(size: tuple[int, int]) -> str:
    """(H, W) as --image-size takes it: "224" for a square, "224x320" (H x W) otherwise."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def check_divisible(size: tuple[int, int], patch_size: int) -> None:
    """Refuse an image size (H, W) that is not a multiple of the patch size on both sides, naming
    the nearest sizes that are.

    Raises:
        ConfigError: "image size (200) is not divisible by patch size (16); pass --image-size 192 or 208".
    """
    (h, w), p = size, patch_size
    if not (h % p or w % p):
        return
    if h == w:
        options = [str(v) for v in nearest_valid_sizes(h, p) if v]
    else:
        rows, cols = ([v for v in nearest_valid_sizes(side, p) if v] if side % p else [side] for side in (h, w))
        options = [f"{a}x{b}" for a in rows for b in cols]
    what = f"image size ({h})" if h == w else f"image size ({h}x{w}, H x W)"
    raise ConfigError(f"{what} is not divisible by patch size ({p}); pass --image-size {' or '.join(options)}")


def parse_image_size(value) -> tuple[int, int] | None:
    """--image-size: 224 (square), "224x320" (H x W), or (224, 320) -> (H, W); None stays None.

    Raises:
        ConfigError: anything else, naming the value and the forms taken.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    parts = value.lower().split("x") if isinstance(value, str) else []
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        numbers = [int(p) for p in parts]
        return numbers[0], numbers[-1]
    raise ConfigError(f"image size {value!r} is not a number of pixels; pass --image-size 224 (square) "
                      "or 224x320 (height x width)")


# Named layer shapes: the ViT family of the paper and its usual relatives, all at 224 pixels.
PRESETS: dict[str, LayerConfig] = {
    # The worked example of the reference book (ghmagazine/vit_book): 16 x 16 patches of 14 x 14 x 3
    "vitbook-s14": LayerConfig(224, 14, 384),
    "vit-ti16": LayerConfig(224, 16, 192),
    "vit-s16": LayerConfig(224, 16, 384),
    "vit-b16": LayerConfig(224, 16, 768),
    "vit-b32": LayerConfig(224, 32, 768),
    "vit-l16": LayerConfig(224, 16, 1024),
    "vit-l32": LayerConfig(224, 32, 1024),
    "vit-h14": LayerConfig(224, 14, 1280),
    "vit-s14": LayerConfig(224, 14, 384),
    "vit-b14": LayerConfig(224, 14, 768),
    "vit-l14": LayerConfig(224, 14, 1024),
    "vit-g14": LayerConfig(224, 14, 1536),
}


def _clip(size: int, p: int, d: int) -> LayerConfig:
    """OpenAI CLIP's vision tower: no bias in the patch embedding, a LayerNorm (ln_pre) over z0."""
    return LayerConfig(size, p, d, conv_bias=False, pre_norm_eps=1e-5)


def _siglip(size: int, p: int, d: int) -> LayerConfig:
    """SigLIP's vision tower: no class token, E_pos over the patches, no pre-norm."""
    return LayerConfig(size, p, d, class_token=False, pos_embed_prefix=False)


def _dinov2(d: int, registers: int = 0) -> LayerConfig:
    """DINOv2 at its processor's 224 crop (its table is 37 x 37, 518 px); registers take no E_pos."""
    return LayerConfig(224, 14, d, num_reg_tokens=registers, pos_embed_prefix=not registers)


def _dinov3(d: int) -> LayerConfig:
    """DINOv3 ViT: a class token and 4 registers, no table: RoPE inside attention."""
    return LayerConfig(224, 16, d, num_reg_tokens=4, pos_table=False, attn_positions="rope")


# The families of today's vision towers: shapes, and the preprocessing of their own processors.
PRESETS.update({
    "clip-b32": _clip(224, 32, 768), "clip-b16": _clip(224, 16, 768), "clip-l14": _clip(224, 14, 1024),
    "clip-l14-336": _clip(336, 14, 1024),
    "siglip-b16": _siglip(224, 16, 768), "siglip-l16-384": _siglip(384, 16, 1024),
    "dinov2-s14": _dinov2(384), "dinov2-b14": _dinov2(768), "dinov2-l14": _dinov2(1024), "dinov2-g14": _dinov2(1536),
    "dinov2-s14-reg4": _dinov2(384, 4), "dinov2-b14-reg4": _dinov2(768, 4), "dinov2-l14-reg4": _dinov2(1024, 4),
    "dinov3-s16": _dinov3(384), "dinov3-b16": _dinov3(768), "dinov3-l16": _dinov3(1024),
})
_CLIP_PREP = {"resize": "crop", "crop_pct": 1.0, "interpolation": "bicubic", "normalize": "clip"}
_SIGLIP_PREP = {"resize": "squash", "interpolation": "bicubic", "normalize": "siglip"}
_DINO_PREP = {"resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic", "normalize": "imagenet"}
# A preset's preprocessing (as `decode.Preprocess` fields, the normalisation by name): its family's processor's.
PRESET_PREPROCESS: dict[str, dict] = {
    name: _CLIP_PREP if name.startswith("clip") else _SIGLIP_PREP if name.startswith("siglip")
    else {"resize": "squash", "interpolation": "bilinear", "normalize": "imagenet"} if name.startswith("dinov3")
    else _DINO_PREP
    for name in PRESETS if name.startswith(("clip", "siglip", "dino"))
}
DEFAULT_PRESET = "vitbook-s14"
# Earlier names of presets, still taken (old commands; "seed" was the reference book's layer's name).
PRESET_ALIASES = {"seed": "vitbook-s14"}


def preset_name(preset: str | None) -> str:
    """A preset's name as PRESETS has it: the default for None, an earlier name's current one.

    Raises:
        ConfigError: no such preset; the message suggests the nearest name (vit_b16, ViT-B/16, B/16: vit-b16).
    """
    name = PRESET_ALIASES.get(preset, preset) if preset is not None else DEFAULT_PRESET
    if name in PRESETS:
        return name
    from ..choices import suggest

    raise ConfigError(f"unknown preset {preset!r}{suggest(preset, PRESETS, normalise=_preset_key)}; "
                      f"choose one of: {', '.join(PRESETS)}")


def _preset_key(text: str) -> str:
    """A preset name as a user might write it, reduced to compare: vit_b16, ViT-B/16 and B/16 all read b16."""
    key = "".join(c for c in text.lower() if c.isalnum())
    return key[3:] if key.startswith("vit") else key


def preset_preprocess(preset: str | None) -> dict:
    """A family preset's preprocessing (its processor's: resize, interpolation, mean and std), as
    `decode.Preprocess` fields; empty for the 2020 ViT shapes, which take vitembed's defaults."""
    from ..choices import NORMALIZATION_STATS

    fields = dict(PRESET_PREPROCESS.get(PRESET_ALIASES.get(preset, preset) or "", {}))
    if "normalize" in fields:
        fields["mean"], fields["std"] = NORMALIZATION_STATS[fields.pop("normalize")]
    return fields


def resolve_config(
    preset: str | None = None,
    *,
    image_size: int | str | tuple[int, int] | None = None,
    patch_size: int | None = None,
    num_patch_row: int | None = None,
    emb_dim: int | None = None,
    in_channels: int | None = None,
    base: LayerConfig | None = None,
) -> LayerConfig:
    """A preset (or `base`) with the given fields overridden.

    `image_size` is a side (square), "HxW" or (H, W). `num_patch_row` is the ViT book's way to give
    the patch size of a square layer: P = image_size / num_patch_row.
    """
    if base is None:
        base = PRESETS[preset_name(preset)]
    if patch_size is not None and num_patch_row is not None:
        raise ConfigError("give either --patch-size or --num-patch-row, not both")
    height, width = parse_image_size(image_size) or base.size
    if num_patch_row is not None:
        if height != width:
            raise ConfigError(f"--num-patch-row is for square images, not {height}x{width}; give --patch-size")
        if num_patch_row < 1 or height % num_patch_row:
            raise ConfigError(
                f"image size ({height}) is not divisible by num-patch-row ({num_patch_row}); "
                f"pick a divisor of {height}"
            )
        patch_size = height // num_patch_row
    changes = {"patch_size": patch_size, "emb_dim": emb_dim, "in_channels": in_channels}
    changes = {k: v for k, v in changes.items() if v is not None}
    if image_size is not None:
        changes.update(image_size=height, image_width=width)
    return dataclasses.replace(base, **changes)
