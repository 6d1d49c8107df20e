"""Weights files: reading checkpoints' tensors, and vitembed's own layer files in and out.

The bottom of the weights modules (files <- layouts <- checkpoints <- pretrained <- load): it reads
files and knows no checkpoint layout.

A vitembed layer file is a dict `{"format": "vitembed-layer", "version": 1, "config": {...},
"state_dict": {...}}` saved with `torch.save` (loadable with `weights_only=True`), or a
`.safetensors` file whose metadata carries the format, version and config as JSON.

Checkpoints are data, never code: `.pt` files are read with `torch.load(weights_only=True)`,
which refuses any pickle that would import or call anything; `.safetensors` holds no code at all.
Nor are they trusted for their sizes: a weights file must be a regular file (never a device or a
FIFO, checked before it is opened), a zip-format `.pt` must have stored (uncompressed) records and
is memory-mapped, and every tensor's shape and storage are checked against what the layer needs
(`check_layer`, `check_storage`, `MAX_LAYER_VALUES`) before anything is copied or allocated for it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..layer.config import LayerConfig
from ..errors import ConfigError, WeightsError, one_line
from ..layer.reference import VitInputLayer
from ..files.reads import ZIP_MAGIC, NotRegularFile, check_regular, compressed_record, open_regular, read_head
from ..files.writes import atomic_write

__all__ = [
    "LAYER_FORMAT",
    "LAYER_VERSION",
    "MAX_LAYER_VALUES",
    "LazyTensors",
    "LoadedWeights",
    "check_layer",
    "check_size",
    "check_storage",
    "check_values",
    "is_layer_file",
    "layer_shapes",
    "read_index",
    "read_json",
    "read_layer_file",
    "read_state_dict",
    "read_weight_file",
    "regular_file",
    "save_layer",
    "shape_of",
]

LAYER_FORMAT = "vitembed-layer"
LAYER_VERSION = 1
# The most values an input layer may have. The largest real ones (ViT-22B at 1024 px: D = 6144,
# 73 x 73 patches) have about 3.5e7; 2^28 (1 GiB of float32) leaves room and refuses absurd claims.
MAX_LAYER_VALUES = 1 << 28


@dataclass
class LoadedWeights:
    """A layer's parameters and what is known of where they came from.

    Attributes:
        config: the layer shape read from the file.
        state_dict: tensors under vitembed's (the ViT book's) parameter names.
        source: a short description, e.g. "vitembed layer file" or "timm VisionTransformer".
        preprocess: preprocessing defaults that belong to these weights (keys of
            `decode.Preprocess`), empty when the file says nothing.
        notes: one-line notices for the user (e.g. a resampled position embedding).
        pos_resample: how the checkpoint's own library resamples E_pos for another grid (a
            `--pos-resample` method), the default for `--image-size` and `--resize native`.
        image_size: (H, W) the weights' own preprocessing feeds the model (an HF processor's crop
            size), when it differs from the grid of the position table; None: the table's.
    """

    config: LayerConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    preprocess: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pos_resample: str = "timm"
    image_size: tuple[int, int] | None = None

    def build(self) -> VitInputLayer:
        """The layer, once its tensors are checked to fit `config` (nothing is allocated before).

        Raises:
            WeightsError: a tensor missing, extra, of another shape, or over the size limit.
        """
        check_layer(self.config, self.state_dict, self.source)
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


# --------------------------------------------------------------------------- checks before allocating


def layer_shapes(config: LayerConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a layer of `config` holds, by vitembed's names, and their shapes."""
    d = config.emb_dim
    shapes = {"patch_emb_layer.weight": (d, config.in_channels, config.patch_size, config.patch_size)}
    optional = (("patch_emb_layer.bias", (d,), config.conv_bias), ("cls_token", (1, 1, d), config.class_token),
                ("dist_token", (1, 1, d), config.dist_token),
                ("reg_token", (1, config.num_reg_tokens, d), config.num_reg_tokens),
                ("pos_emb", (1, config.num_pos_rows, d), config.pos_table),
                ("norm_pre.weight", (d,), config.pre_norm_eps is not None),
                ("norm_pre.bias", (d,), config.pre_norm_eps is not None))
    shapes.update((name, shape) for name, shape, present in optional if present)
    return shapes


