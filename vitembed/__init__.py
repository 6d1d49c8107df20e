"""vitembed: images -> Vision Transformer input-layer tokens z0 (the seed document's input layer).

The public Python API; torch is imported only by the names that need it, on first use:

    import vitembed

    layer = vitembed.build_layer(vitembed.PRESETS["vit-b16"], seed=0)    # the seed's VitInputLayer
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
    # the layer (the seed's five steps) and its shapes
    "VitInputLayer": "layer",
    "build_layer": "layer",
    "patchify": "layer",
    "LayerConfig": "config",
    "PRESETS": "config",
    "DEFAULT_PRESET": "config",
    "resolve_config": "config",
    "LayerParams": "kernel",
    # weights
    "LoadedWeights": "weights",
    "load_weights": "weights",
    "save_layer": "weights",
    # images -> pixels
    "Preprocess": "images",
    "NORMALIZATIONS": "images",
    "load_image": "images",
    # pixels -> tokens
    "Encoder": "encoder",
    "FileBatch": "encoder",
    "encode_images": "encoder",
    # whole runs
    "encode": "encodejob",
    "EncodeRequest": "request",
    "EncodeOptions": "pipeline",
    "run": "pipeline",
    "OutputPlan": "outputs",
    "Source": "inputs",
    "iter_sources": "inputs",
    "Written": "outcomes",
    "Failed": "outcomes",
    "Skipped": "outcomes",
    "Summary": "outcomes",
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
