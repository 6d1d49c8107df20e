"""The `vitembed` command line: parse, call the library, print.

Heavy modules (torch, numpy, Pillow) are imported inside the commands, so that `--help` stays fast.
"""

from __future__ import annotations

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

from .errors import ConfigError, InputError, OutputError, VitembedError, WeightsError

app = typer.Typer(
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


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


LAYER = "Layer"
IMAGE = "Image"
RUN = "Run"

PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Layer shape: seed (default: 224 px, P=14, D=384), vit-b16, vit-l14, ... (see `vitembed info --presets`).", rich_help_panel=LAYER)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Side S of the square input, pixels.", rich_help_panel=LAYER)]
PatchSizeOpt = Annotated[Optional[int], typer.Option("--patch-size", help="Side P of a patch, pixels.", rich_help_panel=LAYER)]
NumPatchRowOpt = Annotated[Optional[int], typer.Option("--num-patch-row", help="Patches per side (the seed's way to set P = S / rows).", rich_help_panel=LAYER)]
EmbDimOpt = Annotated[Optional[int], typer.Option("--emb-dim", help="Token length D.", rich_help_panel=LAYER)]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", help="Image channels C: 3 (RGB) or 1 (grey).", rich_help_panel=LAYER)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", help="Layer file from `vitembed init`; a timm, torchvision, transformers or seed state dict (.pt/.pth/.bin/.safetensors) or save_pretrained folder; or torchvision:vit_b_16, timm:MODEL.TAG, hf:ORG/REPO. Fixes P, D, C; --image-size resamples the position embedding.", rich_help_panel=LAYER)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random layer (ignored with --weights).", rich_help_panel=LAYER)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels):
    from .config import resolve_config

    return resolve_config(
        preset, image_size=image_size, patch_size=patch_size, num_patch_row=num_patch_row,
        emb_dim=emb_dim, in_channels=in_channels,
    )


def _random_layer(config, seed):
    from .layer import build_layer

    return build_layer(config, seed)


def _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels):
    """LoadedWeights for --weights; --image-size / --num-patch-row resample, the shape options must agree."""
    from .weights import load_weights

    if preset is not None:
        raise ConfigError("--weights fixes the layer shape; drop --preset")
    if image_size is not None and num_patch_row is not None:
        raise ConfigError("give either --image-size or --num-patch-row with --weights, not both")
    loaded = load_weights(weights)
    cfg = loaded.config
    mismatched = [
        f"{flag} {value} (the weights have {actual})"
        for flag, value, actual in (("--patch-size", patch_size, cfg.patch_size), ("--emb-dim", emb_dim, cfg.emb_dim),
                                    ("--in-channels", in_channels, cfg.in_channels))
        if value is not None and value != actual
    ]
    if mismatched:
        raise ConfigError(f"--weights fixes the patch size, D and channels; drop {'; '.join(mismatched)} "
                          "(only --image-size may change: the position embedding is resampled)")
    if num_patch_row is not None:
        image_size = num_patch_row * cfg.patch_size
    if image_size is not None:
        from .checkpoints import resize_weights

        loaded = resize_weights(loaded, image_size)
    return loaded


def _notice(loaded, quiet: bool = False) -> None:
    if loaded is None or quiet:
        return
    for note in loaded.notes:
        typer.echo(f"note: {note}", err=True)


def _preprocess(config, loaded, **user):
    """Preprocess from, in order of precedence: the user's options, the weights' own, vitembed's defaults."""
    from .images import NORMALIZATIONS, Preprocess

    fields = dict(loaded.preprocess) if loaded is not None else {}
    normalize = user.pop("normalize", None)
    if normalize is not None:
        fields["mean"], fields["std"] = NORMALIZATIONS[normalize]
    fields.update({k: v for k, v in user.items() if v is not None})
    return Preprocess(image_size=config.image_size, channels=config.in_channels, **fields)


def _fail(message: str, code: int) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[red]error[/]: {message}", soft_wrap=True)
    return typer.Exit(code)


