"""`vitembed show`: PNG pictures of what the input layer does (patches, tokens, filters, positions).

Light at import (typer only), so that `vitembed --help` and `vitembed show --help` stay fast:
torch, numpy and Pillow are imported inside the commands. The layer and image options are
`encode`'s (`options.py`); the layer and the preprocessing come from them as for `encode`
(`request.LayerOptions`, `request.ImageOptions`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .options import (
    IMAGE, BackgroundOpt, Command, CropPctOpt, EmbDimOpt, Group, ImageSizeOpt, InChannelsOpt, InterpolationOpt,
    NormalizeOpt, NumPatchRowOpt, PatchSizeOpt, PosInit, PosInitOpt, PresetOpt, ResizeOpt, SeedOpt, WeightsOpt,
    guard, notice, stdout_writes, value,
)
from ..errors import printable

__all__ = ["show_app"]

show_app = typer.Typer(
    cls=Group,
    rich_markup_mode=None,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Draw what the input layer does, as PNG pictures: patches, tokens, filters, positions.",
)


OUT = "Output"
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", metavar="PATH", help="PNG file, a folder, or - for stdout. Default: in the current folder (cat.patches.png, filters.png). An earlier PNG there is replaced (said on stderr); any other file is left alone, with an error.", rich_help_panel=OUT)]


def _command():
    """A `show` command: Click-style help, and errors as one line."""
    return lambda func: show_app.command(cls=Command)(guard(func))


@dataclass
class _Layer:
    """The layer the options chose, as `request.LayerOptions.load` gives it."""

    layer: Any  # LayerParams (random) or LoadedWeights
    source: str
    weights_prep: dict

    @property
    def config(self):
        return self.layer.config

    def describe(self) -> str:
        return f"Layer: {self.source}."

    def parameters(self) -> dict:
        """The layer's tensors as float32 numpy arrays, under the ViT book's names."""
        from ..encoder import as_params

        return as_params(self.layer).tensors


def _part(part, params: dict):
    """The command's options (its `ctx.params`) that are fields of `part`, as a `part`."""
    names = {f.name for f in dataclasses.fields(part)}
    return part(**{name: value(v) for name, v in params.items() if name in names})


def _layer_options(params: dict):
    """The command's layer options as `request.LayerOptions` (imported here: `--help` stays light)."""
    from ..pipeline.request import LayerOptions

    return _part(LayerOptions, params)


def _choose_layer(options) -> _Layer:
    layer, source, notes, weights_prep = options.load()
    notice(notes)
    return _Layer(layer, source, weights_prep)


def _prep(layer: _Layer, params: dict):
    """The preprocessing of the command's image options (`ctx.params`), for `layer`."""
    from ..errors import ConfigError
    from ..pipeline.request import ImageOptions

    options = _part(ImageOptions, params)
    if options.resize == "native":
        raise ConfigError("vitembed show draws the layer's own grid; --resize native is encode's (each image its own "
                          "grid): show one with --image-size HxW --resize squash")
    return options.preprocess(layer.config, layer.weights_prep)


def _describe_prep(prep, normalized: bool) -> str:
    resize = f"{prep.resize} (crop-pct {prep.crop_pct})" if "crop" in prep.resize else prep.resize
    text = f"Preprocessing: --resize {resize}, --interpolation {prep.interpolation}"
    if normalized:
        text += f", normalised with mean {_numbers(prep.mean)}, std {_numbers(prep.std)}"
    return text + "."


def _numbers(values) -> str:
    text = ", ".join(f"{v:.4g}" for v in values)
    return f"({text})" if len(values) > 1 else text


def _load_pixels(path: Path, prep):
    from ..errors import InputError
    from ..images.decode import load_image

    try:
        return load_image(path, prep)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _target(output: str | None, kind: str, source: Path | None) -> Path | None:
    """The -o target, checked before any work, so that a bad -o fails fast."""
    from ..files.pngfile import check_replaceable, picture_target

    target = picture_target(output, kind, source)
    if target is not None:
        check_replaceable(target, (source,) if source is not None else ())
    return target


