"""vitembed: images -> Vision Transformer input-layer tokens z0 (the seed document's input layer).

Public API (torch is imported on first use of a name that needs it):

    from vitembed import VitInputLayer, LayerConfig, PRESETS, build_layer, load_image, encode
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "VitInputLayer": "layer",
    "LayerConfig": "config",
    "PRESETS": "config",
    "DEFAULT_PRESET": "config",
    "build_layer": "layer",
    "patchify": "layer",
    "resolve_config": "config",
    "Preprocess": "images",
    "NORMALIZATIONS": "images",
    "load_image": "images",
    "Source": "inputs",
    "iter_sources": "inputs",
    "OutputPlan": "writers",
    "EncodeOptions": "pipeline",
    "Result": "pipeline",
    "Summary": "pipeline",
    "encode": "pipeline",
    "encode_images": "pipeline",
    "LoadedWeights": "weights",
    "load_weights": "weights",
    "save_layer": "weights",
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
