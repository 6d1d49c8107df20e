"""vitembed: images -> Vision Transformer input-layer tokens z0 (the ViT book's input layer).

The public Python API; torch is imported only by the names that need it, on first use:

    import vitembed

    layer = vitembed.build_layer(vitembed.PRESETS["vit-b16"], seed=0)    # the ViT book's VitInputLayer
    encoder = vitembed.Encoder(layer)                                     # preprocessing + layer + engine
    tokens = encoder.encode(pixels)                # (B, 224, 224, 3) uint8 -> (B, 197, 768)
    batch = encoder.encode_files(["cat.png"])      # files or bytes -> batch.tokens, batch.errors
    summary = vitembed.encode(["photos/"], "tokens/", preset="vit-b16")   # a whole folder, as the CLI
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the layer (the ViT book's five steps) and its shapes
    "VitInputLayer": "layer.reference",
    "build_layer": "layer.reference",
    "patchify": "layer.reference",
    "LayerConfig": "layer.config",
    "PRESETS": "layer.config",
    "DEFAULT_PRESET": "layer.config",
    "resolve_config": "layer.config",
    "LayerParams": "layer.kernel",
    # weights
    "LoadedWeights": "weights.load",
    "load_weights": "weights.load",
    "save_layer": "weights.load",
    # images -> pixels
    "Preprocess": "images.decode",
    "NORMALIZATIONS": "images.decode",
    "load_image": "images.decode",
    # pixels -> tokens
    "Encoder": "encoder",
    "FileBatch": "encoder",
    "encode_images": "encoder",
    # whole runs
    "encode": "pipeline.job",
    "EncodeRequest": "pipeline.request",
    "EncodeOptions": "pipeline.runoptions",
    "run": "pipeline.skeleton",
    "OutputPlan": "pipeline.plan",
    "Source": "images.inputs",
    "iter_sources": "images.inputs",
    "Written": "pipeline.outcomes",
    "Failed": "pipeline.outcomes",
    "Skipped": "pipeline.outcomes",
    "Summary": "pipeline.outcomes",
    # errors
    "VitembedError": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
    "OutputError": "errors",
    "WeightsError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitembed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