def _emit(picture, target: Path | None, source: Path | None) -> None:
    """Write the picture to `target` (None: stdout); report on stderr (stdout carries only the PNG)."""
    from ..files.pngfile import write_png

    data = picture.png()
    if target is None:
        with stdout_writes():
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return
    replaced = write_png(data, target, protected=(source,) if source is not None else ())
    w, h = picture.image.size
    typer.echo(printable(f"{'replaced' if replaced else 'wrote'} {target} ({w} x {h} px)"), err=True)


@_command()
def patches(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="An image file.", show_default=False)],
    output: OutputOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    resize: ResizeOpt = None, crop_pct: CropPctOpt = None, interpolation: InterpolationOpt = None,
    background: BackgroundOpt = "white",
) -> None:
    """The image as the layer sees it, with its patch grid and token numbers.

    The image after the resize policy and before normalisation, enlarged without smoothing, the
    P x P grid drawn over it and each patch numbered with its row in z0 (0 is the class token).

    Example:

    \b
        vitembed show patches cat.jpg                  # writes cat.patches.png
        vitembed show patches cat.jpg --preset vit-b16 --resize crop -o grid.png
    """
    from ..show.pictures import draw_patches

    target = _target(output, "patches", image)
    chosen = _choose_layer(_layer_options(ctx.params))
    prep = _prep(chosen, ctx.params)
    pixels = _load_pixels(image, prep)
    (h, w), (gh, gw) = chosen.config.size, chosen.config.grid
    title = f"{image.name} as the layer sees it: {h} x {w} px in {gh} x {gw} patches, numbered in token order"
    picture = draw_patches(pixels, chosen.config, title, [_describe_prep(prep, False), chosen.describe()])
    _emit(picture, target, image)


@_command()
def tokens(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="An image, or tokens saved by `vitembed encode` (.npy / .pt; give the layer options they were made with).", show_default=False)],
    output: OutputOpt = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="With saved tokens: the image they came from, drawn beside them.", rich_help_panel=IMAGE)] = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0, pos_init: PosInitOpt = PosInit.normal,
    normalize: NormalizeOpt = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    resize: ResizeOpt = None, crop_pct: CropPctOpt = None, interpolation: InterpolationOpt = None,
    background: BackgroundOpt = "white",
) -> None:
    """Each patch token's L2 norm and first principal components, beside the image.

    The norm as a heat map and the first three principal components of the patch tokens as R, G,
    B, both on the patch grid, one block of equal pixels per patch.

    Example:

    \b
        vitembed show tokens cat.jpg                   # writes cat.tokens.png
        vitembed show tokens cat.npy --preset vit-b16 --image cat.jpg
    """
    from ..show.figures import grid_tokens, token_norms, token_pca
    from ..show.pictures import draw_tokens

    target = _target(output, "tokens", source)
    chosen = _choose_layer(_layer_options(ctx.params))
    prep = _prep(chosen, ctx.params)
    saved = source.suffix.lower() in (".npy", ".pt")
    pixels = _load_pixels(image if saved else source, prep) if image is not None or not saved else None
    if saved:
        z0 = _read_tokens(source, chosen.config)
        notes = [f"Tokens read from {source.name}; give the layer options they were made with.", chosen.describe()]
    else:
        z0 = _tokens_of(chosen, pixels, prep)
        notes = [_describe_prep(prep, True), chosen.describe()]
    patch_tokens = grid_tokens(z0, chosen.config)  # (gh, gw, D)
    pca = token_pca(patch_tokens, 3)
    title = f"Patch tokens of {source.name}: L2 norm and first principal components (D = {chosen.config.emb_dim})"
    picture = draw_tokens(token_norms(patch_tokens), pca.values, pca.explained, title, pixels, notes)
    _emit(picture, target, source)


def _tokens_of(layer: _Layer, pixels, prep):
    """z0 of one preprocessed image, (N + prefix, D) float32 numpy."""
    from ..encoder import Encoder

    return Encoder(layer.layer, prep).encode(pixels[None])[0]  # (1, N + prefix, D) -> (N + prefix, D)


