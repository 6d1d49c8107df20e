"""The cache of random layers: a layer drawn with torch once per machine, read back without torch.

The default layer is random, drawn from torch's generator (`reference.build_layer`). Its parameters
are kept in a small cache after the first run (`layer_cache_dir()`, one .npz per layer: 1.3 MB
for the default layer, 3 MB for vit-b16, up to 12.8 MB for vit-l32), keyed by the layer shape, the
position-embedding init, the seed and the torch version, so that later runs import no torch
(about 1.6 s of a core). A file that cannot be read or does not fit is drawn again; a cache that
cannot be written only costs time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from ..layer.config import LayerConfig
from ..errors import ConfigError
from ..files.reads import open_regular
from ..layer.kernel import LayerParams

__all__ = ["cached_random_layer", "layer_cache_dir", "random_layer_params", "remember_random_layer", "torch_version"]


def layer_cache_dir() -> Path:
    """Where random layers' parameters are kept: $VITEMBED_CACHE_DIR, else the user's cache folder
    (platformdirs: $XDG_CACHE_HOME or ~/.cache, ~/Library/Caches, %LOCALAPPDATA%; then vitembed)."""
    explicit = os.environ.get("VITEMBED_CACHE_DIR")
    if explicit:
        return Path(explicit)
    from platformdirs import user_cache_path

    return user_cache_path("vitembed", appauthor=False, opinion=False)


def torch_version() -> str:
    """torch's installed version, read without importing it (once: a search of sys.path)."""
    global _TORCH_VERSION
    if _TORCH_VERSION is not None:
        return _TORCH_VERSION
    try:
        _TORCH_VERSION = metadata.version("torch")
        return _TORCH_VERSION
    except metadata.PackageNotFoundError:
        torch = sys.modules.get("torch")
        return torch.__version__ if torch is not None else "none"


_TORCH_VERSION: str | None = None


def _cache_file(config: LayerConfig, seed: int) -> Path:
    # The numbers come from torch's generator: another torch version may draw others.
    key = json.dumps({"config": config.to_dict(), "seed": seed, "torch": torch_version()}, sort_keys=True)
    return layer_cache_dir() / f"random-layer-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def cached_random_layer(config: LayerConfig, seed: int) -> LayerParams | None:
    """The parameters of `build_layer(config, seed)` from the cache, or None."""
    path = _cache_file(config, seed)
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > 4 * config.num_params + (1 << 20):
                return None  # not this layer's file, whatever it is
            with np.load(f, allow_pickle=False) as data:
                tensors = {name: data[name] for name in data.files}
        return LayerParams(config, tensors)
    except Exception:  # absent, unreadable, damaged or not this layer's: drawn again
        return None


def remember_random_layer(params: LayerParams, seed: int) -> None:
    """Keep a random layer's parameters for the next run; a cache that cannot be written is skipped."""
    from ..files.writes import atomic_write

    path = _cache_file(params.config, seed)
    try:
        atomic_write(path, lambda f: np.savez(f, **params.tensors))
    except Exception:  # OutputError, ...: the cache only saves time
        pass


def random_layer_params(config: LayerConfig, seed: int, pos_init: str = "normal") -> LayerParams:
    """The parameters of `build_layer(config, seed, pos_init)`: from the cache, else drawn with torch
    and cached. A sine-cosine E_pos is computed (it is no draw): the cache holds the normal layer."""
    from ..layer.posembed import POS_INITS, sincos_2d

    if pos_init not in POS_INITS:
        raise ConfigError(f"unknown position init {pos_init!r}; choose {' or '.join(POS_INITS)}")
    params = cached_random_layer(config, seed)
    if params is None:  # the first run of this layer on this machine draws it with torch, once
        from ..layer.reference import build_layer

        params = LayerParams.from_module(build_layer(config, seed))
        remember_random_layer(params, seed)
    if pos_init == "sincos" and config.pos_table:
        prefix = config.num_prefix_tokens if config.pos_embed_prefix else 0
        table = sincos_2d(config.emb_dim, config.grid, num_prefix=prefix)
        params = LayerParams(config, {**params.tensors, "pos_emb": table.astype(np.float32)[None]})
    return params