def check_size(config: LayerConfig, where: str) -> None:
    """Refuse a layer of more than `MAX_LAYER_VALUES` values, before anything is allocated for it."""
    if config.num_params > MAX_LAYER_VALUES:
        raise WeightsError(
            f"{where}: an input layer of {config.num_params:,} values ({_describe(config)}) is over vitembed's "
            f"limit of {MAX_LAYER_VALUES:,}; the largest real ViTs' have a few tens of millions"
        )


def check_storage(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse a tensor that shows more values than its storage holds (zero or overlapping strides),
    before anything copies it: `torch.zeros(1).expand(...)` is a few bytes on disk, gigabytes in memory."""
    if tensor.layout != torch.strided:
        raise WeightsError(f"{where}: {name} is a {str(tensor.layout).removeprefix('torch.')} tensor; "
                           "the input layer's tensors are dense")
    available = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1) - tensor.storage_offset()
    if tensor.numel() > max(available, 0):
        raise WeightsError(
            f"{where}: {name} of shape {tuple(tensor.shape)} shows {tensor.numel():,} values but its storage holds "
            f"{max(available, 0):,} (zero or overlapping strides, as from expand()); save plain tensors "
            "(.contiguous()), or use .safetensors"
        )


def check_values(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors whose values cannot make tokens: complex ones (casting would drop their
    imaginary part) and any NaN or infinity (every token would carry it, with exit code 0).

    Raises:
        WeightsError: naming `where` and the tensor.
    """
    for name, tensor in state.items():
        if tensor.is_complex():
            raise WeightsError(f"{where}: {name} is complex ({str(tensor.dtype).removeprefix('torch.')}); "
                               "the input layer's weights are real numbers")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{where}: {name} holds NaN or infinite values; the input layer's weights must be "
                               "finite numbers")


