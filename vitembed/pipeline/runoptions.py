"""How a run goes (`EncodeOptions`, with `RayOptions` for `--ray`): the run part of an
`request.EncodeRequest`, each count and choice checked when it is built. What a run computes is
the `Encoder`'s; where its outputs go, the `plan.OutputPlan`'s.

Light to import (no numpy): the request builds it while `--help` stays fast.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..choices import DECODES, unknown
from ..errors import ConfigError

__all__ = ["DECODE_TIMEOUT", "EncodeOptions", "RayOptions"]

DECODE_TIMEOUT = 120.0  # seconds; far above any sane decode: a hung decoder must not stall the run


@dataclass
class RayOptions:
    """How a run goes on a Ray cluster (`--ray`; the driver is `raydriver.run`).

    Attributes:
        address: the cluster to join: auto, host:port or ray://host:10001 (None: $RAY_ADDRESS,
            else a local cluster started for the run and stopped after it).
        gpus: GPUs per actor, fractions allowed; more than 0 runs the layer with torch on CUDA.
        cpus: CPUs per actor, fractions allowed.
        actors: the most actors to start (None: as many as the cluster's CPUs, or GPUs, hold).
        engine: the actors' engine (`--engine`; with GPUs, torch).
    """

    address: str | None = None
    gpus: float = 0.0
    cpus: float = 1.0
    actors: int | None = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        for name, value in (("--ray-gpus", self.gpus), ("--ray-cpus", self.cpus)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number of at least 0, got {value}")
        if self.gpus == 0 and self.cpus == 0:
            raise ConfigError("--ray-cpus 0 needs --ray-gpus: an actor must hold some CPU or GPU")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be at least 1, got {self.actors}")


# (field, least, most) of EncodeOptions' counts. The upper bounds keep a typo from sizing shared
# memory and process tables by it (the pool's bookkeeping grows with the batch and the workers):
# 4096 images of 224 px are 600 MB of pixels per batch; 1024 decoders are far more than any host's cores.
_COUNTS = (("batch_size", 1, 4096), ("workers", 0, 1024), ("writers", 1, 1024), ("shard_size", 1, 1 << 20))


@dataclass
class EncodeOptions:
    """How a run goes (what it computes is the `Encoder`'s).

    Attributes:
        decode: where JPEGs are decoded and resized. cpu: Pillow, in the decoder processes; gpu:
            on the encoder's CUDA device with nvJPEG, in batches (torch engine; the decoder
            processes then only read the files, and decode the other formats with Pillow);
            auto: cpu, until the gpu path has been checked on a GPU.
        batch_size: images per call of the torch engine.
        workers: decoder processes (None: one per core); 0 decodes in this process.
        writers: threads writing files (None: one per core, 2 to 16).
        skip_existing: inputs whose output exists, made from them with this configuration, are
            skipped; with shards, whole shards whose every row is this run's input, done.
        overwrite: replace existing files that are not this configuration's outputs.
        shard_size: K > 0 writes (K, N+1, D) .npy shards instead of one file per image: input
            number i (from 0, failed ones included) is row i % K of shard i // K. Parquet and
            WebDataset outputs are always shards (None: `with_shard_size`'s default).
        decode_timeout: seconds one image may take to decode before its decoder is killed and the
            image reported as an error (None: no limit; needs workers > 0).
        ray: run on a Ray cluster (`RayOptions`, or True for its defaults); None: on this machine.
    """

    decode: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    writers: int | None = None
    skip_existing: bool = False
    overwrite: bool = False
    shard_size: int | None = None
    decode_timeout: float | None = DECODE_TIMEOUT
    ray: RayOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ray, bool):
            self.ray = RayOptions() if self.ray else None
        if self.decode not in DECODES:
            raise ConfigError(unknown("decode", self.decode, DECODES))
        for name, least, most in _COUNTS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}")
            if value < least:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least {least}, got {value}")
            if value > most:
                raise ConfigError(f"{name.replace('_', ' ')} must be at most {most}, got {value}")
            setattr(self, name, int(value))
        timeout = self.decode_timeout
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"decode timeout must be a positive number of seconds, got {timeout}")
        if self.skip_existing and self.overwrite:
            raise ConfigError("--skip-existing and --overwrite contradict each other; pick one")
