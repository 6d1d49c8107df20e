"""The names a user chooses between, in one light module (no numpy, Pillow or torch), so that the
command line's help and the library's checks use the same lists."""

from __future__ import annotations

RESIZE_MODES = ("squash", "crop", "pad", "native", "squash-crop")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
# --normalize: per-channel (mean, std) of pixels / 255
NORMALIZATION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # SigLIP's and SigLIP2's processors
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
NORMALIZATIONS = tuple(NORMALIZATION_STATS)
FORMATS = ("npy", "pt", "parquet", "wds")
DATASET_FORMATS = {"parquet": ".parquet", "wds": ".tar"}  # formats of shards only (`files.tables`): their suffix
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


def unknown(what: str, text, names, sep: str = ", ") -> str:
    """The message for a name that is not among `names`: "unknown WHAT 'TEXT' (did you mean
    NAME?); choose A, B, ..." (`sep` joins the names)."""
    return f"unknown {what} {text!r}{suggest(text, names)}; choose {sep.join(names)}"


def suggest(text, names, *, aliases: dict[str, str] | None = None, normalise=None) -> str:
    """" (did you mean NAME?)" for the one of `names` (or of `aliases`, a spelling -> its name)
    nearest to `text`, else "". `normalise` reduces a name to compare (see `layer.config.preset_name`):
    a name that reduces to the same as `text` is taken first."""
    import difflib

    spellings = {str(n): str(n) for n in names} | dict(aliases or {})
    text = str(text)
    if normalise is not None:
        same = [name for spelling, name in spellings.items() if normalise(spelling) == normalise(text)]
        if same:
            return f" (did you mean {same[0]}?)"
    close = difflib.get_close_matches(text.lower(), list(spellings), n=1, cutoff=0.5)
    if not close and normalise is not None:
        reduced = {normalise(s): name for s, name in spellings.items()}
        close = [reduced[c] for c in difflib.get_close_matches(normalise(text), list(reduced), n=1, cutoff=0.6)]
        return f" (did you mean {close[0]}?)" if close else ""
    return f" (did you mean {spellings[close[0]]}?)" if close else ""
