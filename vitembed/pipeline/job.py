"""`vitembed.encode`: an `EncodeRequest` run over inputs, as `vitembed encode` runs it.

The request (`request.EncodeRequest`) holds and checks the options; this module adds the inputs,
the rules that need them, the output folder, and the driver that runs it all: `skeleton` on this
machine, `raydriver` with --ray. The encoder and plan are checked once (`runner.check`), before
the -o folder is opened.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping

from ..errors import ConfigError
from .request import EncodeRequest

__all__ = ["encode", "encode_request", "input_paths", "layer_source"]


def encode(inputs: str | os.PathLike | Iterable[str | os.PathLike], output: str | os.PathLike | None = None, *,
           on_result: Callable | None = None, stop: threading.Event | None = None, null: bool = False,
           stdin=None, stdout=None, on_notice: Callable[[str], None] | None = None, **options):
    """Encode image files and folders, as `vitembed encode` does; returns the run's `Summary`.

    Args:
        inputs: files, folders (walked recursively), WebDataset tar shards (or a brace pattern of
            them, "shards/{0000..0009}.tar"), Parquet tables, or "-" to read paths from `stdin`:
            one path (a str or os.PathLike) or an iterable of them.
        output: None (beside each input), a folder, FILE.npy / FILE.pt (one input), "-", or
            NAME.parquet (a folder of Parquet shards; `format="wds"` with a folder: WebDataset tars).
        on_result: called with each input's outcome (`Written`, `Failed`, `Skipped`) as it finishes.
        stop: set it to stop the run early; every output written is whole.
        null: paths on stdin are NUL-separated.
        on_notice: called with one-line notices (a resampled position embedding, ...).
        **options: `EncodeRequest.from_options`' keyword arguments (preset, weights, dtype, workers,
            image_column, key_column, ...).

    Raises:
        ConfigError: options that cannot work together, or an -o folder of another configuration.
        WeightsError: weights that cannot be read.
    """
    inputs = input_paths(inputs)
    request = EncodeRequest.from_options(output=output, **options)
    return encode_request(request, inputs, on_result=on_result, stop=stop, null=null, stdin=stdin, stdout=stdout,
                          on_notice=on_notice)


def encode_request(request: EncodeRequest, inputs: list[str], *, on_result: Callable | None = None,
                   stop: threading.Event | None = None, null: bool = False, stdin=None, stdout=None,
                   on_notice: Callable[[str], None] | None = None):
    """Run `request` over `inputs` (str paths, as `input_paths` gives them): `encode`'s run."""
    from .folder import run_record
    from .skeleton import with_shard_size

    notice = on_notice or (lambda text: None)
    _check_uris(inputs, request)
    plan = request.output.plan()
    runner = _runner(request, plan)
    own_outputs, strained, passed_over = _OwnOutputs(notice), _Strained(notice), _PassedOver(notice)
    sources = _sources(request, inputs, stdin, null, own_outputs, passed_over)
    if plan.mode in ("file", "stdout"):
        sources = list(sources)
        own_outputs.tell()
        if len(sources) != 1:
            raise ConfigError(f"-o {request.output.path} takes exactly one input image, got {len(sources)}")
    encoder, config, notes = request.encoder()
    for note in notes:
        notice(note)
    options = with_shard_size(request.run, encoder, plan)
    runner.check(encoder, plan, options)
    config["format"] = plan.fmt
    if options.shard_size:  # a Parquet or WebDataset output's default too
        config["shard_size"] = options.shard_size
    ray = options.ray
    plan.record = run_record(config, encoder.device if ray is None else f"ray:{'cuda' if ray.gpus else 'cpu'}")
    folder = _folder(plan, config, plan.record, options.overwrite)
    report = on_result or (lambda outcome: None)
    random = [request.layer.weights is None]  # said with the first output, not on a run that wrote none

    def record(outcome) -> None:
        if folder is not None:
            folder.record(outcome)
        strained(outcome)
        if random[0] and outcome.status == "ok":
            random[0] = False
            notice(f"the layer is random (seed {request.layer.seed}): pass --weights for a trained model's input layer")
        report(outcome)

    try:
        summary = runner.execute(sources, encoder, plan, options, on_result=record, stop=stop, stdout=stdout,
                                 made_from=folder.made_from if folder is not None else None)
    finally:
        if folder is not None:
            folder.close()
    own_outputs.tell()
    strained.tell()
    passed_over.tell()
    summary.layer = layer_source(request.layer, config["weights"]["source"])
    return summary


