"""The `vitembed` command line: parse, call the library, print.

Heavy modules (torch, numpy, Pillow) are imported inside the commands, so that `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import ConfigError, InputError, OutputError, VitembedError, WeightsError
from .showcli import PosInit, PosInitOpt, show_app


class _ClickHelp:
    """Help as Click shows it: `INPUTS...` in the usage line, no placeholder after a flag, and the
    metavars the options declare (INTEGER, PATH, [npy|pt]), rather than Typer's type labels
    (`{inputs}...`, `<bool>`, `<list[str]>`)."""

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for param in params:
            if param.param_type_name == "option" and getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a flag takes no value: nothing to show after it (--help included)
            elif param.param_type_name == "argument":
                # Its metavar says it all (INPUTS...); Typer would add its type label (<list[str]>).
                param.display_type_rich = lambda ctx: None
        return params


class _Command(_ClickHelp, TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _Group(_ClickHelp, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn images into Vision Transformer input-layer tokens z0, shape (N+1) x D.",
)


class Resize(str, Enum):
    squash = "squash"
    crop = "crop"
    pad = "pad"


class Interpolation(str, Enum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"


class Normalize(str, Enum):
    imagenet = "imagenet"
    inception = "inception"
    clip = "clip"
    none = "none"


class Format(str, Enum):
    npy = "npy"
    pt = "pt"


class Engine(str, Enum):
    auto = "auto"
    numpy = "numpy"
    torch = "torch"


class Decode(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


def _version(value: bool) -> None:
    """--version: vitembed's, and the libraries' that decide its outputs (read without importing them)."""
    if not value:
        return
    import platform
    from importlib import metadata

    from . import __version__

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


def _choices(enum: type[Enum]) -> str:
    return "[" + "|".join(member.value for member in enum) + "]"


LAYER = "Layer"
IMAGE = "Image"
RUN = "Run"

PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", metavar="NAME", help="Layer shape: seed (default: 224 px, P=14, D=384), vit-b16, vit-l14, ... (see `vitembed info --presets`).", rich_help_panel=LAYER)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", metavar="PIXELS", help="Side S of the square input, pixels.", rich_help_panel=LAYER)]
PatchSizeOpt = Annotated[Optional[int], typer.Option("--patch-size", metavar="PIXELS", help="Side P of a patch, pixels.", rich_help_panel=LAYER)]
NumPatchRowOpt = Annotated[Optional[int], typer.Option("--num-patch-row", metavar="INTEGER", help="Patches per side (the seed's way to set P = S / rows).", rich_help_panel=LAYER)]
EmbDimOpt = Annotated[Optional[int], typer.Option("--emb-dim", metavar="INTEGER", help="Token length D.", rich_help_panel=LAYER)]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", metavar="INTEGER", help="Image channels C: 3 (RGB) or 1 (grey).", rich_help_panel=LAYER)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", metavar="FILE|NAME", help="Layer file from `vitembed init`; a timm, torchvision, transformers or seed state dict (.pt/.pth/.bin/.safetensors) or save_pretrained folder; or torchvision:vit_b_16, timm:MODEL.TAG, hf:ORG/REPO. Fixes P, D, C; --image-size resamples the position embedding.", rich_help_panel=LAYER)]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Seed of the random layer (ignored with --weights).", rich_help_panel=LAYER)]
InitSeedOpt = Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Seed of the random layer.", rich_help_panel=LAYER)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels):
    from .config import resolve_config

    return resolve_config(
        preset, image_size=image_size, patch_size=patch_size, num_patch_row=num_patch_row,
        emb_dim=emb_dim, in_channels=in_channels,
    )


def _notice(notes, quiet: bool = False) -> None:
    if not quiet:
        for note in notes:
            typer.echo(f"note: {note}", err=True)


def _fail(message: str, code: int) -> typer.Exit:
    from rich.console import Console

    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text.assemble(("error", "red"), ": ", message), soft_wrap=True)
    return typer.Exit(code)


def _guard(func):
    """Turn the library's expected failures into one red line and an exit code."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        except (WeightsError, InputError, OutputError, VitembedError) as exc:
            raise _fail(str(exc), 1) from None

    return wrapper


