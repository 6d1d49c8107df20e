"""The names a user chooses between, in one light module (no numpy, Pillow or torch), so that the
command line's help and the library's checks use the same lists."""

from __future__ import annotations

RESIZE_MODES = ("squash", "crop", "pad", "native")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
NORMALIZATIONS = ("imagenet", "inception", "clip", "none")
FORMATS = ("npy", "pt")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "single": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16"}
ENGINES = ("auto", "numpy", "torch")
DECODES = ("auto", "cpu", "gpu")
POS_INITS = ("normal", "sincos")
POS_RESAMPLES = ("timm", "hf")  # E_pos for another grid: timm's resample_abs_pos_embed, or transformers' interpolation
TOKENS = ("z0", "patches", "patches+pos")  # z0; x_p E (steps 1-3); x_p E + E_pos's patch rows