def _guard(func):
    """Turn the library's expected failures into one red line and an exit code."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        except (WeightsError, InputError, OutputError, VitembedError) as exc:
            raise _fail(str(exc), 1) from None

    return wrapper


@app.command()
@_guard
def encode(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (walked recursively), or - to read paths from stdin.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder, a FILE.npy / FILE.pt for one input, or - for stdout. Default: beside each input.", rich_help_panel=RUN)] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="Output file format (default npy, or the -o file's suffix).", rich_help_panel=RUN)] = None,
    null: Annotated[bool, typer.Option("--null", "-0", help="Paths on stdin are NUL-separated (find -print0).", rich_help_panel=RUN)] = False,
    preset: PresetOpt = None,
    image_size: ImageSizeOpt = None,
    patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None,
    emb_dim: EmbDimOpt = None,
    in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    resize: Annotated[Optional[Resize], typer.Option("--resize", help="squash: straight to S x S; crop: shorter side to S/crop-pct, centre crop; pad: keep aspect, pad to square. Default: the weights' own, else squash.", show_default=False, rich_help_panel=IMAGE)] = None,
    crop_pct: Annotated[Optional[float], typer.Option("--crop-pct", help="For --resize crop: 0.875 is 256 -> 224. Default: the weights' own, else 0.875.", show_default=False, rich_help_panel=IMAGE)] = None,
    interpolation: Annotated[Optional[Interpolation], typer.Option("--interpolation", help="Resampling filter (antialiased). Default: the weights' own, else bilinear.", show_default=False, rich_help_panel=IMAGE)] = None,
    background: Annotated[str, typer.Option("--background", help="Colour under transparency and around --resize pad: a name, #rrggbb or r,g,b.", rich_help_panel=IMAGE)] = "white",
    normalize: Annotated[Optional[Normalize], typer.Option("--normalize", help="Per-channel mean and std; none means pixels / 255. Default: the weights' own, else imagenet.", show_default=False, rich_help_panel=IMAGE)] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="Refuse images whose header claims more pixels (decompression bombs). Default: 178956970.", rich_help_panel=IMAGE)] = None,
    fast_decode: Annotated[bool, typer.Option("--fast-decode", help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling): much faster, pixels differ slightly.", rich_help_panel=IMAGE)] = False,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)] = "auto",
    engine: Annotated[Engine, typer.Option("--engine", help="numpy: each decoder process embeds and writes its images (CPU; torch is imported only to draw a random layer the first time, then cached). torch: batches on --device. auto: numpy where it applies, else torch.", rich_help_panel=RUN)] = Engine.auto,
    decode: Annotated[Decode, typer.Option("--decode", help="Where JPEGs are decoded and resized: cpu (Pillow, in the decoder processes), gpu (nvJPEG on the CUDA device, in batches; other formats still by Pillow; not yet checked on a GPU), auto: cpu for now.", rich_help_panel=RUN)] = Decode.auto,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Output dtype (computed in float32).", rich_help_panel=RUN)] = Dtype.float32,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per layer call.", rich_help_panel=RUN)] = 32,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Decoding processes (default: one per core; 0: decode in the main process).", rich_help_panel=RUN)] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Resume: skip inputs whose output already exists.", rich_help_panel=RUN)] = False,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Write shards of K stacked tensors, (K, N+1, D) .npy files, into the -o folder; manifest.jsonl maps each input to its shard and row.", rich_help_panel=RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-encode into an -o folder that was made with another configuration (its old outputs are removed first).", rich_help_panel=RUN)] = False,
    decode_timeout: Annotated[float, typer.Option("--decode-timeout", help="Seconds one image may take to decode before it is reported as an error (with --workers > 0).", rich_help_panel=RUN)] = 120.0,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per input on stdout, as each finishes.", rich_help_panel=RUN)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, summary or progress bar on stderr.", rich_help_panel=RUN)] = False,
) -> None:
    """Encode images into z0 tokens, one (N+1) x D file per image.

    Row 0 of each output is the class token; rows 1..N are the patches in row-major order.

    Example:

        vitembed encode cat.png                      # writes cat.npy

        vitembed encode photos/ -o tokens/ --preset vit-b16

        find photos -name '*.jpg' -print0 | vitembed encode - -0 -o tokens/ --json | jq .output
    """
    # This process computes nothing with numpy's BLAS (decoders do, on one thread each); its extra
    # OpenBLAS threads would only spin for a while after numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .images import parse_color
    from .inputs import iter_sources
    from .pipeline import EncodeOptions, LazyLayer, encode as run_encode
    from .writers import OutputPlan

    plan = OutputPlan.from_option(output, fmt.value if fmt else None)
    if plan.mode == "stdout" and json_lines:
        raise ConfigError("-o - writes the tensor to stdout; it cannot be combined with --json")
    if skip_existing and overwrite:
        raise ConfigError("--skip-existing and --overwrite contradict each other; pick one")
    if inputs.count("-") > 1:
        raise ConfigError("- (read paths from stdin) may be given once")
    stdin = sys.stdin.buffer if "-" in inputs else None
    sources = iter_sources(inputs, stdin, null)
    if plan.mode in ("file", "stdout"):
        sources = list(sources)
        if len(sources) != 1:
            raise ConfigError(f"-o {output} takes exactly one input image, got {len(sources)}")

    if weights is None:
        # torch is not needed yet: the layer is built once decoding has started.
        config, loaded = _layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels), None
        layer_source = LazyLayer(config, functools.partial(_random_layer, config, seed), seed=seed)
    else:
        loaded = _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels)
        config = loaded.config
        layer_source = LazyLayer(config, loaded.build)
    _notice(loaded, quiet)
    prep = _preprocess(
        config, loaded, resize=resize.value if resize else None, crop_pct=crop_pct,
        interpolation=interpolation.value if interpolation else None, normalize=normalize.value if normalize else None,
        background=parse_color(background), fast_decode=fast_decode, max_pixels=max_pixels,
    )

    from .report import MANIFEST_FILE, Reporter, prepare_output_folder, silence_stream

    options = EncodeOptions(device=device, engine=engine.value, decode=decode.value, dtype=dtype.value, batch_size=batch_size, workers=workers,
                            skip_existing=skip_existing, shard_size=shard_size, decode_timeout=decode_timeout)
    manifest = plan.target / MANIFEST_FILE if plan.mode == "dir" else None
    if manifest is not None and skip_existing:
        from .report import read_manifest

        options.trusted_outputs = read_manifest(manifest)

    def before_writing(layer) -> None:
        if plan.mode == "dir":
            prepare_output_folder(plan, layer, loaded, prep, options, seed, overwrite=overwrite)

    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum, frame):
        if caught:  # a second Ctrl-C: leave now; outputs are whole files or absent anyway
            os._exit(128 + signum)
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    reporter = Reporter(json_lines=json_lines, quiet=quiet, manifest=manifest, target=plan.target, stop=stop)
    if reporter.shows_progress and stdin is None:
        # The total for the bar, counted beside the run: inputs stream, they are never all held.
        threading.Thread(target=lambda: reporter.set_total(sum(1 for _ in iter_sources(inputs))), daemon=True).start()
    try:
        summary = run_encode(sources, layer_source, prep, plan, options, on_result=reporter, stop=stop,
                             on_layer=before_writing)
    finally:
        reporter.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    reporter.finish(summary)
    if reporter.pipe_closed or summary.pipe_closed:
        silence_stream(sys.stdout)
        raise typer.Exit(141)
    if caught:
        reporter.console.print(
            f"interrupted: {summary.ok} encoded, {summary.skipped} skipped, {summary.errors} failed; "
            "every output written is complete. Run the same command with --skip-existing to resume."
        )
        raise typer.Exit(128 + caught[0])
    if summary.stopped:
        raise _fail(f"stopped: {summary.stopped}", 1)
    if summary.total == 0:
        raise _fail("no images found in the given inputs", 2)
    raise typer.Exit(1 if summary.errors else 0)


@app.command()
@_guard
def init(
    output: Annotated[Path, typer.Option("--output", "-o", help="Layer file to write: .pt or .safetensors.", show_default=False)],
    preset: PresetOpt = None,
    image_size: ImageSizeOpt = None,
    patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None,
    emb_dim: EmbDimOpt = None,
    in_channels: InChannelsOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Write a freshly initialised layer to a file, to encode with later via --weights.

    Example:

        vitembed init --preset vit-b16 --seed 7 -o layer.pt
    """
    from .layer import build_layer
    from .weights import save_layer

    config = _layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels)
    size = save_layer(build_layer(config, seed), output)
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"wrote {output}: tokens {config.num_tokens} x {config.emb_dim}, {config.num_params} parameters, {size} bytes"
    )


