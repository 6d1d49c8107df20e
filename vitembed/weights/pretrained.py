"""Named pretrained weights: `torchvision:NAME[.WEIGHTS]`, `timm:MODEL[.TAG]`, `hf:ORG/REPO`.

Each is fetched through its library's own cache (torch hub's `$TORCH_HOME/hub/checkpoints`, the
Hugging Face cache); only the weight files are downloaded, then read like any other checkpoint
(`files/writes.py`: weights_only=True or safetensors), and the weights' preprocessing becomes the
default (`checkpoints.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import (
    WEIGHT_FILES,
    convert_state_dict,
    find_input_layer,
    folder_hints,
    folder_preprocess,
    timm_preprocess,
    torchvision_preprocess,
)
from ..errors import WeightsError, one_line
from .files import LoadedWeights, read_index, read_state_dict, read_weight_file

__all__ = ["PRETRAINED_SCHEMES", "is_pretrained_name", "load_pretrained"]

PRETRAINED_SCHEMES = ("torchvision:", "timm:", "hf:")


def is_pretrained_name(spec: str) -> bool:
    return any(spec.startswith(s) and len(spec) > len(s) for s in PRETRAINED_SCHEMES)


def load_pretrained(spec: str) -> LoadedWeights:
    """`torchvision:NAME[.WEIGHTS]`, `timm:MODEL[.TAG]` or `hf:ORG/REPO`, through the libraries' caches.

    Raises:
        WeightsError: unknown name, missing optional package, or no network and nothing cached.
    """
    scheme, _, name = spec.partition(":")
    if scheme == "torchvision":
        return _torchvision(name, spec)
    if scheme == "timm":
        return _timm(name, spec)
    return _hf(name, spec)


def _torchvision(name: str, spec: str) -> LoadedWeights:
    import torchvision
    from torchvision.models import vision_transformer

    model, _, tag = name.partition(".")
    vit_names = sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vit_"))
    if model not in vit_names:
        raise WeightsError(f"{spec}: unknown torchvision ViT {model!r}; choose one of {', '.join(vit_names)}")
    enum = torchvision.models.get_model_weights(model)
    assert enum.__module__ == vision_transformer.__name__
    if tag:
        try:
            weights = enum[tag]
        except KeyError:
            raise WeightsError(f"{spec}: {enum.__name__} has no {tag!r}; choose one of "
                               f"{', '.join(w.name for w in enum)} (or none for DEFAULT)") from None
    else:
        weights = enum.DEFAULT
    path = _torch_hub_file(weights.url, spec)
    loaded = convert_state_dict(read_state_dict(path)[0], spec)
    loaded.source = f"torchvision {enum.__name__}.{weights.name} ({loaded.source})"
    loaded.preprocess = torchvision_preprocess(weights.transforms())
    return loaded


def _torch_hub_file(url: str, spec: str) -> Path:
    """The file at `url` in torch hub's checkpoint cache ($TORCH_HOME/hub/checkpoints), downloaded once."""
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    folder = Path(get_dir()) / "checkpoints"
    path = folder / os.path.basename(url.split("?")[0])
    if not path.is_file():
        match = HASH_REGEX.search(path.name)
        host = _unreachable(url)
        if host is not None:
            raise WeightsError(f"{spec}: cannot download {url} ({host} cannot be reached); check the network, "
                               f"or put the file at {path}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            download_url_to_file(url, str(path), match.group(1) if match else None, progress=False)
        except Exception as exc:  # urllib, socket and hash errors alike: nothing usable arrived
            raise WeightsError(f"{spec}: cannot download {url} ({one_line(exc)}); check the network, "
                               f"or put the file at {path}") from None
    return path


def _timm(name: str, spec: str) -> LoadedWeights:
    try:
        import timm  # noqa: F401  (registers the models)
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise WeightsError(f"{spec}: needs timm (pip install 'vitembed[pretrained]')") from None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:
        raise WeightsError(f"{spec}: {one_line(exc)}") from None
    if cfg is None:
        raise WeightsError(f"{spec}: timm has no pretrained weights named {name!r} (see timm.list_pretrained())")
    cfg = cfg.to_dict()
    if cfg.get("hf_hub_id"):
        repo = cfg["hf_hub_id"]
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else ("model.safetensors", "pytorch_model.bin")
        path = _hf_file(repo, files, spec)
    elif cfg.get("url"):
        path = _torch_hub_file(cfg["url"], spec)
    else:
        raise WeightsError(f"{spec}: timm's config for {name!r} names no file to download")
    if path.suffix == ".npz":
        raise WeightsError(f"{spec}: its weights are a JAX .npz file, which vitembed does not read; "
                           "load the model with timm and save its state_dict() as .safetensors")
    loaded = convert_state_dict(read_state_dict(path)[0], spec)
    tag = cfg.get("tag")
    loaded.source = f"timm {cfg.get('architecture', name)}{'.' + tag if tag else ''} ({loaded.source})"
    loaded.preprocess = timm_preprocess(cfg, spec)  # its input_size is its table's grid: nothing to resample
    return loaded


def _hf(repo: str, spec: str) -> LoadedWeights:
    weights = _hf_file(repo, WEIGHT_FILES, spec)
    folder = weights.parent
    for extra in ("config.json", "preprocessor_config.json"):
        try:
            _hf_file(repo, (extra,), spec)
        except WeightsError:
            pass  # optional
    if weights.name.endswith(".index.json"):
        for shard in _shards_for_input_layer(read_index(weights)):
            _hf_file(repo, (shard,), spec)  # only the shards that hold the input layer
    loaded = convert_state_dict(read_weight_file(weights), spec, folder_hints(folder))
    loaded.source = f"hf {repo} ({loaded.source})"
    loaded.preprocess, loaded.image_size = folder_preprocess(folder)
    return loaded


def _shards_for_input_layer(weight_map: dict[str, str]) -> list[str]:
    """The shard files that hold the input layer's tensors (all of them when none is recognised)."""
    found = find_input_layer(list(weight_map))
    if len(found) != 1:
        return sorted(set(weight_map.values()))
    layout, prefix = found[0]
    return sorted({weight_map[prefix + k] for k in layout.keys() if prefix + k in weight_map})


def _hf_file(repo: str, names: tuple[str, ...], spec: str) -> Path:
    """The first of `names` that the Hub repo has, from (or into) the HF cache.

    Files already cached are tried first; a file neither cached nor reachable ends the search at
    once (huggingface_hub has already retried), a file the repo lacks moves on to the next name.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub import errors as hub_errors
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise WeightsError(f"{spec}: needs huggingface_hub (pip install 'vitembed[pretrained]')") from None
    cached = [n for n in names if isinstance(_quiet(try_to_load_from_cache, repo, n), str)]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    from huggingface_hub import constants

    host = None if offline else _unreachable(constants.ENDPOINT)
    logger = hub_logging.get_logger("huggingface_hub")
    level = logger.level
    logger.setLevel("ERROR")  # its retry warnings would bury our one line
    try:
        for name in [*cached, *(n for n in names if n not in cached)]:
            try:  # unreachable: the cache alone, at once (the library would retry for half a minute)
                return Path(hf_hub_download(repo, name, local_files_only=host is not None))
            except hub_errors.LocalEntryNotFoundError:
                why = "HF_HUB_OFFLINE is set" if offline else f"the Hub ({host or 'its address'}) cannot be reached"
                raise WeightsError(f"{spec}: {name} of {repo} is not in the Hugging Face cache and {why}; "
                                   "check the network (or HF_HUB_CACHE)") from None
            except hub_errors.EntryNotFoundError:
                continue  # the repo has no such file: try the next name
            except Exception as exc:  # unknown or gated repo, HTTP errors, a bad repo id
                raise WeightsError(f"{spec}: cannot fetch {repo}: {one_line(exc)}") from None
    finally:
        logger.setLevel(level)
    raise WeightsError(f"{spec}: {repo} has none of {', '.join(names)}")


def _quiet(func, *args):
    try:
        return func(*args)
    except Exception:  # a malformed repo id: hf_hub_download will say so
        return None


_REACH_SECONDS = 2.0  # how long a download waits to learn that its server cannot be reached
_reached: dict[str, str | None] = {}


def _unreachable(url: str) -> str | None:
    """The host of `url` ("host:port") if no connection to it opens within `_REACH_SECONDS` (name
    lookup included), else None; asked once per process and host. Without it, an offline machine
    waits for the libraries' retries (half a minute) before the one line that says so."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"{parts.hostname}:{port}"
    if host in _reached:
        return _reached[host]
    opened = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=_REACH_SECONDS).close()
            opened.set()
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(_REACH_SECONDS)
    _reached[host] = None if opened.is_set() else host
    return _reached[host]