def layer_source(layer, source: str) -> str:
    """Where the layer came from, in words for the user: a random layer's seed and preset, a
    weights file's name and what it holds, or a named model (its `source` names it)."""
    if layer.weights is None:
        from ..layer.config import preset_name

        return f"random (seed {layer.seed}, preset {preset_name(layer.preset)})"
    from ..weights.pretrained import is_pretrained_name

    if is_pretrained_name(layer.weights):
        return source
    from .outcomes import display_path

    return f"{display_path(layer.weights)} ({source})"


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
    """On Ray, a URI input's tokens need -o (a URI output without --ray is the request's own rule)."""
    from ..files.uris import is_uri

    uri = next((i for i in inputs if is_uri(i)), None)
    if uri is not None and request.run.ray is not None and request.output.path is None:
        raise ConfigError(f"{uri}: the tokens of a URI input are not written beside it; give -o DIR or -o URI")


def _sources(request: EncodeRequest, inputs: list[str], stdin, null: bool, own_outputs, passed_over):
    """The run's inputs as `Source`s, lazily; "-" reads paths from `stdin` (default: this process's)."""
    from ..images.inputs import iter_sources

    if inputs.count("-") > 1:
        raise ConfigError("- (read paths from stdin) may be given once")
    stdin = stdin if stdin is not None else (sys.stdin.buffer if "-" in inputs else None)
    return iter_sources(inputs, stdin, null, on_own_output=own_outputs, uris=request.run.ray is not None,
                        datasets=request.datasets(passed_over))


def _runner(request: EncodeRequest, plan):
    """The module whose `check` and `execute` drive the request: `skeleton` on this machine, or
    `raydriver` with `run.ray` (Ray installed, and an output a cluster cannot write refused first)."""
    from . import skeleton

    if request.run.ray is None:
        return skeleton
    from ..executors import raydriver

    raydriver.require_ray()
    raydriver.refuse(plan)
    return raydriver


def _folder(plan, config: dict, record: dict, overwrite: bool):
    """-o DIR's OutputFolder, -o URI's UriFolder (None for other outputs)."""
    from .folder import OutputFolder, UriFolder

    if plan.mode != "dir":
        return None
    if plan.store is not None:
        return UriFolder(plan.store, config, record, plan.relative, overwrite=overwrite)
    return OutputFolder(plan.target, config, record, plan.relative, overwrite=overwrite)


class _Tally:
    """What a run passes over or notices, counted by kind with the first of each, and told in one
    note when the run ends (`words` puts the counts in words)."""

    def __init__(self, notice: Callable[[str], None]) -> None:
        self.notice = notice
        self.found: dict = {}  # kind -> [count, the first]

    def add(self, kind, first) -> None:
        self.found.setdefault(kind, [0, first])[0] += 1

    def tell(self) -> None:
        if self.found:
            self.notice(self.words(self.found))
            self.found = {}

    def words(self, found: dict) -> str:
        raise NotImplementedError


class _OwnOutputs(_Tally):
    """vitembed's own outputs among the inputs (`photos/*` over a folder it wrote into, the
    pictures `vitembed show` drew)."""

    _WHY = {False: ".npy/.pt files are vitembed's outputs, not images",
            True: "PNGs that vitembed show drew (they carry its text chunk), not images"}

    def __call__(self, path) -> None:
        self.add(path.suffix.lower() == ".png", path)

    def words(self, found: dict) -> str:
        from .outcomes import display_path

        return "; ".join(f"passed over {display_path(first)}{_more(count)}: {self._WHY[picture]}"
                         for picture, (count, first) in sorted(found.items()))


class _Strained(_Tally):
    """Images that the resize enlarged more than 4x or squashed beyond 2:1 (`resolution.resize_strain`,
    told by the decoders with each outcome)."""

    _WORDS = {"upscaled": "upscaled more than 4x", "squashed": "squashed beyond 2:1"}

    def __call__(self, outcome) -> None:
        strain = getattr(outcome.source, "strain", None)
        if strain is not None and outcome.status == "ok":
            self.add(strain, outcome.input)

    def words(self, found: dict) -> str:
        from .outcomes import display_path

        parts = [f"{count} {'image' if count == 1 else 'images'} {self._WORDS[strain]} (first: {display_path(first)})"
                 for strain, (count, first) in sorted(found.items(), key=lambda kv: kv[0] != "upscaled")]
        return (f"{' and '.join(parts)}: their tokens see few pixels of their own, or a distorted image; "
                "--resize crop|pad|native keeps the aspect ratio")


class _PassedOver(_Tally):
    """Tar members passed over as unsafe (`tars`: links, devices, absolute or `..` paths)."""

    def __call__(self, member: str) -> None:
        self.add(None, member)

    def words(self, found: dict) -> str:
        count, first = found[None]
        return (f"passed over tar members that are links, devices, or absolute or .. paths, never read: "
                f"{first}{_more(count)}")


def _more(count: int) -> str:
    return f" and {count - 1} more" if count > 1 else ""
