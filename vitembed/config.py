"""Layer shapes: the typed config of the input layer, its named presets, and option resolution.

Kept free of torch so that `vitembed info` and `--help` start fast; `layer.py` builds the module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["DEFAULT_PRESET", "PRESETS", "LayerConfig", "nearest_valid_sizes", "resolve_config"]


# Far above every ViT (ViT-G: 224 px, P = 14, D = 1664; 896 px grids exist), far below what would
# exhaust a machine before a check could say so.
LIMITS = {"image_size": 8192, "patch_size": 1024, "emb_dim": 16384, "in_channels": 4, "num_reg_tokens": 64}
MAX_PARAMS = 1 << 30  # 4 GB of float32


@dataclass(frozen=True)
class LayerConfig:
    """Hyper-parameters of the input layer.

    Attributes:
        image_size: side S of the square input image, in pixels.
        patch_size: side P of a square patch; S must be a multiple of P.
        emb_dim: D, the length of each token.
        in_channels: C, channels of the input image.
        class_token: whether a class token x_class is prepended (step 4).
        num_reg_tokens: register tokens after the class token (timm's `reg_token`); 0 in the seed.
        pos_embed_prefix: whether E_pos has rows for the prefix tokens (the seed: yes, N_p + 1
            rows); timm's `no_embed_class` models add position only to the patches.
    """

    image_size: int = 224
    patch_size: int = 14  # the seed's worked example: 224 = 16 patches of 14 pixels per side
    emb_dim: int = 384
    in_channels: int = 3
    class_token: bool = True
    num_reg_tokens: int = 0
    pos_embed_prefix: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "emb_dim", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:
                raise ConfigError(f"{name.replace('_', '-')} ({value}) is over the limit of {LIMITS[name]}")
        if not 0 <= self.num_reg_tokens <= LIMITS["num_reg_tokens"]:
            raise ConfigError(f"num-reg-tokens must be 0 to {LIMITS['num_reg_tokens']}, got {self.num_reg_tokens}")
        if self.num_params > MAX_PARAMS:
            raise ConfigError(f"this layer would have {self.num_params:,} parameters, over the limit of {MAX_PARAMS:,}")
        if self.image_size % self.patch_size:
            lower, upper = nearest_valid_sizes(self.image_size, self.patch_size)
            hint = f"--image-size {lower} or {upper}" if lower else f"--image-size {upper}"
            raise ConfigError(
                f"image size ({self.image_size}) is not divisible by patch size ({self.patch_size}); "
                f"pass {hint}"
            )

    @property
    def num_patch_row(self) -> int:
        """Patches per side, S / P."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N_p = (S / P)^2."""
        return self.num_patch_row**2

    @property
    def patch_dim(self) -> int:
        """P^2 C, the length of one flattened patch."""
        return self.patch_size**2 * self.in_channels

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    @property
    def num_tokens(self) -> int:
        """Rows of z0: N_p plus the prefix tokens (N_p + 1 in the seed)."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.num_tokens, self.emb_dim)

    @property
    def num_pos_rows(self) -> int:
        return self.num_patches + (self.num_prefix_tokens if self.pos_embed_prefix else 0)

    @property
    def num_params(self) -> int:
        conv = self.patch_dim * self.emb_dim + self.emb_dim
        return conv + (self.num_prefix_tokens + self.num_pos_rows) * self.emb_dim

    def token_rows(self) -> list[tuple[int, int, str]]:
        """What the rows of z0 hold: (first row, last row, "class token" | "register tokens" | "patches")."""
        rows, row = [], 0
        if self.class_token:
            rows.append((0, 0, "class token"))
            row = 1
        if self.num_reg_tokens:
            rows.append((row, row + self.num_reg_tokens - 1, "register tokens"))
            row += self.num_reg_tokens
        rows.append((row, row + self.num_patches - 1, "patches"))
        return rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


# Named layer shapes: the ViT family of the paper and its usual relatives, all at 224 pixels.
PRESETS: dict[str, LayerConfig] = {
    "seed": LayerConfig(224, 14, 384),  # the seed's worked example: 16 x 16 patches of 14 x 14 x 3
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
DEFAULT_PRESET = "seed"


def resolve_config(
    preset: str | None = None,
    *,
    image_size: int | None = None,
    patch_size: int | None = None,
    num_patch_row: int | None = None,
    emb_dim: int | None = None,
    in_channels: int | None = None,
    base: LayerConfig | None = None,
) -> LayerConfig:
    """A preset (or `base`) with the given fields overridden.

    `num_patch_row` is the seed's way to give the patch size: P = image_size / num_patch_row.
    """
    if base is None:
        name = preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        base = PRESETS[name]
    if patch_size is not None and num_patch_row is not None:
        raise ConfigError("give either --patch-size or --num-patch-row, not both")
    size = image_size if image_size is not None else base.image_size
    if num_patch_row is not None:
        if num_patch_row < 1 or size % num_patch_row:
            raise ConfigError(
                f"image size ({size}) is not divisible by num-patch-row ({num_patch_row}); "
                f"pick a divisor of {size}"
            )
        patch_size = size // num_patch_row
    changes = {
        "image_size": image_size,
        "patch_size": patch_size,
        "emb_dim": emb_dim,
        "in_channels": in_channels,
    }
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
