"""One encode request: every option of `vitembed encode`, checked together, and the run it makes.

`EncodeRequest` holds the options as a user gives them (the command line's, or keyword arguments
of `vitembed.encode`), and owns every rule between them, so that the library refuses what the
command line refuses, with the same message. `encode` runs a request over inputs: it is what
`vitembed encode` calls.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .choices import POS_RESAMPLES, TOKENS
from .config import LayerConfig, check_divisible, parse_image_size, preset_preprocess, resolve_config
from .errors import ConfigError
from .formats import output_dtype
from .pipeline import EncodeOptions

__all__ = ["EncodeRequest", "encode", "layer_from_options"]

MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits


@dataclass
class EncodeRequest:
    """Everything `vitembed encode` takes besides its inputs; see `vitembed encode --help`.

    Layer: `preset`, `image_size` (a side, "HxW" or (H, W)), `patch_size` (or `num_patch_row`),
    `emb_dim`, `in_channels`, `seed` and `pos_init` (normal, or sincos: MAE's fixed table) for a
    random layer; or `weights` (a file, folder or pretrained name), which fixes D and C
    (`image_size` resamples the position embedding, `patch_size` the patch embedding too, as
    `pos_resample` says: None, as the checkpoint's own library does; timm, hf, torchvision or
    dinov2). `tokens`: z0, z0-before-norm, patches or patches+pos.
    Images: `resize` (squash, crop, pad, squash-crop, or native with `max_patches`), `crop_pct`,
    `interpolation`, `background`, `normalize`, `max_pixels`, `fast_decode` (None: the weights'
    own, else vitembed's defaults).
    Outputs and compute: `output` (None: beside each input; a folder; FILE.npy / FILE.pt; "-" for
    stdout), `format`, `device`, `engine`, `dtype`; how the run goes: `run` (`EncodeOptions`:
    decode, batch size, workers, skip-existing, overwrite, shards, decode timeout).
    """

    preset: str | None = None
    image_size: int | str | tuple[int, int] | None = None
    patch_size: int | None = None
    num_patch_row: int | None = None
    emb_dim: int | None = None
    in_channels: int | None = None
    weights: str | None = None
    seed: int = 0
    pos_init: str = "normal"
    pos_resample: str | None = None
    tokens: str = "z0"
    resize: str | None = None
    max_patches: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    background: str | tuple[int, int, int] = "white"
    normalize: str | None = None
    max_pixels: int | None = None
    fast_decode: bool = False
    output: str | os.PathLike | None = None
    format: str | None = None
    device: str = "auto"
    engine: str = "auto"
    dtype: str = "float32"
    run: EncodeOptions = dataclasses.field(default_factory=EncodeOptions)

    @classmethod
    def from_options(cls, **options) -> EncodeRequest:
        """From flat keyword arguments (`vitembed.encode`'s): `EncodeOptions`' fields go to `run`."""
        names = {f.name for f in dataclasses.fields(EncodeOptions)}
        run = EncodeOptions(**{k: v for k, v in options.items() if k in names})
        return cls(**{k: v for k, v in options.items() if k not in names}, run=run)

    def __post_init__(self) -> None:
        self.dtype = output_dtype(self.dtype)
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.output is not None:
            self.output = os.fspath(self.output)
        for name, value, allowed in (("--tokens", self.tokens, TOKENS), ("--pos-resample", self.pos_resample, POS_RESAMPLES)):
            if value not in allowed and not (name == "--pos-resample" and value is None):
                raise ConfigError(f"unknown {name} {value!r}; choose {', '.join(allowed)}")
        if self.max_patches is not None and self.resize != "native":
            raise ConfigError(f"--max-patches {self.max_patches} is for --resize native (the image's own grid); "
                              "add --resize native or drop --max-patches")

    def layer(self) -> tuple[Any, str, list[str], dict]:
        """(the layer, where it came from, notices for the user, the weights' preprocessing)."""
        return layer_from_options(self.preset, self.image_size, self.patch_size, self.num_patch_row,
                                  self.emb_dim, self.in_channels, self.weights, self.seed, self.pos_init,
                                  self.pos_resample, native=self.resize == "native")

    def preprocess(self, config: LayerConfig, weights_prep: dict):
        """The preprocessing: the user's options, then the weights' own, then vitembed's defaults."""
        from .images import NORMALIZATIONS, Preprocess, parse_color

        fields = dict(weights_prep)
        if self.normalize is not None:
            if self.normalize not in NORMALIZATIONS:
                raise ConfigError(f"unknown normalization {self.normalize!r}; choose {', '.join(NORMALIZATIONS)}")
            fields["mean"], fields["std"] = NORMALIZATIONS[self.normalize]
        user = {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "max_pixels": self.max_pixels}
        fields.update({k: v for k, v in user.items() if v is not None})
        if self.resize == "native":
            fields.update(max_patches=self._max_patches(config), patch_size=config.patch_size)
        background = parse_color(self.background) if isinstance(self.background, str) else tuple(self.background)
        return Preprocess(image_size=config.image_size, image_width=config.image_width, channels=config.in_channels,
                          background=background, fast_decode=self.fast_decode, **fields)

    def _max_patches(self, config: LayerConfig) -> int:
        """--max-patches; else N of --image-size (or --num-patch-row) at the layer's P; else the layer's N."""
        if self.max_patches is not None:
            return self.max_patches
        p = config.patch_size
        size = parse_image_size(self.image_size) or ((self.num_patch_row * p,) * 2 if self.num_patch_row else None)
        if size is None:
            return config.num_patches
        check_divisible(size, p)
        return (size[0] // p) * (size[1] // p)

    def encoder(self):
        """The Encoder, and the run configuration run.json records (what decides the outputs' bytes)."""
        from .encoder import Encoder
        from .kernel import fingerprint

        layer, source, notes, weights_prep = self.layer()
        prep = self.preprocess(layer.config, weights_prep)
        method = self.pos_resample or getattr(layer, "pos_resample", "timm")  # the checkpoint library's own
        encoder = Encoder(layer, prep, engine=self.engine, device=self.device, dtype=self.dtype, tokens=self.tokens,
                          pos_resample=method)
        prep_record = {k: list(v) if isinstance(v, tuple) else v for k, v in prep.to_dict().items() if k != "max_pixels"}
        config = {
            "layer": encoder.config.to_dict(),
            "weights": {"source": source, "fingerprint": fingerprint(encoder.params.state_dict())},
            "preprocess": prep_record,
            "format": None,  # set with the output plan
            "dtype": self.dtype,
            # Only when set, so that folders written before these options existed still match.
            **({"shard_size": self.run.shard_size} if self.run.shard_size else {}),
            **({"tokens": self.tokens} if self.tokens != "z0" else {}),
            **({"pos_resample": method} if method != "timm" else {}),
            # The layer's steps in words, for a layer that is not seed-style (pre-norm, no table, ...).
            **({"steps": encoder.config.steps()} if encoder.config.to_dict().keys() - LayerConfig().to_dict().keys()
               else {}),
        }
        return encoder, config, notes


def layer_from_options(preset=None, image_size=None, patch_size=None, num_patch_row=None, emb_dim=None,
                       in_channels=None, weights=None, seed=0, pos_init="normal", pos_resample=None, *,
                       native=False) -> tuple[Any, str, list[str], dict]:
    """A layer from the layer options: (the layer, its source, notices, the weights' preprocessing).

    Without `weights` it is the random layer of `seed`, as `LayerParams` (from the cache of random
    layers when it can, so that no torch is needed); with `weights`, the `LoadedWeights`, resized
    as `image_size` and `patch_size` say (`checkpoints.resize_weights`, E_pos as `pos_resample`
    says, or as the checkpoint's own library does). Without `image_size`, the weights' own
    preprocessing's input size (an HF processor's crop) is taken where it has one. With `native` (`--resize native`) the weights keep their own grid, from which each
    image's is resampled: `image_size` then only sets the default --max-patches.
    """
    if weights is None:
        from .layercache import random_layer_params

        config = resolve_config(preset, image_size=image_size, patch_size=patch_size,
                                num_patch_row=num_patch_row, emb_dim=emb_dim, in_channels=in_channels)
        source = f"random, seed {seed}" + (f", E_pos {pos_init}" if pos_init != "normal" else "")
        return random_layer_params(config, seed, pos_init), source, [], preset_preprocess(preset)
    if pos_init != "normal":
        raise ConfigError("--pos-init applies to a random layer; --weights brings its own E_pos: drop one of them")
    loaded = _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels,
                           pos_resample, native)
    return loaded, loaded.source, list(loaded.notes), dict(loaded.preprocess)


def _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, pos_resample,
                  native):
    """LoadedWeights for --weights; --image-size / --num-patch-row / --patch-size resample, D and C must agree."""
    from .checkpoints import resize_weights
    from .weights import load_weights

    if preset is not None:
        raise ConfigError("--weights fixes the layer shape; drop --preset")
    if num_patch_row is not None and (image_size is not None or patch_size is not None):
        raise ConfigError("give --num-patch-row alone with --weights, or --image-size and --patch-size")
    loaded = load_weights(weights)
    cfg = loaded.config
    mismatched = [f"{flag} {value} (the weights have {actual})"
                  for flag, value, actual in (("--emb-dim", emb_dim, cfg.emb_dim), ("--in-channels", in_channels,
                                                                                       cfg.in_channels))
                  if value is not None and value != actual]
    if mismatched:
        raise ConfigError(f"--weights fixes D and the channels; drop {'; '.join(mismatched)} "
                          "(--image-size and --patch-size may change: the embeddings are resampled)")
    p = patch_size or cfg.patch_size
    if native:  # each image's grid is resampled from the weights' own
        size = (cfg.grid[0] * p, cfg.grid[1] * p)
    elif num_patch_row is not None:
        size = (num_patch_row * p,) * 2
    else:
        size = parse_image_size(image_size) or loaded.image_size or cfg.size
    return resize_weights(loaded, size, p, pos_resample)


def encode(inputs: str | os.PathLike | Iterable[str | os.PathLike], output: str | os.PathLike | None = None, *,
           on_result: Callable | None = None, stop: threading.Event | None = None, null: bool = False,
           stdin=None, stdout=None, on_notice: Callable[[str], None] | None = None, **options):
    """Encode image files and folders, as `vitembed encode` does; returns the run's `Summary`.

    Args:
        inputs: files, folders (walked recursively), or "-" to read paths from `stdin`: one path
            (a str or os.PathLike) or an iterable of them.
        output: None (beside each input), a folder, FILE.npy / FILE.pt (one input), or "-".
        on_result: called with each input's outcome (`Written`, `Failed`, `Skipped`) as it finishes.
        stop: set it to stop the run early; every output written is whole.
        null: paths on stdin are NUL-separated.
        on_notice: called with one-line notices (a resampled position embedding, ...).
        **options: the fields of `EncodeRequest` (preset, weights, dtype, workers, ...).

    Raises:
        ConfigError: options that cannot work together, or an -o folder of another configuration.
        WeightsError: weights that cannot be read.
    """
    from .inputs import iter_sources
    from .outputs import OutputPlan

    notice = on_notice or (lambda text: None)
    inputs = input_paths(inputs)
    request = EncodeRequest.from_options(output=output, **options)
    _check_uris(inputs, request)
    plan = OutputPlan.from_option(request.output, request.format)
    request, runner = _runner(request, plan)
    if inputs.count("-") > 1:
        raise ConfigError("- (read paths from stdin) may be given once")
    stdin = stdin if stdin is not None else (sys.stdin.buffer if "-" in inputs else None)
    own_outputs = _OwnOutputs(notice)
    sources = iter_sources(inputs, stdin, null, on_own_output=own_outputs, uris=request.run.ray is not None)
    if plan.mode in ("file", "stdout"):
        sources = list(sources)
        own_outputs.tell()
        if len(sources) != 1:
            raise ConfigError(f"-o {output} takes exactly one input image, got {len(sources)}")
    encoder, config, notes = request.encoder()
    for note in notes:
        notice(note)
    runner.check(encoder, plan, request.run)
    config["format"] = plan.fmt
    ray = request.run.ray
    folder = _folder(plan, config, encoder.device if ray is None else f"ray:{'cuda' if ray.gpus else 'cpu'}",
                     request.run.overwrite)
    report = on_result or (lambda outcome: None)

    def record(outcome) -> None:
        if folder is not None:
            folder.record(outcome)
        report(outcome)

    try:
        summary = runner.run(sources, encoder, plan, request.run, on_result=record, stop=stop, stdout=stdout,
                             made_from=folder.made_from if folder is not None else None)
    finally:
        if folder is not None:
            folder.close()
    own_outputs.tell()
    return summary


def input_paths(inputs) -> list[str]:
    """`encode`'s inputs as a list of str paths: one str or os.PathLike is one input (never its
    characters: "." would walk the current folder); anything else must be an iterable of them.

    Raises:
        ConfigError: bytes, a mapping, a number, or an iterable holding anything but str paths.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    elif isinstance(inputs, (bytes, bytearray, memoryview, Mapping)) or not isinstance(inputs, Iterable):
        raise ConfigError(f"inputs must be a path or an iterable of paths (str or os.PathLike), "
                          f"got {type(inputs).__name__}")
    paths = []
    for item in inputs:
        path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else item
        if not isinstance(path, str):
            raise ConfigError(f"inputs must be a path or an iterable of paths (str or os.PathLike), "
                              f"got an item of type {type(path).__name__}")
        paths.append(path)
    return paths


def _check_uris(inputs: list[str], request: EncodeRequest) -> None:
    """URIs are read and written through pyarrow on Ray only; a URI input's tokens need -o."""
    from .uris import is_uri

    if is_uri(request.output) and request.run.ray is None:
        raise ConfigError(f"-o {request.output}: a URI output is written through pyarrow on a run with --ray; "
                          "add --ray, or give a local folder")
    uri = next((i for i in inputs if is_uri(i)), None)
    if uri is not None and request.run.ray is not None and request.output is None:
        raise ConfigError(f"{uri}: the tokens of a URI input are not written beside it; give -o DIR or -o URI")


def _runner(request: EncodeRequest, plan):
    """(the request, the module whose `check` and `run` drive it): `pipeline` on this machine, or
    `raydriver` with `run.ray`. On Ray the driver only plans: its Encoder is numpy's on its CPU
    (its parameters and preprocessing go to the actors), and the actors' engine is --engine's."""
    from . import pipeline

    ray = request.run.ray
    if ray is None:
        return request, pipeline
    from . import raydriver

    raydriver.require_ray()
    raydriver.refuse(plan, request.run)
    if request.device != "auto":
        raise ConfigError("--ray: the actors' device follows --ray-gpus (CUDA for actors with GPUs, else the "
                          "CPU); drop --device")
    run = dataclasses.replace(request.run, ray=dataclasses.replace(ray, engine=request.engine))
    return dataclasses.replace(request, engine="numpy", device="cpu", run=run), raydriver


def _folder(plan, config: dict, device: str, overwrite: bool):
    """-o DIR's OutputFolder, -o URI's UriFolder (None for other outputs)."""
    from .folder import OutputFolder, UriFolder, run_record

    if plan.mode != "dir":
        return None
    if plan.store is not None:
        return UriFolder(plan.store, config, run_record(config, device), plan.relative, overwrite=overwrite)
    return OutputFolder(plan.target, config, run_record(config, device), plan.relative, overwrite=overwrite)


class _OwnOutputs:
    """vitembed's own outputs among the inputs (`photos/*` over a folder it wrote into): passed
    over, and told in one note."""

    def __init__(self, notice: Callable[[str], None]) -> None:
        self.notice, self.count, self.first = notice, 0, None

    def __call__(self, path) -> None:
        self.count += 1
        self.first = self.first or path

    def tell(self) -> None:
        if self.count:
            from .outcomes import display_path

            more = f" and {self.count - 1} more" if self.count > 1 else ""
            self.notice(f"passed over {display_path(self.first)}{more}: .npy/.pt files are vitembed's outputs, "
                        "not images")
            self.count = 0