@app.command(cls=_Command)
@_guard
def encode(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUTS...", help="Image files, folders (walked recursively), or - to read paths from stdin.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="PATH", help="Output folder (one that exists, ends with / or has no suffix), a FILE.npy / FILE.pt / FILE.pth for one input, or - for stdout. Default: beside each input.", rich_help_panel=RUN)] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", metavar=_choices(Format), help="Output file format (default npy, or the -o file's suffix).", rich_help_panel=RUN)] = None,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated (find -print0).", rich_help_panel=RUN)] = False,
    preset: PresetOpt = None,
    image_size: ImageSizeOpt = None,
    patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None,
    emb_dim: EmbDimOpt = None,
    in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    resize: Annotated[Optional[Resize], typer.Option("--resize", metavar=_choices(Resize), help="squash: straight to S x S; crop: shorter side to S/crop-pct, centre crop; pad: keep aspect, pad to square. Default: the weights' own, else squash.", show_default=False, rich_help_panel=IMAGE)] = None,
    crop_pct: Annotated[Optional[float], typer.Option("--crop-pct", metavar="FLOAT", help="For --resize crop: 0.875 is 256 -> 224. Default: the weights' own, else 0.875.", show_default=False, rich_help_panel=IMAGE)] = None,
    interpolation: Annotated[Optional[Interpolation], typer.Option("--interpolation", metavar="FILTER", help="Resampling filter, antialiased: nearest, bilinear, bicubic or lanczos. Default: the weights' own, else bilinear.", show_default=False, rich_help_panel=IMAGE)] = None,
    background: Annotated[str, typer.Option("--background", metavar="COLOUR", help="Colour under transparency and around --resize pad: a name, #rrggbb or r,g,b.", rich_help_panel=IMAGE)] = "white",
    normalize: Annotated[Optional[Normalize], typer.Option("--normalize", metavar="NAME", help="Per-channel mean and std: imagenet, inception, clip, or none (pixels / 255). Default: the weights' own, else imagenet.", show_default=False, rich_help_panel=IMAGE)] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", metavar="INTEGER", help="Refuse images whose header claims more pixels (decompression bombs). Default: 178956970.", rich_help_panel=IMAGE)] = None,
    fast_decode: Annotated[bool, typer.Option("--fast-decode", help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling): much faster, pixels differ slightly.", rich_help_panel=IMAGE)] = False,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)] = "auto",
    engine: Annotated[Engine, typer.Option("--engine", metavar=_choices(Engine), help="numpy: each decoder process embeds and writes its images (CPU; torch is imported only to draw a random layer the first time, then cached). torch: batches on --device. auto: numpy where it applies, else torch.", rich_help_panel=RUN)] = Engine.auto,
    decode: Annotated[Decode, typer.Option("--decode", metavar=_choices(Decode), help="Where JPEGs are decoded and resized: cpu (Pillow, in the decoder processes), gpu (nvJPEG on the CUDA device, in batches; other formats still by Pillow; not yet checked on a GPU), auto: cpu for now.", rich_help_panel=RUN)] = Decode.auto,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="Output dtype: float32, float16 or bfloat16 (also fp32, fp16, bf16, half, float, single); computed in float32.", rich_help_panel=RUN)] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="INTEGER", help="Images per layer call.", rich_help_panel=RUN)] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", metavar="INTEGER", help="Decoding processes (default: one per core; 0: decode in the main process).", rich_help_panel=RUN)] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Resume: skip inputs whose output already exists.", rich_help_panel=RUN)] = False,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", metavar="K", help="Write shards of K stacked tensors, (K, N+1, D) .npy files, into the -o folder; manifest.jsonl maps each input to its shard and row.", rich_help_panel=RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-encode into an -o folder that was made with another configuration (its old outputs are removed first).", rich_help_panel=RUN)] = False,
    decode_timeout: Annotated[float, typer.Option("--decode-timeout", metavar="SECONDS", help="Seconds one image may take to decode before it is reported as an error (with --workers > 0).", rich_help_panel=RUN)] = 120.0,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per input on stdout, as each finishes.", rich_help_panel=RUN)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, summary or progress bar on stderr.", rich_help_panel=RUN)] = False,
) -> None:
    """Encode images into z0 tokens, one (N+1) x D file per image.

    Row 0 of each output is the class token; rows 1..N are the patches in row-major order.

    Example:

        vitembed encode cat.png                      # writes cat.npy

        vitembed encode photos/ -o tokens/ --preset vit-b16

        find photos -name '*.jpg' -print0 |
            vitembed encode - -0 -o tokens/ --json | jq .output
    """
    # This process computes nothing with numpy's BLAS (decoders do, on one thread each); its extra
    # OpenBLAS threads would only spin for a while after numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .files import silence_stream
    from .report import Reporter
    from .request import encode as run_encode

    if output == "-" and json_lines:
        raise ConfigError("-o - writes the tensor to stdout; it cannot be combined with --json")
    if output == "-" and sys.stdout.isatty():  # as gzip does: binary is not for a terminal
        raise ConfigError("-o - writes the tensor's bytes to stdout, which is a terminal; redirect it "
                          "(-o - > cat.npy) or pipe it to a reader, or give -o cat.npy")
    if max_pixels is not None:
        from .images import set_pillow_limit

        set_pillow_limit(max_pixels)  # this process's Pillow (--workers 0); vitembed checks the limit itself
    stop = threading.Event()
    reporter = Reporter(json_lines=json_lines, quiet=quiet, stop=stop)
    if reporter.shows_progress and "-" not in inputs:
        # The total for the bar, counted beside the run: inputs stream, they are never all held.
        from .inputs import iter_sources

        count = lambda: reporter.set_total(sum(1 for _ in iter_sources(inputs, on_own_output=lambda path: None)))  # noqa: E731
        threading.Thread(target=count, daemon=True).start()
    options = dict(
        preset=preset, image_size=image_size, patch_size=patch_size, num_patch_row=num_patch_row, emb_dim=emb_dim,
        in_channels=in_channels, weights=weights, seed=seed, resize=_value(resize), crop_pct=crop_pct,
        interpolation=_value(interpolation), background=background, normalize=_value(normalize),
        max_pixels=max_pixels, fast_decode=fast_decode, format=_value(fmt), device=device, engine=_value(engine),
        decode=_value(decode), dtype=_value(dtype), batch_size=batch_size, workers=workers,
        skip_existing=skip_existing, overwrite=overwrite, shard_size=shard_size, decode_timeout=decode_timeout,
    )
    with _signals(stop) as caught:
        try:
            summary = run_encode(inputs, output, on_result=reporter, stop=stop, null=null,
                                 on_notice=lambda note: _notice([note], quiet), **options)
        finally:
            reporter.close()
    reporter.finish(summary)
    if reporter.pipe_closed or summary.pipe_closed:
        silence_stream(sys.stdout)
        raise typer.Exit(141)
    if caught:
        reporter.console.print(
            f"interrupted: {summary.ok} encoded, {summary.skipped} skipped, {summary.errors} failed; "
            "every output written is complete. Run the same command with --skip-existing to resume.", markup=False)
        raise typer.Exit(128 + caught[0])
    if summary.stopped:
        raise _fail(f"stopped: {summary.stopped}", 1)
    if summary.total == 0:
        raise _fail("no images found in the given inputs", 2)
    raise typer.Exit(1 if summary.errors else 0)


