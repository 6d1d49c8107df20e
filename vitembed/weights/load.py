"""`--weights`: one entry point for every kind of weights.

The weights modules, each importing only those below it:

    load.py         load_weights(spec): a name, a folder or a file -> LoadedWeights (this module)
    pretrained.py   named weights: torchvision:, timm:, hf: (through the libraries' caches)
    checkpoints.py  save_pretrained folders, preprocessing, resolution
    layouts.py      other libraries' checkpoint layouts -> vitembed's parameters
    files.py        reading files (torch, safetensors) and vitembed's own layer files

Checkpoints are data, never code: `.pt` files are read with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call anything; `.safetensors` holds no code at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import convert_state_dict, load_folder
from ..layer.kernel import fingerprint
from .pretrained import is_pretrained_name, load_pretrained
from .files import (
    LAYER_FORMAT,
    LazyTensors,
    LoadedWeights,
    check_values,
    is_layer_file,
    read_layer_file,
    read_state_dict,
    save_layer,
)

__all__ = [
    "LAYER_FORMAT",
    "LazyTensors",
    "LoadedWeights",
    "fingerprint",
    "load_weights",
    "read_state_dict",
    "save_layer",
]


def load_weights(spec: str | os.PathLike) -> LoadedWeights:
    """Read weights and recognise their layout.

    Args:
        spec: a vitembed layer file; a timm, torchvision, transformers or ViT book class state dict
            (.pt/.pth/.bin/.safetensors); a `save_pretrained` folder; or a pretrained name
            `torchvision:vit_b_16[.WEIGHTS]`, `timm:MODEL[.TAG]`, `hf:ORG/REPO`.

    Raises:
        WeightsError: missing, unreadable, corrupt, code-running or unrecognised weights, or
            tensors that are complex or hold NaN or infinite values.
    """
    path = Path(spec)
    if isinstance(spec, str) and is_pretrained_name(spec) and not path.exists():
        loaded = load_pretrained(spec)
    elif path.is_dir():
        loaded = load_folder(path)
    else:
        state, meta = read_state_dict(path)
        loaded = read_layer_file(path, state, meta) if is_layer_file(meta) else convert_state_dict(state, str(path))
    check_values(loaded.state_dict, str(spec))
    return loaded
