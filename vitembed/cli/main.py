"""The `vitembed` command line: parse, call the library, print.

Heavy modules (torch, numpy, Pillow) are imported inside the commands, so that `--help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import ConfigError, InputError, printable
from .options import (
    IMAGE, RUN, BackgroundOpt, Command, CropPctOpt, Decode, EmbDimOpt, Engine, Format, Group, ImageSizeOpt,
    InChannelsOpt, InitSeedOpt, InterpolationOpt, JsonOpt, MaxPatchesOpt, NormalizeOpt, NumPatchRowOpt,
    PatchSizeOpt, PosInit, PosInitOpt, PosResampleOpt, PresetOpt, RayActorsOpt, RayAddressOpt, RayCpusOpt,
    RayGpusOpt, RayOpt, ResizeOpt, SeedOpt, Tokens, TokensOpt, WeightsOpt, choice_metavar, echo, fail, guard,
    notice, stdout_writes, value,
)
from .show import show_app
from .signals import install_early_handlers, stop_on_signals


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn images into Vision Transformer input-layer tokens z0, shape (N+1) x D.",
)


def _command():
    """A command: Click-style help, and the library's errors as one line and an exit code."""
    return lambda func: app.command(cls=Command)(guard(func))


def _version(value: bool) -> None:
    """--version: vitembed's, and the libraries' that decide its outputs (read without importing them)."""
    if not value:
        return
    import platform
    from importlib import metadata

    from .. import __version__

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {version(name)}" for name in ("torch", "torchvision", "Pillow", "numpy"))
    typer.echo(f"vitembed {__version__} ({libraries}; Python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show vitembed's version, torch's, Pillow's and numpy's, and exit.")] = False,
) -> None:
    pass