def _value(option):
    return option.value if isinstance(option, Enum) else option


@contextlib.contextmanager
def _signals(stop: threading.Event):
    """SIGINT and SIGTERM set `stop` (the run ends cleanly); a second one leaves at once. Yields
    the signals caught."""
    caught: list[int] = []

    def on_signal(signum, frame):
        if caught:  # a second Ctrl-C: leave now; outputs are whole files or absent anyway
            os._exit(128 + signum)
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@app.command(cls=_Command)
@_guard
def init(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH", help="Layer file to write: .pt or .safetensors.", show_default=False)],
    preset: PresetOpt = None,
    image_size: ImageSizeOpt = None,
    patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None,
    emb_dim: EmbDimOpt = None,
    in_channels: InChannelsOpt = None,
    seed: InitSeedOpt = 0,
    pos_init: PosInitOpt = PosInit.normal,
) -> None:
    """Write a freshly initialised layer to a file, to encode with later via --weights.

    The layer is the random one `vitembed encode` draws from the same options and --seed.

    Example:

        vitembed init --preset vit-b16 --seed 7 -o layer.pt

        vitembed init --pos-init sincos -o sincos.pt     # MAE's fixed 2-D sine-cosine E_pos
    """
    from .layer import build_layer
    from .weights import save_layer

    config = _layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels)
    size = save_layer(build_layer(config, seed, pos_init.value), output)
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"wrote {output}: tokens {config.num_tokens} x {config.emb_dim}, {config.num_params} parameters, {size} bytes"
        f"{', E_pos: sincos (MAE)' if pos_init is PosInit.sincos else ''}", markup=False, soft_wrap=True)