@app.command()
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
                typer.echo(f"{name:9} image {d['image_size']:4}  patch {d['patch_size']:2}  D {d['emb_dim']:5}  tokens {d['tokens'][0]} x {d['tokens'][1]}", err=True)
        return
    source = loaded = None
    if weights is not None:
        loaded = _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels)
        _notice(loaded)
        config, source = loaded.config, loaded.source
    else:
        config = resolve_config(preset, image_size=image_size, patch_size=patch_size, num_patch_row=num_patch_row,
                                emb_dim=emb_dim, in_channels=in_channels)
    d = _describe(config)
    if source:
        d["source"] = source
        prep = _preprocess(config, loaded)
        d["preprocess"] = {k: getattr(prep, k) for k in ("image_size", "resize", "crop_pct", "interpolation", "mean", "std")}
        d["preprocess_from_weights"] = sorted(loaded.preprocess)
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
        origin = "the weights'" if loaded.preprocess else "vitembed's defaults"
        lines.append(f"preprocess    {resize}, {p['interpolation']}, mean {_floats(p['mean'])}, std {_floats(p['std'])}  "
                     f"({origin})")
    typer.echo("\n".join(lines), err=True)


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


@app.command()
@_guard
def inspect(
    files: Annotated[list[Path], typer.Argument(help="Saved outputs (.npy or .pt).", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Show shape, dtype, min, mean, std and max of saved outputs.

    Example:

        vitembed inspect cat.npy tokens/*.npy
    """
    from .report import display_path
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
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("file", "shape", "dtype", "min", "mean", "std", "max"):
            table.add_column(col, overflow="fold")
        for s in rows:
            fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
            table.add_row(s["file"], " x ".join(map(str, s["shape"])), s["dtype"], fmt(s["min"]), fmt(s["mean"]),
                          fmt(s["std"]), fmt(s["max"]))
        Console(stderr=True, highlight=False).print(table)
    raise typer.Exit(1 if failed else 0)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM before the encode loop: unwind (temporaries removed), exit 143


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    encoding = sys.argv[1:2] == ["encode"]
    if encoding and _decoders_wanted(sys.argv[2:]):
        from .processes import start_decoder_server

        start_decoder_server()  # before typer's imports and parsing, which it then overlaps
    try:
        app(prog_name="vitembed")
    except KeyboardInterrupt:  # Ctrl-C before the encode loop took over: nothing half-done to report
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit as exc:
        if encoding:
            _exit_without_teardown(exc.code)
        raise


def _decoders_wanted(args: list[str]) -> bool:
    """Whether `encode ARGS` will start decoder processes: not for --help or --workers 0."""
    if "--help" in args or "-h" in args:
        return False
    for i, arg in enumerate(args):
        if arg in ("-j", "--workers") and args[i + 1:i + 2] == ["0"] or arg in ("-j0", "--workers=0"):
            return False
    return True


def _exit_without_teardown(code: int | str | None) -> None:
    """Exit as `sys.exit(code)` would, less the interpreter's teardown of every module (numpy,
    Pillow, typer, pydantic): about 40 ms of every encode, spent after the work is done.

    Only once `encode` has returned with this thread alone (its files are closed and its decoder
    processes joined), and with no profiler or debugger attached. The exit handlers still run, and
    the standard streams are flushed.
    """
    if threading.active_count() > 1:
        return  # a thread still runs; let the interpreter wait for it as usual
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return  # a profiler or debugger (python -m cProfile ...) writes its results on the way out
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what the interpreter returns when its final flush fails
    os._exit(code)