def check_layer(config: LayerConfig, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that do not fit `config` exactly (names, shapes, size, storage), reading none.

    Raises:
        WeightsError: naming the tensor, its shape and what the config needs.
    """
    expected = layer_shapes(config)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        found = "; ".join(f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unexpected", extra))
                          if keys)
        raise WeightsError(f"{where}: its tensors do not fit its config ({_describe(config)}): {found}")
    for key, shape in expected.items():
        actual = shape_of(state, key)
        if actual != shape:
            raise WeightsError(f"{where}: {key} has shape {actual}; its config ({_describe(config)}) needs {shape}")
    check_size(config, where)
    for key in expected:
        check_storage(state[key], key, where)


def shape_of(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, from a safetensors header where it has one (the tensor is not read)."""
    return state.shape(key) if isinstance(state, LazyTensors) else tuple(state[key].shape)


def _describe(config: LayerConfig) -> str:
    return (f"image_size {config.image_size}, patch_size {config.patch_size}, emb_dim {config.emb_dim}, "
            f"in_channels {config.in_channels}")


def regular_file(path: Path) -> None:
    """Refuse a weights path that is not a regular file (links followed), without opening it."""
    try:
        check_regular(path)
    except NotRegularFile as exc:
        raise WeightsError(f"{path}: {exc}; weights must be a regular file") from None


# --------------------------------------------------------------------------- reading


class LazyTensors(Mapping):
    """Tensor names known up front, each tensor read from its file when first asked for.

    Used for safetensors files and sharded checkpoints, so that a whole model's file yields its
    input layer without reading the rest. `files` maps each name to the file holding it; each file
    is checked to be a regular file before it is first opened.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files
        self._torch: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._checked: set[Path] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._file(key)
        if path.suffix.lower() != ".safetensors":  # a torch shard: read once (memory-mapped)
            if path not in self._torch:
                self._torch[path] = read_state_dict(path)[0]
            if key not in self._torch[path]:
                raise WeightsError(f"{path}: has no tensor {key!r}, though its index says so")
            return self._torch[path][key]
        return self._safetensors(path, key, lambda f: f.get_tensor(key))

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape; from a safetensors file, without reading the tensor."""
        path = self._file(key)
        if path.suffix.lower() != ".safetensors":
            return tuple(self[key].shape)
        return tuple(self._safetensors(path, key, lambda f: f.get_slice(key).get_shape()))

    def _file(self, key: str) -> Path:
        path = self._files[key]
        if path not in self._checked:
            regular_file(path)
            self._checked.add(path)
        return path

    @staticmethod
    def _safetensors(path: Path, key: str, read: Callable[[Any], Any]) -> Any:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return read(f)
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

    Raises:
        WeightsError: missing, not a regular file, compressed, corrupt, or a pickle of code.
    """
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    regular_file(path)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    try:
        is_zip = read_head(path, 4) == ZIP_MAGIC
    except NotRegularFile as exc:
        raise WeightsError(f"{path}: {exc}; weights must be a regular file") from None
    problem = compressed_record(path) if is_zip else None
    if problem:
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what counts
            # mmap: a whole model's checkpoint gives its input layer without being read in full.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise WeightsError(_refusal(path, str(exc))) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint: {one_line(exc)}") from None
    return _tensors(path, obj)


def _tensors(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict in what torch.load gave (bare, or under "state_dict" / "model"), and the rest."""
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


# --------------------------------------------------------------------------- folders' files


def read_weight_file(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a weights file, or of the shards a `*.index.json` names (read lazily)."""
    if not path.name.endswith(".index.json"):
        return read_state_dict(path)[0]
    return LazyTensors({k: path.parent / v for k, v in read_index(path).items()})


def read_index(path: Path) -> dict[str, str]:
    """A shard index's `weight_map`: tensor name -> shard file, each a plain name inside the index's folder.

    Raises:
        WeightsError: no weight_map, or an entry that is absolute or climbs out (`..`) of the folder.
    """
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{path}: not a shard index with a 'weight_map'")
    for key, name in weight_map.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) and name and "\0" not in name else ("..",)
        if parts[0] == "/" or ".." in parts or "\\" in str(name):
            raise WeightsError(f"{path}: weight_map sends {key!r:.60} to {name!r:.60}, outside its folder; "
                               "index entries must be file names inside it")
        if name.lower().endswith(".json"):  # the index itself, or a config: read as a shard it would
            what = "the index itself" if name == path.name else "a JSON file"
            raise WeightsError(f"{path}: weight_map sends {key!r:.60} to {name!r:.60}, {what}, not a shard of "
                               "weights")
    return weight_map


_MAX_JSON_BYTES = 64 << 20  # the shard index of the largest models is a few MB


def read_json(path: Path) -> dict[str, Any]:
    """A folder's JSON file (a config, a shard index) as a dict; {} when there is none.

    Raises:
        WeightsError: not a regular file, over 64 MiB, or not valid JSON.
    """
    if not os.path.lexists(path):
        return {}
    try:
        with open_regular(path) as f:
            raw = f.read(_MAX_JSON_BYTES + 1)
    except NotRegularFile as exc:
        raise WeightsError(f"{path}: {exc}; a config must be a regular file") from None
    if len(raw) > _MAX_JSON_BYTES:
        raise WeightsError(f"{path}: over {_MAX_JSON_BYTES >> 20} MiB, too large for a config or a shard index")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise WeightsError(f"{path}: not valid JSON: {one_line(exc)}") from None
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- layer files


def is_layer_file(meta: dict[str, Any] | None) -> bool:
    """Whether a file's metadata (from `read_state_dict`) marks a vitembed layer file."""
    return isinstance(meta, dict) and meta.get("format") == LAYER_FORMAT


def read_layer_file(path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> LoadedWeights:
    """A vitembed layer file's weights, from what `read_state_dict` gave for it.

    Its config is checked against its tensors before anything is built: a config that claims
    another size than the tensors have is refused, never shown (`info`) nor allocated (`encode`).
    """
    version = meta.get("version")
    if str(version) != str(LAYER_VERSION):  # a .pt file says 1, a .safetensors one "1"
        raise WeightsError(f"{path}: layer file version {version!r:.40}; this vitembed reads version {LAYER_VERSION}")
    raw = meta.get("config")
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"config is a {type(raw).__name__}, not a dict")
        for key, kind in (("class_token", bool), ("pos_embed_prefix", bool), ("num_reg_tokens", int),
                          ("dist_token", bool), ("conv_bias", bool), ("pos_table", bool)):
            if key in raw and (type(raw[key]) is not kind):
                raise ConfigError(f"{key} is {raw[key]!r:.40}, not {'true or false' if kind is bool else 'a whole number'}")
        config = LayerConfig.from_dict(dict(raw))
    except (TypeError, ValueError, ConfigError) as exc:
        raise WeightsError(f"{path}: bad layer config: {one_line(exc)}") from None
    check_layer(config, state, str(path))
    return LoadedWeights(config, {k: state[k] for k in layer_shapes(config)}, source="vitembed layer file")


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