@_command()
def encode(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(metavar="INPUTS...", help="Image files, folders (walked recursively), WebDataset tar shards (or a brace pattern: shards/{000..099}.tar), Parquet tables, or - to read paths from stdin.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="PATH", help="Output folder (one that exists, ends with / or has no suffix), a FILE.npy / FILE.pt / FILE.pth for one input, or - for stdout. Default: beside each input.", rich_help_panel=RUN)] = None,
    format: Annotated[Optional[Format], typer.Option("--format", "-f", metavar=choice_metavar(Format), help="Output format (default npy, or the -o file's suffix): npy or pt, a file per image; parquet or wds, shards of --shard-size rows: Parquet tables (-o NAME.parquet picks it) or WebDataset tars.", rich_help_panel=RUN)] = None,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated (find -print0).", rich_help_panel=RUN)] = False,
    image_column: Annotated[Optional[str], typer.Option("--image-column", metavar="NAME", help="Parquet inputs: the column of images (default: the first of bytes or Hugging Face Image structs).", rich_help_panel=RUN)] = None,
    key_column: Annotated[Optional[str], typer.Option("--key-column", metavar="NAME", help="Parquet inputs: the column that names each row (default: the row's number).", rich_help_panel=RUN)] = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    pos_init: PosInitOpt = PosInit.normal,
    pos_resample: PosResampleOpt = None,
    tokens: TokensOpt = Tokens.z0,
    max_patches: MaxPatchesOpt = None,
    normalize: NormalizeOpt = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", metavar="INTEGER", help="Refuse images whose header claims more pixels (decompression bombs). Default: 178956970.", rich_help_panel=IMAGE)] = None,
    fast_decode: Annotated[bool, typer.Option("--fast-decode", help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling): much faster, pixels differ slightly.", rich_help_panel=IMAGE)] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)] = "auto",
    engine: Annotated[Engine, typer.Option("--engine", metavar=choice_metavar(Engine), help="numpy: each decoder process embeds and writes its images (CPU; torch is imported only to draw a random layer the first time, then cached). torch: batches on --device. auto: numpy where it applies, else torch.", rich_help_panel=RUN)] = Engine.auto,
    decode: Annotated[Decode, typer.Option("--decode", metavar=choice_metavar(Decode), help="Where JPEGs are decoded: cpu (Pillow, in the decoder processes), gpu (nvJPEG on the CUDA device; other formats by Pillow), auto: cpu.", rich_help_panel=RUN)] = Decode.auto,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="Output dtype: float32, float16 or bfloat16 (also fp32, fp16, bf16, half, float, single); computed in float32.", rich_help_panel=RUN)] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="INTEGER", help="Images per layer call (1 to 4096).", rich_help_panel=RUN)] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", metavar="INTEGER", help="Decoding processes (default: one per core; 0: decode in the main process; at most 1024).", rich_help_panel=RUN)] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Resume: skip inputs whose output already exists.", rich_help_panel=RUN)] = False,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", metavar="K", help="Write shards of K inputs into the -o folder: (K, N+1, D) .npy files, or Parquet tables / tars of K rows (their default: 1024, at most 256 MiB); manifest.jsonl maps inputs to shard and row.", rich_help_panel=RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-encode into an -o folder that was made with another configuration (its old outputs are removed first).", rich_help_panel=RUN)] = False,
    decode_timeout: Annotated[Optional[float], typer.Option("--decode-timeout", metavar="SECONDS", help="Seconds one image may take to decode before it is reported as an error (with --workers > 0). Default: 120.", show_default=False, rich_help_panel=RUN)] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per input on stdout, as each finishes.", rich_help_panel=RUN)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, summary or progress bar on stderr.", rich_help_panel=RUN)] = False,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    resize: ResizeOpt = None, crop_pct: CropPctOpt = None, interpolation: InterpolationOpt = None,
    background: BackgroundOpt = "white",
    ray: RayOpt = False, ray_address: RayAddressOpt = None, ray_gpus: RayGpusOpt = 0.0, ray_cpus: RayCpusOpt = 1.0,
    ray_actors: RayActorsOpt = None,
) -> None:
    """Encode images into z0 tokens, one (N+1) x D file per image.

    Row 0 of each output is the class token; rows 1..N are the patches in row-major order.

    Example:

    \b
        vitembed encode cat.png                      # writes cat.npy
        vitembed encode photos/ -o tokens/ --preset vit-b16
        vitembed encode photos/ -o tokens/ --weights vit.pth --image-size 224x320
        find photos -name '*.jpg' -print0 |
            vitembed encode - -0 -o tokens/ --json | jq .output
    """
    from ..pipeline.job import encode_request
    from ..files.writes import silence_stream
    from ..pipeline.report import Reporter
    from ..pipeline.request import EncodeRequest

    _check_stdout(output, json_lines)
    request = EncodeRequest.from_options(**_request_options(ctx.params))
    stop = threading.Event()
    reporter = Reporter(json_lines=json_lines, quiet=quiet, stop=stop)
    if reporter.shows_progress and "-" not in inputs:
        # The total for the bar, counted beside the run: inputs stream, they are never all held.
        from ..images.inputs import count_inputs

        count = lambda: reporter.set_total(count_inputs(inputs, uris=ray))  # noqa: E731
        threading.Thread(target=count, daemon=True).start()
    with stop_on_signals(stop) as caught:
        try:
            summary = encode_request(request, inputs, on_result=reporter, stop=stop, null=null,
                                     on_notice=lambda note: notice([note], quiet))
        finally:
            reporter.close()
    reporter.finish(summary)
    if output is None and not quiet:
        _tell_where(reporter.console, inputs, summary.ok)
    if reporter.pipe_closed or summary.pipe_closed:
        silence_stream(sys.stdout)
        raise typer.Exit(141)
    if caught:
        reporter.console.print(
            f"interrupted: {summary.ok} encoded, {summary.skipped} skipped, {summary.errors} failed; "
            "every output written is complete. Run the same command with --skip-existing to resume.", markup=False)
        raise typer.Exit(128 + caught[0])
    if summary.stopped:
        raise fail(f"stopped: {summary.stopped}", 1)
    if summary.total == 0:
        raise fail("no images found in the given inputs", 2)
    raise typer.Exit(1 if summary.errors else 0)


def _tell_where(console, inputs: list[str], written: int) -> None:
    """Without -o, the outputs of a folder's images went into that folder: one line says so."""
    from ..pipeline.outcomes import display_path

    folders = [display_path(i) for i in inputs if i != "-" and os.path.isdir(i)]
    if written and folders:
        console.print(f"outputs written beside their images, under {', '.join(folders)}; "
                      "-o DIR puts them in a folder of their own", markup=False, soft_wrap=True)


def _check_stdout(output: str | None, json_lines: bool) -> None:
    """-o - is for a reader of the tensor's bytes: not with --json, not to a terminal."""
    if output == "-" and json_lines:
        raise ConfigError("-o - writes the tensor to stdout; it cannot be combined with --json")
    if output == "-" and sys.stdout.isatty():  # as gzip does: binary is not for a terminal
        raise ConfigError("-o - writes the tensor's bytes to stdout, which is a terminal; redirect it "
                          "(-o - > cat.npy) or pipe it to a reader, or give -o cat.npy")