def _read_tokens(path: Path, config):
    """A saved (N + prefix, D) output as float32 numpy; its shape must be the layer's."""
    import numpy as np

    from ..layer.config import PRESETS
    from ..errors import ConfigError, InputError

    try:
        if path.suffix.lower() == ".pt":
            import torch

            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise InputError(f"{path}: holds a {type(tensor).__name__}, not a tensor")
            array = tensor.detach().float().numpy()
        else:
            array = np.load(path, allow_pickle=False).astype(np.float32)
    except InputError:
        raise
    except Exception as exc:  # numpy and torch raise many kinds for a bad file
        raise InputError(f"{path}: cannot read tokens: {' '.join(str(exc).split())[:200]}") from None
    if array.shape != config.token_shape:
        fits = [name for name, cfg in PRESETS.items() if cfg.token_shape == array.shape]
        hint = f"; --preset {' or '.join(fits)} gives that shape" if fits else ""
        raise ConfigError(f"{path}: tokens of shape {' x '.join(map(str, array.shape))}, but the layer gives "
                          f"{' x '.join(map(str, config.token_shape))}: pass the layer options they were made with{hint}")
    if not np.isfinite(array).all():
        raise InputError(f"{path}: holds NaN or infinite values (the row of an input that failed?); "
                         "only finite tokens can be drawn")
    return array


@_command()
def filters(
    ctx: typer.Context,
    output: OutputOpt = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
) -> None:
    """The first 28 principal components of the patch embedding's filters (ViT Figure 7 left).

    E's D filters (each P x P x C) are the samples; each component is drawn as an RGB (or grey)
    tile scaled to its own min..max. A random layer's are noise; a trained one's are smooth.

    Example:

    \b
        vitembed show filters --weights timm:vit_base_patch16_224.augreg_in21k
        vitembed show filters --preset vit-b16 -o random-filters.png
    """
    from ..show.figures import filter_pca
    from ..show.pictures import draw_filters

    target = _target(output, "filters", None)
    chosen = _choose_layer(_layer_options(ctx.params))
    weight = chosen.parameters()["patch_emb_layer.weight"]  # (D, C, P, P)
    pca = filter_pca(weight, 28)
    k = pca.values.shape[0]
    title = f"Patch embedding filters: the first {k} principal components"
    picture = draw_filters(pca.values, pca.explained, weight.shape[0], title, [chosen.describe()])
    _emit(picture, target, None)


@_command()
def positions(
    ctx: typer.Context,
    output: OutputOpt = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0, pos_init: PosInitOpt = PosInit.normal,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
) -> None:
    """Cosine similarity of the position embeddings between patches (ViT Figure 7 centre).

    Tile (i, j) maps the similarity of patch (i, j)'s E_pos row to every patch's, on one scale
    from -1 to 1. Grids of at most 64 patches a side (the picture grows as the side's fourth power).

    Example:

    \b
        vitembed show positions --pos-init sincos   # MAE's table: smooth, local
        vitembed show positions --weights vit.safetensors -o pos.png
    """
    from ..show.figures import check_position_grid, grid_positions, position_similarity_rows
    from ..show.pictures import draw_positions

    target = _target(output, "positions", None)
    options = _layer_options(ctx.params)
    if weights is None:  # refused before a random layer of that grid is drawn
        check_position_grid(options.config().grid)
    chosen = _choose_layer(options)
    if not chosen.config.pos_table:  # RoPE, relative bias: nothing in the layer to draw
        from ..errors import ConfigError

        raise ConfigError(f"vitembed show positions draws the position table E_pos, and {chosen.source} has none "
                          f"({chosen.config.steps()['positions']}); show patches, tokens or filters")
    check_position_grid(chosen.config.grid)
    pos = chosen.parameters()["pos_emb"]  # (1, rows, D)
    similarity = position_similarity_rows(grid_positions(pos, chosen.config))  # (gh, gw, gh, gw), row by row
    gh, gw = chosen.config.grid
    title = f"Position embedding similarity: E_pos of each of the {gh} x {gw} patches against all others"
    picture = draw_positions(similarity, title, [chosen.describe()])
    _emit(picture, target, None)
