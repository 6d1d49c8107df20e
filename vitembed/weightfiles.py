"""Weights files: reading checkpoints' tensors, and vitembed's own layer files in and out.

The bottom of the weights modules (weightfiles <- checkpoints <- pretrained <- weights): it reads
files and knows no checkpoint layout.

A vitembed layer file is a dict `{"format": "vitembed-layer", "version": 1, "config": {...},
"state_dict": {...}}` saved with `torch.save` (loadable with `weights_only=True`), or a
`.safetensors` file whose metadata carries the format, version and config as JSON.

Checkpoints are data, never code: `.pt` files are read with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call anything; `.safetensors` holds no code at all.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import LayerConfig
from .errors import ConfigError, WeightsError, one_line
from .layer import VitInputLayer
from .writers import atomic_write

__all__ = [
    "LAYER_FORMAT",
    "LAYER_VERSION",
    "LazyTensors",
    "LoadedWeights",
    "is_layer_file",
    "read_layer_file",
    "read_state_dict",
    "save_layer",
]

LAYER_FORMAT = "vitembed-layer"
LAYER_VERSION = 1


@dataclass
class LoadedWeights:
    """A layer's parameters and what is known of where they came from.

    Attributes:
        config: the layer shape read from the file.
        state_dict: tensors under vitembed's (the seed's) parameter names.
        source: a short description, e.g. "vitembed layer file" or "timm VisionTransformer".
        preprocess: preprocessing defaults that belong to these weights (keys of
            `images.Preprocess`), empty when the file says nothing.
        notes: one-line notices for the user (e.g. a resampled position embedding).
    """

    config: LayerConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    preprocess: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def build(self) -> VitInputLayer:
        layer = VitInputLayer(config=self.config)
        try:
            layer.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit the layer: {one_line(exc)}") from None
        return layer.eval()


def save_layer(layer: VitInputLayer, path: str | os.PathLike) -> int:
    """Write a layer file (.pt/.pth, or .safetensors by suffix); returns the bytes written."""
    path = Path(path)
    config = layer.config.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        meta = {"format": LAYER_FORMAT, "version": str(LAYER_VERSION), "config": json.dumps(config)}
        return atomic_write(path, save(state, metadata=meta))
    payload = {"format": LAYER_FORMAT, "version": LAYER_VERSION, "config": config, "state_dict": state}
    return atomic_write(path, lambda f: torch.save(payload, f))


class LazyTensors(Mapping):
    """Tensor names known up front, each tensor read from its file when first asked for.

    Used for safetensors files and sharded checkpoints, so that a whole model's file yields its
    input layer without reading the rest. `files` maps each name to the file holding it.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files
        self._torch: dict[Path, Mapping[str, torch.Tensor]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._files[key]
        if path.suffix.lower() != ".safetensors":  # a torch shard: read once, whole
            if path not in self._torch:
                self._torch[path] = read_state_dict(path)[0]
            return self._torch[path][key]
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as exc:  # SafetensorError, OSError
            raise WeightsError(f"{path}: cannot read tensor {key!r}: {one_line(exc)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_state_dict(path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a .pt/.pth/.bin or .safetensors file, and its metadata where it has any.

    For torch files the metadata is the top-level dict itself when it holds non-tensor entries.
    Safetensors files are read lazily (see `LazyTensors`); zip-format torch files are memory-mapped.
    """
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what counts
            # mmap: a whole model's checkpoint gives its input layer without being read in full.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise WeightsError(_refusal(path, str(exc))) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint: {one_line(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        meta, obj = {k: v for k, v in obj.items() if k != "model"}, obj["model"]
    else:
        meta = None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors")
    return tensors, meta


def _read_safetensors(path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, Any] | None]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = LazyTensors({k: path for k in f.keys()})
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise WeightsError(f"{path}: cannot read as safetensors: {one_line(exc)}") from None
    meta: dict[str, Any] = dict(raw_meta)
    if "config" in meta:
        try:
            meta["config"] = json.loads(meta["config"])
        except json.JSONDecodeError:
            raise WeightsError(f"{path}: its metadata 'config' is not valid JSON") from None
    return tensors, meta


def is_layer_file(meta: dict[str, Any] | None) -> bool:
    """Whether a file's metadata (from `read_state_dict`) marks a vitembed layer file."""
    return isinstance(meta, dict) and meta.get("format") == LAYER_FORMAT


def read_layer_file(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> LoadedWeights:
    """A vitembed layer file's weights, from what `read_state_dict` gave for it."""
    version = int(meta.get("version", 0))
    if version != LAYER_VERSION:
        raise WeightsError(f"{path}: layer file version {version}; this vitembed reads version {LAYER_VERSION}")
    try:
        config = LayerConfig.from_dict(dict(meta["config"]))
    except (KeyError, TypeError, ConfigError) as exc:
        raise WeightsError(f"{path}: bad layer config: {exc}") from None
    return LoadedWeights(config, dict(state.items()), source="vitembed layer file")


def _refusal(path: Path, text: str) -> str:
    """One line for a pickle that torch.load(weights_only=True) refused."""
    never = "vitembed loads weights with weights_only=True and never runs code from a checkpoint"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"{path}: refused: the file would import {found.group(1)}: it holds pickled code or objects, "
                f"not plain tensors; {never} (save model.state_dict(), or use .safetensors)")
    found = re.search(r"Unsupported (operand \d+|[^\n]{0,80})", text)
    reason = f"unsupported pickle {found.group(1)}" if found else "refused by weights_only=True"
    return f"{path}: cannot read as a PyTorch checkpoint ({reason}): corrupt, or a pickle of other objects; {never}"