@app.command(cls=_Command)
@_guard
def info(
    preset: PresetOpt = None,
    image_size: ImageSizeOpt = None,
    patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None,
    emb_dim: EmbDimOpt = None,
    in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None,
    presets: Annotated[bool, typer.Option("--presets", help="List the presets.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a layer's shape: patch grid, P^2*C, N, D, token shape, parameters.

    Example:

        vitembed info --preset vit-b16 --image-size 384
    """
    from .config import PRESETS, resolve_config

    if presets:
        rows = {name: _describe(cfg) for name, cfg in PRESETS.items()}
        if json_out:
            typer.echo(json.dumps(rows))
        else:
            for name, d in rows.items():
                typer.echo(f"{name:9} image {d['image_size']:4}  patch {d['patch_size']:2}  D {d['emb_dim']:5}  tokens {d['tokens'][0]} x {d['tokens'][1]}")
        return
    source = loaded = None
    if weights is not None:
        from .request import EncodeRequest, layer_from_options

        loaded, source, notes, weights_prep = layer_from_options(preset, image_size, patch_size, num_patch_row,
                                                                 emb_dim, in_channels, weights)
        _notice(notes)
        config = loaded.config
    else:
        config = resolve_config(preset, image_size=image_size, patch_size=patch_size, num_patch_row=num_patch_row,
                                emb_dim=emb_dim, in_channels=in_channels)
    d = _describe(config)
    if source:
        d["source"] = source
        prep = EncodeRequest().preprocess(config, weights_prep)
        d["preprocess"] = {k: getattr(prep, k) for k in ("image_size", "resize", "crop_pct", "interpolation", "mean", "std")}
        d["preprocess_from_weights"] = sorted(weights_prep)
    if json_out:
        typer.echo(json.dumps(d))
        return
    lines = [
        *( [f"source        {source}"] if source else [] ),
        f"image         {config.image_size} x {config.image_size} x {config.in_channels}",
        f"patch         {config.patch_size} x {config.patch_size} x {config.in_channels} = {config.patch_dim} values (P^2*C)",
        f"grid          {config.num_patch_row} x {config.num_patch_row} = {config.num_patches} patches (N)",
        f"embedding     D = {config.emb_dim}",
        f"tokens        {config.num_tokens} x {config.emb_dim}  ({_token_layout(config)})",
        f"parameters    {config.num_params:,}",
    ]
    if "preprocess" in d:
        p = d["preprocess"]
        resize = (f"crop (shorter side to {int(p['image_size'] / p['crop_pct'])}, centre {p['image_size']})"
                  if p["resize"] == "crop" else p["resize"])
        origin = "the weights'" if weights_prep else "vitembed's defaults"
        lines.append(f"preprocess    {resize}, {p['interpolation']}, mean {_floats(p['mean'])}, std {_floats(p['std'])}  "
                     f"({origin})")
    typer.echo("\n".join(lines))


def _token_layout(config) -> str:
    parts, row = [], 0
    if config.class_token:
        parts.append("row 0: class token")
        row = 1
    if config.num_reg_tokens:
        last = row + config.num_reg_tokens - 1
        parts.append(f"rows {row}..{last}: register tokens" if last > row else f"row {row}: register token")
        row = last + 1
    parts.append(f"rows {row}..{row + config.num_patches - 1}: patches")
    return ", ".join(parts)


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _describe(config) -> dict:
    return {
        **config.to_dict(),
        "grid": [config.num_patch_row, config.num_patch_row],
        "patch_dim": config.patch_dim,
        "num_patches": config.num_patches,
        "tokens": list(config.token_shape),
        "parameters": config.num_params,
    }


@app.command(cls=_Command)
@_guard
def inspect(
    files: Annotated[list[Path], typer.Argument(metavar="FILES...", help="Saved outputs (.npy or .pt).", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Show shape, dtype, min, mean, std and max of saved outputs.

    Example:

        vitembed inspect cat.npy tokens/*.npy
    """
    from .outcomes import display_path
    from .stats import tensor_stats

    failed = 0
    rows = []
    for path in files:
        try:
            stats = tensor_stats(path)
        except InputError as exc:
            failed += 1
            _fail(f"{display_path(path)}: {exc}", 1)
            continue
        stats = {"file": display_path(path), **stats}
        if json_out:
            typer.echo(json.dumps(stats))
        rows.append(stats)
    if rows and not json_out:
        from rich.console import Console

        from .report import print_table

        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print_table(Console(highlight=False), ("file", "shape", "dtype", "min", "mean", "std", "max"),
                    [(s["file"], " x ".join(map(str, s["shape"])), s["dtype"], fmt(s["min"]), fmt(s["mean"]),
                      fmt(s["std"]), fmt(s["max"])) for s in rows], paths=(0,))
    raise typer.Exit(1 if failed else 0)


app.add_typer(show_app, name="show")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM before the encode loop: unwind (temporaries removed), exit 143


def main() -> None:
    from .startup import exit_without_teardown, start_early

    signal.signal(signal.SIGTERM, _terminate)
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
