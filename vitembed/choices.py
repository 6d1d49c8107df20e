"""The names a user chooses between, in one light module (no numpy, Pillow or torch), so that the
command line's help and the library's checks use the same lists."""

from __future__ import annotations

RESIZE_MODES = ("squash", "crop", "pad", "native", "squash-crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
NORMALIZATIONS = ("imagenet", "inception", "siglip", "clip", "none")
FORMATS = ("npy", "pt")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "single": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16"}
ENGINES = ("auto", "numpy", "torch")
DECODES = ("auto", "cpu", "gpu")
POS_INITS = ("normal", "sincos")
# E_pos for another grid: bicubic antialiased (timm's resample_abs_pos_embed), bicubic (transformers'
# interpolate_pos_encoding), bicubic with align_corners (torchvision), bicubic with DINOv2's scale factor
POS_RESAMPLES = ("timm", "hf", "torchvision", "dinov2")
# z0 (what the first block receives); z0 without the layer's pre-norm; x_p E (steps 1-3); x_p E + E_pos's patch rows
TOKENS = ("z0", "z0-before-norm", "patches", "patches+pos")
