"""The command line's shared parts: option types (every command's --preset is the same option,
an `Annotated` alias that each command names in its own signature),
the choices they offer (from `choices`), help as Click users expect it, and the mapping of the
library's errors to one red line and an exit code. Light to import: typer only.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from enum import Enum
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import choices
from ..errors import ConfigError, InputError, OutputError, VitembedError, WeightsError, printable

__all__ = ["Command", "Group", "echo", "fail", "guard", "notice", "stdout_writes", "value"]


def _choice(name: str, values) -> type[Enum]:
    """A str Enum of the values, as Typer wants choices (no import of the modules that use them)."""
    return Enum(name, {v: v for v in values}, type=str)


Resize = _choice("Resize", choices.RESIZE_MODES)
Interpolation = _choice("Interpolation", choices.INTERPOLATIONS)
Normalize = _choice("Normalize", choices.NORMALIZATIONS)
Format = _choice("Format", choices.FORMATS)
Engine = _choice("Engine", choices.ENGINES)
Decode = _choice("Decode", choices.DECODES)
PosInit = _choice("PosInit", choices.POS_INITS)
PosResample = _choice("PosResample", choices.POS_RESAMPLES)
Tokens = _choice("Tokens", choices.TOKENS)


def choice_metavar(enum: type[Enum]) -> str:
    return "[" + "|".join(member.value for member in enum) + "]"


def value(option):
    """An option's value: an Enum member's string, anything else as it is."""
    return option.value if isinstance(option, Enum) else option


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

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Click's parsing, and a refused choice's nearest name ("did you mean crop?")."""
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            _suggest_choice(exc)
            raise


_CHOICES = {"resize": choices.RESIZE_MODES, "interpolation": choices.INTERPOLATIONS,
            "normalize": choices.NORMALIZATIONS, "format": choices.FORMATS, "engine": choices.ENGINES,
            "decode": choices.DECODES, "pos_init": choices.POS_INITS, "pos_resample": choices.POS_RESAMPLES,
            "tokens": choices.TOKENS}  # each Enum option's parameter name: its names


def _suggest_choice(exc) -> None:
    """Add the nearest name to Click's "'crap' is not one of ..." for an option of `_CHOICES`."""
    import re

    names = _CHOICES.get(getattr(getattr(exc, "param", None), "name", None))
    given = re.search(r"'([^']*)' is not", getattr(exc, "message", "") or "")
    if names and given:
        exc.message += choices.suggest(given.group(1), names)


class Command(_ClickHelp, TyperCommand):
    def format_options(self, ctx, formatter) -> None:
        """Arguments, then the options in their panels (Layer options, Image options, ...), as plain
        text: no markup read in help strings, nothing cut at any width."""
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panel = "Arguments" if param.param_type_name == "argument" else \
                    f"{getattr(param, 'rich_help_panel', None) or ''} options".strip().capitalize()
                sections.setdefault(panel, []).append(record)
        for name in sorted(sections, key=lambda n: (n != "Arguments", n != "Options")):
            with formatter.section(name):
                formatter.write_dl(sections[name])

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(_ClickHelp, TyperGroup):
    def format_commands(self, ctx, formatter) -> None:
        """Each command with its whole first sentence (Click cuts it to the width left)."""
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, command.get_short_help_str(limit=1000)) for name, command in commands
                if command is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


LAYER = "Layer"
IMAGE = "Image"
RUN = "Run"
RAY = "Ray"

PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", metavar="NAME", help="Layer shape: vitbook-s14 (default: the ViT book's worked example, 224 px, P=14, D=384), vit-b16, vit-l14, ... (see `vitembed info --presets`).", rich_help_panel=LAYER)]
ImageSizeOpt = Annotated[Optional[str], typer.Option("--image-size", metavar="PIXELS|HxW", help="Side S of a square input, or height x width (224x320), pixels; multiples of P. With --weights the position embedding is resampled.", rich_help_panel=LAYER)]
PatchSizeOpt = Annotated[Optional[int], typer.Option("--patch-size", metavar="PIXELS", help="Side P of a patch, pixels. With --weights trained at another P, E is resampled (FlexiViT's pseudo-inverse, as timm's resample_patch_embed).", rich_help_panel=LAYER)]
NumPatchRowOpt = Annotated[Optional[int], typer.Option("--num-patch-row", metavar="INTEGER", help="Patches per side of a square input (the ViT book's way to set P = S / rows).", rich_help_panel=LAYER)]
EmbDimOpt = Annotated[Optional[int], typer.Option("--emb-dim", metavar="INTEGER", help="Token length D.", rich_help_panel=LAYER)]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", metavar="INTEGER", help="Image channels C: 3 (RGB) or 1 (grey).", rich_help_panel=LAYER)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", metavar="FILE|NAME", help="Layer file from `vitembed init`; a timm, torchvision, transformers or ViT book (VitInputLayer) state dict (.pt/.pth/.bin/.safetensors) or save_pretrained folder; or torchvision:vit_b_16, timm:MODEL.TAG, hf:ORG/REPO. Fixes P, D, C; --image-size resamples the position embedding.", rich_help_panel=LAYER)]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Seed of the random layer (ignored with --weights).", rich_help_panel=LAYER)]
InitSeedOpt = Annotated[int, typer.Option("--seed", metavar="INTEGER", help="Seed of the random layer.", rich_help_panel=LAYER)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (pip install 'vitembed[ray]'): $RAY_ADDRESS's or --ray-address's, else a local one for the run. Every node must see the inputs and outputs at the same paths (shared storage), or give them as URIs that pyarrow reads and writes (s3://, gs://, hdfs://, file://).", rich_help_panel=RAY)]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDRESS", help="The cluster to join: auto, HOST:PORT or ray://HOST:10001. Default: $RAY_ADDRESS, else a local cluster.", show_default=False, rich_help_panel=RAY)]
RayGpusOpt = Annotated[float, typer.Option("--ray-gpus", metavar="FLOAT", help="GPUs per actor (0.25: four actors share a GPU); the layer then runs with torch on CUDA.", rich_help_panel=RAY)]
RayCpusOpt = Annotated[float, typer.Option("--ray-cpus", metavar="FLOAT", help="CPUs per actor (fractions allowed).", rich_help_panel=RAY)]
RayActorsOpt = Annotated[Optional[int], typer.Option("--ray-actors", metavar="INTEGER", help="Actors at most. Default: as many as the cluster's CPUs (with --ray-gpus, GPUs) hold.", show_default=False, rich_help_panel=RAY)]


PosInitOpt = Annotated[PosInit, typer.Option("--pos-init", metavar=choice_metavar(PosInit), help="E_pos of a random layer: normal (N(0, 1), as the ViT book) or sincos (MAE's fixed 2-D sine-cosine table).", rich_help_panel=LAYER)]
PosResampleOpt = Annotated[Optional[PosResample], typer.Option("--pos-resample", metavar=choice_metavar(PosResample), help="How E_pos is resampled to another grid: timm (bicubic, antialiased), hf (bicubic), torchvision (bicubic, align_corners) or dinov2 (DINOv2's scale factor). Default: as the weights' own library does (info says which), else timm.", show_default=False, rich_help_panel=LAYER)]
TokensOpt = Annotated[Tokens, typer.Option("--tokens", metavar=choice_metavar(Tokens), help="z0: what the first transformer block receives, [x_class; x_p E] + E_pos (with any other prefix tokens), then the model's pre-norm if it has one (CLIP's ln_pre); z0-before-norm: z0 without that pre-norm; patches: x_p E only, N x D; patches+pos: x_p E + E_pos's patch rows, N x D (no class token).", rich_help_panel=LAYER)]
ResizeOpt = Annotated[Optional[Resize], typer.Option("--resize", metavar=choice_metavar(Resize), help="squash: straight to H x W; crop: keep aspect, cover (H, W)/crop-pct, centre crop; pad: keep aspect, pad; squash-crop: squash to (H, W)/crop-pct, centre crop (DeiT's processor); native (encode): the image's own aspect ratio, a grid of at most --max-patches patches. Default: the weights' own, else squash.", show_default=False, rich_help_panel=IMAGE)]
MaxPatchesOpt = Annotated[Optional[int], typer.Option("--max-patches", metavar="INTEGER", help="For --resize native: the most patches an image's grid may have (Pix2Struct's rule). Default: the layer's N (of --image-size).", show_default=False, rich_help_panel=IMAGE)]
CropPctOpt = Annotated[Optional[float], typer.Option("--crop-pct", metavar="FLOAT", help="For --resize crop and squash-crop, 0.1 to 1: 0.875 is 256 -> 224. Default: the weights' own, else 0.875.", show_default=False, rich_help_panel=IMAGE)]
InterpolationOpt = Annotated[Optional[Interpolation], typer.Option("--interpolation", metavar="FILTER", help="Resampling filter, antialiased: nearest, bilinear, bicubic or lanczos. Default: the weights' own, else bilinear.", show_default=False, rich_help_panel=IMAGE)]
BackgroundOpt = Annotated[str, typer.Option("--background", metavar="COLOUR", help="Colour under transparency and around --resize pad: a name, #rrggbb or r,g,b.", rich_help_panel=IMAGE)]
NormalizeOpt = Annotated[Optional[Normalize], typer.Option("--normalize", metavar="NAME", help="Per-channel mean and std: imagenet (also DINOv2/v3's), inception (0.5, 0.5; also SigLIP's), siglip (the same), clip (OpenAI CLIP's), or none (pixels / 255). Default: the weights' own, else the preset's, else imagenet.", show_default=False, rich_help_panel=IMAGE)]


def notice(notes, quiet: bool = False) -> None:
    if not quiet:
        for note in notes:
            typer.echo(f"note: {printable(note)}", err=True)


def fail(message: str, code: int) -> typer.Exit:
    from rich.console import Console

    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text.assemble(("error", "red"), ": ", printable(message)),
                                                soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def stdout_writes():
    """Writes to stdout in the block, flushed at its end: a reader that went away exits 141
    quietly; a full disk behind a redirection (any other OSError) is an `OutputError` naming
    stdout. Either way stdout then points at /dev/null, so that the exit's own flush is quiet."""
    from ..files.writes import describe_os_error, silence_stream

    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stream(sys.stdout)
        raise typer.Exit(141) from None
    except OSError as exc:
        silence_stream(sys.stdout)
        raise OutputError(f"stdout: {describe_os_error(exc)}") from None


def echo(text: str) -> None:
    """A line of data on stdout (`typer.echo`), under `stdout_writes`."""
    with stdout_writes():
        typer.echo(text)


def guard(func):
    """Turn the library's expected failures into one red line and an exit code."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise fail(str(exc), 2) from None
        except (WeightsError, InputError, OutputError, VitembedError) as exc:
            raise fail(str(exc), 1) from None

    return wrapper