_NOT_REQUEST = ("inputs", "null", "json_lines", "quiet")  # what the command line keeps for itself


def _request_options(params: dict) -> dict:
    """`encode`'s parameters as `EncodeRequest.from_options` takes them: choices as their strings;
    no --decode-timeout is its default (120 s, where the library's None is no limit)."""
    options = {name: value(v) for name, v in params.items() if name not in _NOT_REQUEST}
    if options["decode_timeout"] is None:
        del options["decode_timeout"]
    return options


@_command()
def init(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH", help="Layer file to write: .pt or .safetensors.", show_default=False)],
    seed: InitSeedOpt = 0,
    pos_init: PosInitOpt = PosInit.normal,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
) -> None:
    """Write a freshly initialised layer to a file, to encode with later via --weights.

    The layer is the random one `vitembed encode` draws from the same options and --seed.

    Example:

    \b
        vitembed init --preset vit-b16 --seed 7 -o layer.pt
        vitembed init --pos-init sincos -o sincos.pt   # MAE's sine-cosine E_pos
    """
    from ..layer.reference import build_layer
    from ..pipeline.request import LayerOptions
    from ..weights.load import save_layer

    layer = LayerOptions(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, seed=seed,
                         pos_init=pos_init.value)
    config = layer.config()
    size = save_layer(build_layer(config, seed, layer.pos_init), output)
    from rich.console import Console

    Console(stderr=True, highlight=False).print(printable(
        f"wrote {output}: tokens {config.num_tokens} x {config.emb_dim}, {config.num_params} parameters, {size} bytes"
        f"{', E_pos: sincos (MAE)' if pos_init is PosInit.sincos else ''}"), markup=False, soft_wrap=True)


@_command()
def info(
    weights: WeightsOpt = None,
    pos_resample: PosResampleOpt = None,
    presets: Annotated[bool, typer.Option("--presets", help="List the presets.")] = False,
    json_out: JsonOpt = False,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
) -> None:
    """Show a layer's shape: patch grid, P^2*C, N, D, token shape, parameters.

    Example:

    \b
        vitembed info --preset vit-b16 --image-size 384
        vitembed info --weights vit.pth --image-size 224x320 --patch-size 8
    """
    from ..layer.config import PRESETS

    if presets:
        rows = {name: _describe(cfg) for name, cfg in PRESETS.items()}
        if json_out:
            echo(json.dumps(rows))
        else:
            width = max(map(len, rows))
            for name, d in rows.items():
                echo(f"{name:{width}} image {d['image_size']:4}  patch {d['patch_size']:2}  D {d['emb_dim']:5}  "
                     f"tokens {d['tokens'][0]} x {d['tokens'][1]}")
        return
    from ..pipeline.request import LayerOptions

    layer = LayerOptions(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights=weights,
                         pos_resample=value(pos_resample))
    config, d = _info_layer(layer)
    source, weights_prep = d.get("source"), d.pop("weights_prep")
    if json_out:
        echo(json.dumps(d))
        return
    lines = [
        *( [f"source        {source}"] if source else [] ),
        f"image         {config.size[0]} x {config.size[1]} x {config.in_channels}",
        f"patch         {config.patch_size} x {config.patch_size} x {config.in_channels} = {config.patch_dim} values (P^2*C)",
        f"grid          {config.grid[0]} x {config.grid[1]} = {config.num_patches} patches (N)",
        f"embedding     D = {config.emb_dim}",
        f"tokens        {config.num_tokens} x {config.emb_dim}  ({_token_layout(config)})",
        *_describe_steps(d["steps"], d.get("pos_resample_how")),
        f"parameters    {config.num_params:,}",
    ]
    if "preprocess" in d:
        p = d["preprocess"]
        resize = _describe_crop(config.size, p["crop_pct"], p["resize"]) if "crop" in p["resize"] else p["resize"]
        origin = ("the weights'" if weights else "the preset's") if weights_prep else "vitembed's defaults"
        lines.append(f"preprocess    {resize}, {p['interpolation']}, mean {_floats(p['mean'])}, std {_floats(p['std'])}  "
                     f"({origin})")
    echo("\n".join(lines))


