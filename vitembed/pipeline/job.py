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

__all__ = ["encode", "encode_request", "input_paths"]


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
        **options: `EncodeRequest.from_options`' keyword arguments (preset, weights, dtype, workers, ...).

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
    from ..images.inputs import iter_sources

    notice = on_notice or (lambda text: None)
    _check_uris(inputs, request)
    plan = request.output.plan()
    runner = _runner(request, plan)
    if inputs.count("-") > 1:
        raise ConfigError("- (read paths from stdin) may be given once")
    stdin = stdin if stdin is not None else (sys.stdin.buffer if "-" in inputs else None)
    own_outputs = _OwnOutputs(notice)
    sources = iter_sources(inputs, stdin, null, on_own_output=own_outputs, uris=request.run.ray is not None)
    if plan.mode in ("file", "stdout"):
        sources = list(sources)
        own_outputs.tell()
        if len(sources) != 1:
            raise ConfigError(f"-o {request.output.path} takes exactly one input image, got {len(sources)}")
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
        summary = runner.execute(sources, encoder, plan, request.run, on_result=record, stop=stop, stdout=stdout,
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
    """On Ray, a URI input's tokens need -o (a URI output without --ray is the request's own rule)."""
    from ..files.uris import is_uri

    uri = next((i for i in inputs if is_uri(i)), None)
    if uri is not None and request.run.ray is not None and request.output.path is None:
        raise ConfigError(f"{uri}: the tokens of a URI input are not written beside it; give -o DIR or -o URI")


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
