"""One encode request: every option of `vitembed encode`, in parts, checked together in one place.

`EncodeRequest` is built once, by `EncodeRequest.from_options`, from the command line's options or
from the keyword arguments of `vitembed.encode` (the same names), and is frozen from then on. Its
parts are what each part of the program needs: the layer (`LayerOptions`), the preprocessing
(`ImageOptions`), the output (`OutputOptions`), where the layer runs (`ExecutorOptions`), and how
the run goes (`runoptions.EncodeOptions`, with `RayOptions` for `--ray`). `vitembed show`, `info`
and `init` build the layer and preprocessing parts alone.

Every rule that the options decide by themselves is checked here, when a part is built (the
`_check_*` functions below), so that the library refuses what the command line refuses, with the
same message; that includes what a run on Ray cannot do (`_check_ray`). The rules that need more
than the options (the weights' shape, the output plan, the built encoder) are checked once, after
the encoder is built and before anything is written: `skeleton.check` and `raydriver.check`.

Light to import (no numpy): `info` and `show` build their parts while `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..choices import NORMALIZATIONS, POS_RESAMPLES, TOKENS, unknown
from ..layer.config import LayerConfig, check_divisible, parse_image_size, preset_preprocess, resolve_config
from ..errors import ConfigError
from .runoptions import DECODE_TIMEOUT, EncodeOptions, RayOptions


__all__ = ["EncodeRequest", "ExecutorOptions", "ImageOptions", "InputOptions", "LayerOptions", "OutputOptions",
           "actor_engine", "encoder_option_names"]

MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits


@dataclass(frozen=True)
class LayerOptions:
    """The layer: `preset`, `image_size` (a side, "HxW" or (H, W)), `patch_size` (or
    `num_patch_row`), `emb_dim`, `in_channels`, `seed` and `pos_init` (normal, or sincos: MAE's
    fixed table) for a random layer; or `weights` (a file, folder or pretrained name), which fixes
    D and C (`image_size` resamples the position embedding, `patch_size` the patch embedding too,
    as `pos_resample` says: None, as the checkpoint's own library does; timm, hf, torchvision or
    dinov2). `tokens`: z0, z0-before-norm, patches or patches+pos."""

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

    def __post_init__(self) -> None:
        _check_layer(self)

    def config(self) -> LayerConfig:
        """The shape of the random layer these options ask for (without `weights`)."""
        return resolve_config(self.preset, image_size=self.image_size, patch_size=self.patch_size,
                              num_patch_row=self.num_patch_row, emb_dim=self.emb_dim, in_channels=self.in_channels)

    def load(self, *, native: bool = False) -> tuple[Any, str, list[str], dict]:
        """The layer: (the layer, its source, notices for the user, the weights' preprocessing).

        Without `weights` it is the random layer of `seed`, as `LayerParams` (from the cache of random
        layers when it can, so that no torch is needed); with `weights`, the `LoadedWeights`, resized
        as `image_size` and `patch_size` say (`checkpoints.resize_weights`, E_pos as `pos_resample`
        says, or as the checkpoint's own library does). Without `image_size`, the weights' own
        preprocessing's input size (an HF processor's crop) is taken where it has one. With `native`
        (`--resize native`) the weights keep their own grid, from which each image's is resampled:
        `image_size` then only sets the default --max-patches.
        """
        if self.weights is None:
            from ..weights.cache import random_layer_params

            source = f"random, seed {self.seed}" + (f", E_pos {self.pos_init}" if self.pos_init != "normal" else "")
            return (random_layer_params(self.config(), self.seed, self.pos_init), source, [],
                    preset_preprocess(self.preset))
        loaded = _load_weights(self, native)
        return loaded, loaded.source, list(loaded.notes), dict(loaded.preprocess)


@dataclass(frozen=True)
class ImageOptions:
    """The preprocessing: `resize` (squash, crop, pad, squash-crop, or native with `max_patches`), `crop_pct`,
    `interpolation`, `background`, `normalize`, `max_pixels`, `fast_decode` (None: the weights'
    own, else vitembed's defaults)."""

    resize: str | None = None
    max_patches: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    background: str | tuple[int, int, int] = "white"
    normalize: str | None = None
    max_pixels: int | None = None
    fast_decode: bool = False

    def __post_init__(self) -> None:
        _check_images(self)

    def preprocess(self, config: LayerConfig, weights_prep: dict, layer: LayerOptions | None = None):
        """The `Preprocess`: these options, then the weights' own, then vitembed's defaults; `layer`'s
        --image-size (or --num-patch-row) sets --resize native's default --max-patches."""
        from ..images.decode import NORMALIZATIONS as STATS, Preprocess, parse_color

        fields = dict(weights_prep)
        if self.normalize is not None:
            fields["mean"], fields["std"] = STATS[self.normalize]
        user = {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "max_pixels": self.max_pixels}
        fields.update({k: v for k, v in user.items() if v is not None})
        if self.resize == "native":
            fields.update(max_patches=self._max_patches(config, layer or LayerOptions()), patch_size=config.patch_size)
        background = parse_color(self.background) if isinstance(self.background, str) else tuple(self.background)
        return Preprocess(image_size=config.image_size, image_width=config.image_width, channels=config.in_channels,
                          background=background, fast_decode=self.fast_decode, **fields)

    def _max_patches(self, config: LayerConfig, layer: LayerOptions) -> int:
        """--max-patches; else N of --image-size (or --num-patch-row) at the layer's P; else the layer's N."""
        if self.max_patches is not None:
            return self.max_patches
        p = config.patch_size
        size = parse_image_size(layer.image_size) or ((layer.num_patch_row * p,) * 2 if layer.num_patch_row else None)
        if size is None:
            return config.num_patches
        check_divisible(size, p)
        return (size[0] // p) * (size[1] // p)


@dataclass(frozen=True)
class OutputOptions:
    """The outputs: `path` (-o: None, beside each input; a folder; FILE.npy / FILE.pt; "-" for
    stdout; on Ray, a URI), `format` and `dtype` (float32, float16 or bfloat16, or an alias)."""

    path: str | None = None
    format: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from ..files.formats import output_dtype

        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "dtype", output_dtype(self.dtype))

    def plan(self):
        """A fresh `OutputPlan` for a run (it claims the names of the run's outputs)."""
        from .plan import OutputPlan

        return OutputPlan.from_option(self.path, self.format)


@dataclass(frozen=True)
class InputOptions:
    """How datasets among the inputs are read: a Parquet table's `image_column` (None: the first of
    image bytes) and `key_column` (None: rows by number); see `tables`."""

    image_column: str | None = None
    key_column: str | None = None


@dataclass(frozen=True)
class ExecutorOptions:
    """Where the layer runs: `engine` (auto, numpy or torch) and `device` on this machine; with
    `--ray` (`EncodeRequest.run.ray`), on the actors: `engine` there too (`RayOptions.engine`),
    the device as --ray-gpus says."""

    engine: str = "auto"
    device: str = "auto"


_PARTS = (("output", OutputOptions), ("layer", LayerOptions), ("preprocessing", ImageOptions),
          ("executor", ExecutorOptions), ("inputs", InputOptions))
_RAY_FLAGS = {"ray_address": ("--ray-address", None), "ray_gpus": ("--ray-gpus", 0.0),
              "ray_cpus": ("--ray-cpus", 1.0), "ray_actors": ("--ray-actors", None)}


@dataclass(frozen=True)
class EncodeRequest:
    """Everything `vitembed encode` takes besides its inputs, in parts (see `vitembed encode --help`):
    `layer`, `preprocessing`, `output`, `executor`, `run` (`EncodeOptions`: decode, batch size,
    workers, skip-existing, overwrite, shards, decode timeout, and `ray`), and `inputs` (datasets' columns)."""

    layer: LayerOptions = dataclasses.field(default_factory=LayerOptions)
    preprocessing: ImageOptions = dataclasses.field(default_factory=ImageOptions)
    output: OutputOptions = dataclasses.field(default_factory=OutputOptions)
    executor: ExecutorOptions = dataclasses.field(default_factory=ExecutorOptions)
    run: EncodeOptions = dataclasses.field(default_factory=EncodeOptions)
    inputs: InputOptions = dataclasses.field(default_factory=InputOptions)

    def __post_init__(self) -> None:
        _check_request(self)

    @classmethod
    def from_options(cls, **options) -> EncodeRequest:
        """From flat keyword arguments, the command line's names: `output` (-o), `format`, `dtype`;
        the fields of `LayerOptions`, `ImageOptions`, `ExecutorOptions` and `EncodeOptions`; `ray`
        (True, or `RayOptions`) with `ray_address`, `ray_gpus`, `ray_cpus`, `ray_actors`.

        Raises:
            ConfigError: options that cannot work together; TypeError: a name that is none of these.
        """
        options = dict(options)
        ray = _ray_options(options.pop("ray", None), {k: options.pop(k, d) for k, (_, d) in _RAY_FLAGS.items()},
                           options.get("engine", "auto"))
        run_names = {f.name for f in dataclasses.fields(EncodeOptions)} - {"ray"}
        run = EncodeOptions(**{k: options.pop(k) for k in run_names & options.keys()}, ray=ray)
        if "output" in options:
            options["path"] = options.pop("output")
        parts = {name: part(**{f.name: options.pop(f.name) for f in dataclasses.fields(part) if f.name in options})
                 for name, part in _PARTS}
        if options:
            raise TypeError(f"not an encode option: {', '.join(sorted(options))}")
        return cls(**parts, run=run)

    def datasets(self, on_passed_over=None):
        """How tar shards and Parquet tables among the inputs are read (`inputs.Datasets`): an
        image held at most `decode.max_file_bytes` of --max-pixels."""
        from ..images.decode import DEFAULT_MAX_PIXELS
        from ..images.inputs import Datasets

        limit = 4 * (self.preprocessing.max_pixels or DEFAULT_MAX_PIXELS)
        extra = {} if on_passed_over is None else {"on_passed_over": on_passed_over}
        return Datasets(limit, self.inputs.image_column, self.inputs.key_column, **extra)

    def build_encoder(self, engine: str, device: str):
        """(the Encoder of these options on `engine` and `device`, where its layer came from, notices)."""
        from ..encoder import Encoder

        layer, source, notes, weights_prep = self.layer.load(native=self.preprocessing.resize == "native")
        prep = self.preprocessing.preprocess(layer.config, weights_prep, self.layer)
        encoder = Encoder(layer, prep, engine=engine, device=device, dtype=self.output.dtype, tokens=self.layer.tokens,
                          pos_resample=self.layer.pos_resample)  # None: the checkpoint library's own
        return encoder, source, notes

    def encoder(self):
        """The run's Encoder, the run configuration run.json records (what decides the outputs'
        bytes), and notices. On Ray the driver only plans: its Encoder is numpy's on its CPU, and
        gives the actors its parameters and preprocessing (they run `run.ray.engine`)."""
        from ..layer.kernel import fingerprint

        on_ray = self.run.ray is not None
        encoder, source, notes = self.build_encoder("numpy" if on_ray else self.executor.engine,
                                                    "cpu" if on_ray else self.executor.device)
        prep_record = {k: list(v) if isinstance(v, tuple) else v for k, v in encoder.prep.to_dict().items()
                       if k != "max_pixels"}  # a limit on inputs, not on the outputs' bytes
        config = {  # run.json's configuration, as `folder.RUN_SCHEMA` says; an -o folder compares it
            "layer": dataclasses.asdict(encoder.config),
            "weights": {"source": source, "fingerprint": fingerprint(encoder.params.state_dict())},
            "preprocess": prep_record,
            "format": None,  # set with the output plan
            "dtype": self.output.dtype,
            "shard_size": self.run.shard_size,
            "tokens": self.layer.tokens,
            "pos_resample": encoder.pos_resample,
            "steps": encoder.config.steps(),  # the layer's steps in words (pre-norm, no table, ...)
        }
        return encoder, config, notes


def encoder_option_names() -> set[str]:
    """The options that decide an Encoder's tokens (`vitembed.ray.encoder_args`'): the layer's, the
    preprocessing's, `dtype` and `engine`."""
    return {f.name for part in (LayerOptions, ImageOptions) for f in dataclasses.fields(part)} | {"dtype", "engine"}


# The rules between options, each with the message the command line gives.

def _check_layer(layer: LayerOptions) -> None:
    if not 0 <= layer.seed <= MAX_SEED:
        raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {layer.seed}")
    for name, value, allowed in (("--tokens", layer.tokens, TOKENS), ("--pos-resample", layer.pos_resample, POS_RESAMPLES)):
        if value not in allowed and not (name == "--pos-resample" and value is None):
            raise ConfigError(unknown(name, value, allowed))
    if layer.weights is None:
        return
    if layer.pos_init != "normal":
        raise ConfigError("--pos-init applies to a random layer; --weights brings its own E_pos: drop one of them")
    if layer.preset is not None:
        raise ConfigError("--weights fixes the layer shape; drop --preset")
    if layer.num_patch_row is not None and (layer.image_size is not None or layer.patch_size is not None):
        raise ConfigError("give --num-patch-row alone with --weights, or --image-size and --patch-size")


def _check_images(images: ImageOptions) -> None:
    if images.max_patches is not None and images.resize != "native":
        raise ConfigError(f"--max-patches {images.max_patches} is for --resize native (the image's own grid); "
                          "add --resize native or drop --max-patches")
    if images.normalize is not None and images.normalize not in NORMALIZATIONS:
        raise ConfigError(unknown("normalization", images.normalize, NORMALIZATIONS))


def _ray_options(ray: bool | RayOptions | None, flags: dict, engine: str) -> RayOptions | None:
    """`ray` and the --ray-* options as `RayOptions`, with the actors' engine (None without --ray;
    the --ray-* options alone are refused)."""
    given = [_RAY_FLAGS[name][0] for name, value in flags.items() if value != _RAY_FLAGS[name][1]]
    if not ray:
        if given:
            raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a run on Ray: add --ray")
        return None
    if isinstance(ray, RayOptions):
        if given:
            raise ConfigError(f"{', '.join(given)}: give them in RayOptions, or ray=True with them")
        return dataclasses.replace(ray, engine=engine)
    return RayOptions(address=flags["ray_address"], gpus=flags["ray_gpus"], cpus=flags["ray_cpus"],
                      actors=flags["ray_actors"], engine=engine)


def _check_request(request: EncodeRequest) -> None:
    """The rules between parts."""
    from ..files.uris import is_uri

    ray = request.run.ray
    if ray is not None and request.executor.device != "auto":
        raise ConfigError("--ray: the actors' device follows --ray-gpus (CUDA for actors with GPUs, else the "
                          "CPU); drop --device")
    if ray is None and is_uri(request.output.path):
        raise ConfigError(f"-o {request.output.path}: a URI output is written through pyarrow on a run with --ray; "
                          "add --ray, or give a local folder")
    if ray is not None:
        _check_ray(request)


def _check_ray(request: EncodeRequest) -> None:
    """What a cluster cannot do, as far as the options show it (`raydriver.check` has the rules
    that need the output plan or the encoder)."""
    run = request.run
    reasons = [
        (request.output.path == "-", "-o - writes one tensor to this process's stdout; give -o DIR"),
        (run.workers is not None, "--workers sets this machine's decoder processes; on Ray use "
                                  "--ray-cpus and --ray-actors"),
        (run.decode_timeout != DECODE_TIMEOUT, "--decode-timeout is not enforced on Ray (an actor's "
                                               "decode cannot be stopped alone); drop it"),
        (run.decode == "gpu", "--decode gpu has not run on Ray yet; drop it (--ray-gpus runs the "
                              "layer on the GPUs, JPEGs are decoded by Pillow)"),
    ]
    for refused, reason in reasons:
        if refused:
            raise ConfigError(f"--ray: {reason}")
    actor_engine(run.ray.engine, run.ray.gpus)


def actor_engine(engine: str, gpus: float) -> tuple[str, str]:
    """(engine, device) of a Ray actor: torch on CUDA where it holds a GPU (or a share of one),
    else `engine` (auto, numpy or torch) on its CPU."""
    if gpus <= 0:
        return engine, "cpu"
    if engine == "numpy":
        raise ConfigError("--engine numpy runs on the CPU, not on the GPUs of --ray-gpus; drop one of them")
    return "torch", "cuda"


def _load_weights(layer: LayerOptions, native: bool):
    """LoadedWeights for --weights; --image-size / --num-patch-row / --patch-size resample, D and C must agree."""
    from ..weights.checkpoints import resize_weights
    from ..weights.load import load_weights

    loaded = load_weights(layer.weights)
    cfg = loaded.config
    mismatched = [f"{flag} {value} (the weights have {actual})"
                  for flag, value, actual in (("--emb-dim", layer.emb_dim, cfg.emb_dim),
                                              ("--in-channels", layer.in_channels, cfg.in_channels))
                  if value is not None and value != actual]
    if mismatched:
        raise ConfigError(f"--weights fixes D and the channels; drop {'; '.join(mismatched)} "
                          "(--image-size and --patch-size may change: the embeddings are resampled)")
    p = layer.patch_size or cfg.patch_size
    if native:  # each image's grid is resampled from the weights' own
        size = (cfg.grid[0] * p, cfg.grid[1] * p)
    elif layer.num_patch_row is not None:
        size = (layer.num_patch_row * p,) * 2
    else:
        size = parse_image_size(layer.image_size) or loaded.image_size or cfg.size
    return resize_weights(loaded, size, p, layer.pos_resample)