def _info_layer(layer) -> tuple[Any, dict]:
    """`info`'s layer (the weights', or the options' shape: `request.LayerOptions`) and what it
    shows of it: the shape, the steps, the source and the resampling of weights, the preprocessing
    (the weights' or the preset's), and the preprocessing fields those gave (`weights_prep`)."""
    from ..layer.config import preset_preprocess

    if layer.weights is not None:
        loaded, source, notes, weights_prep = layer.load()
        notice(notes)
        config = loaded.config
    else:
        loaded, source = None, None
        config, weights_prep = layer.config(), preset_preprocess(layer.preset)
    d = _describe(config)
    if loaded is not None and config.pos_table:
        from ..weights.layouts import resample_how

        method = layer.pos_resample or loaded.pos_resample
        d["pos_resample"], d["pos_resample_how"] = method, resample_how(method, loaded.source, loaded.pos_resample)
    if source:
        d["source"] = source
    if source or weights_prep:
        from ..pipeline.request import ImageOptions

        prep = ImageOptions().preprocess(config, weights_prep)
        d["preprocess"] = {k: getattr(prep, k) for k in ("image_size", "image_width", "resize", "crop_pct",
                                                          "interpolation", "mean", "std") if getattr(prep, k) is not None}
        d["preprocess_from_weights"] = sorted(weights_prep)
    d["weights_prep"] = weights_prep
    return config, d


def _describe_steps(steps: dict, resample: str | None) -> list[str]:
    """The layer's steps as `info` lines: the convolution's bias, the positions, the pre-norm."""
    lines = [f"conv bias     {'yes' if steps['conv_bias'] else 'no (the patch embedding has none)'}",
             f"positions     {steps['positions']}"]
    if resample:
        lines.append(f"resampled     {resample} (--pos-resample to change)")
    lines.append(f"pre-norm      {steps['pre_norm'] + ' over each token, in z0' if steps['pre_norm'] else 'none'}")
    return lines


def _token_layout(config) -> str:
    """'row 0: class token, rows 1..256: patches'."""
    return ", ".join(f"row {first}: {what.removesuffix('s')}" if first == last else f"rows {first}..{last}: {what}"
                     for first, last, what in config.token_rows())


def _describe_crop(size: tuple[int, int], crop_pct: float, resize: str = "crop") -> str:
    """'crop (shorter side to 256, centre 224)'; for H x W, timm's: the image covering (H, W) / crop_pct;
    'squash-crop (squashed to 256x256, centre 224x224)'."""
    h, w = size
    if resize == "squash-crop":
        return f"squash-crop (squashed to {int(h / crop_pct)}x{int(w / crop_pct)}, centre {h}x{w})"
    if h == w:
        return f"crop (shorter side to {int(h / crop_pct)}, centre {h})"
    return f"crop (aspect kept, covering {int(h / crop_pct)}x{int(w / crop_pct)}, centre {h}x{w})"


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _describe(config) -> dict:
    return {
        **config.to_dict(),
        "steps": config.steps(),
        "grid": list(config.grid),
        "patch_dim": config.patch_dim,
        "num_patches": config.num_patches,
        "tokens": list(config.token_shape),
        "parameters": config.num_params,
    }


@_command()
def inspect(
    files: Annotated[list[Path], typer.Argument(metavar="FILES...", help="Saved outputs (.npy or .pt).", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Show shape, dtype, min, mean, std and max of saved outputs.

    Example:

    \b
        vitembed inspect cat.npy tokens/*.npy
    """
    from ..pipeline.outcomes import display_path
    from ..files.stats import tensor_stats

    failed = 0
    rows = []
    for path in files:
        try:
            stats = tensor_stats(path)
        except InputError as exc:
            failed += 1
            fail(f"{display_path(path)}: {exc}", 1)
            continue
        stats = {"file": display_path(path), **stats}
        if json_out:
            echo(json.dumps(stats))
        rows.append(stats)
    if rows and not json_out:
        from rich.console import Console

        from ..pipeline.report import print_table

        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        with stdout_writes():
            print_table(Console(highlight=False), ("file", "shape", "dtype", "min", "mean", "std", "max"),
                        [(s["file"], " x ".join(map(str, s["shape"])), s["dtype"], fmt(s["min"]), fmt(s["mean"]),
                          fmt(s["std"]), fmt(s["max"])) for s in rows], paths=(0,))
    raise typer.Exit(1 if failed else 0)


app.add_typer(show_app, name="show")


def main() -> None:
    from .startup import exit_without_teardown, start_early

    install_early_handlers()
    start_early(sys.argv[1:])  # before typer's imports and parsing, which it then overlaps
    try:
        app(prog_name="vitembed")
    except KeyboardInterrupt:  # Ctrl-C before the encode loop took over: nothing half-done to report
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit as exc:
        if sys.argv[1:2] == ["encode"]:
            exit_without_teardown(exc.code)
        raise
