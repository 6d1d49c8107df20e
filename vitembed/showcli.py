"""`vitembed show`: PNG pictures of what the input layer does (patches, tokens, filters, positions).

Light at import (typer only), so that `vitembed --help` and `vitembed show --help` stay fast:
torch, numpy and Pillow are imported inside the commands. The layer and image options mirror
cli.py's; the helpers that turn them into a layer (`_layer_config`, `_load_weights`,
`_preprocess`, `_guard`) are cli.py's, imported when a command runs.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

__all__ = ["PosInit", "PosInitOpt", "show_app"]

show_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Draw what the input layer does, as PNG pictures: patches, tokens, filters, positions.",
)


class PosInit(str, Enum):
    normal = "normal"
    sincos = "sincos"


# The same choices as cli.py's enums of these names (cli.py imports this module, not the reverse).
Resize = Enum("Resize", {v: v for v in ("squash", "crop", "pad")}, type=str)
Interpolation = Enum("Interpolation", {v: v for v in ("nearest", "bilinear", "bicubic", "lanczos")}, type=str)
Normalize = Enum("Normalize", {v: v for v in ("imagenet", "inception", "clip", "none")}, type=str)


LAYER, IMAGE, OUT = "Layer", "Image", "Output"
PosInitOpt = Annotated[PosInit, typer.Option("--pos-init", help="E_pos of a random layer: normal (the seed's N(0, 1)) or sincos (MAE's fixed 2-D sine-cosine table, class token row 0).", rich_help_panel=LAYER)]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="PNG file, a folder, or - for stdout. Default: beside the input (cat.patches.png), or in the current folder (filters.png). An earlier PNG there is replaced (said on stderr); any other file is left alone, with an error.", rich_help_panel=OUT)]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Layer shape: seed (default: 224 px, P=14, D=384), vit-b16, ... (see `vitembed info --presets`).", rich_help_panel=LAYER)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Side S of the square input, pixels.", rich_help_panel=LAYER)]
PatchSizeOpt = Annotated[Optional[int], typer.Option("--patch-size", help="Side P of a patch, pixels.", rich_help_panel=LAYER)]
NumPatchRowOpt = Annotated[Optional[int], typer.Option("--num-patch-row", help="Patches per side (P = S / rows).", rich_help_panel=LAYER)]
EmbDimOpt = Annotated[Optional[int], typer.Option("--emb-dim", help="Token length D.", rich_help_panel=LAYER)]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", help="Image channels C: 3 (RGB) or 1 (grey).", rich_help_panel=LAYER)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", help="Layer file from `vitembed init`; a timm, torchvision, transformers or seed state dict or save_pretrained folder; or torchvision:vit_b_16, timm:MODEL.TAG, hf:ORG/REPO (as for encode).", rich_help_panel=LAYER)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random layer (ignored with --weights).", rich_help_panel=LAYER)]
ResizeOpt = Annotated[Optional[Resize], typer.Option("--resize", help="As for encode. Default: the weights' own, else squash.", show_default=False, rich_help_panel=IMAGE)]
CropPctOpt = Annotated[Optional[float], typer.Option("--crop-pct", help="For --resize crop. Default: the weights' own, else 0.875.", show_default=False, rich_help_panel=IMAGE)]
InterpolationOpt = Annotated[Optional[Interpolation], typer.Option("--interpolation", help="Resampling filter. Default: the weights' own, else bilinear.", show_default=False, rich_help_panel=IMAGE)]
BackgroundOpt = Annotated[str, typer.Option("--background", help="Colour under transparency and around --resize pad.", rich_help_panel=IMAGE)]
NormalizeOpt = Annotated[Optional[Normalize], typer.Option("--normalize", help="Per-channel mean and std. Default: the weights' own, else imagenet.", show_default=False, rich_help_panel=IMAGE)]


def _guard(func):
    """cli.py's `_guard` (one red line and an exit code for expected failures), looked up when
    the command runs: cli.py imports this module, so it cannot be imported here at the top."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        # The PCAs and products here are small: one BLAS thread does them fastest, and OpenBLAS's
        # threads would contend with torch's on few cores (seconds instead of 50 ms). Takes effect
        # when numpy is first imported, as in a `vitembed show` process.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from .cli import _guard as guard

        return guard(func)(*args, **kwargs)

    return wrapper


@dataclass
class _Layer:
    """The layer the options chose: a shape, and either loaded weights or a random draw."""

    config: Any
    loaded: Any = None
    seed: int = 0
    pos_init: str = "normal"
    weights: str = ""

    def describe(self) -> str:
        if self.loaded is not None:
            name = Path(self.weights).name if Path(self.weights).exists() else self.weights
            return f"Layer: {self.loaded.source}, from {name}."
        e_pos = "MAE's sine-cosine table" if self.pos_init == "sincos" else "N(0, 1)"
        return f"Layer: random (--seed {self.seed}), E_pos {e_pos}."

    def parameters(self) -> dict:
        """The layer's tensors as float numpy arrays, under the seed's names."""
        if self.loaded is not None:
            state = self.loaded.state_dict
        else:
            from .layer import build_layer

            state = build_layer(self.config, self.seed, self.pos_init).state_dict()
        return {name: state[name].detach().float().cpu().numpy() for name in state.keys()}

    def module(self):
        if self.loaded is not None:
            return self.loaded.build()
        from .layer import build_layer

        return build_layer(self.config, self.seed, self.pos_init)


def _choose_layer(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights, seed=0,
                  pos_init=PosInit.normal) -> _Layer:
    from .cli import _layer_config, _load_weights, _notice

    if weights is None:
        return _Layer(_layer_config(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels),
                      seed=seed, pos_init=pos_init.value)
    if pos_init is not PosInit.normal:
        from .errors import ConfigError

        raise ConfigError("--pos-init applies to a random layer; --weights brings its own E_pos: drop one of them")
    loaded = _load_weights(weights, preset, image_size, patch_size, num_patch_row, emb_dim, in_channels)
    _notice(loaded)
    return _Layer(loaded.config, loaded, weights=str(weights))


def _prep(layer: _Layer, resize, crop_pct, interpolation, background, normalize=None):
    from .cli import _preprocess
    from .images import parse_color

    def value(choice):
        return choice.value if choice is not None else None

    return _preprocess(layer.config, layer.loaded, resize=value(resize), crop_pct=crop_pct,
                       interpolation=value(interpolation), background=parse_color(background), normalize=value(normalize))


def _describe_prep(prep, normalized: bool) -> str:
    resize = f"crop (crop-pct {prep.crop_pct})" if prep.resize == "crop" else prep.resize
    text = f"Preprocessing: --resize {resize}, --interpolation {prep.interpolation}"
    if normalized:
        text += f", normalised with mean {_numbers(prep.mean)}, std {_numbers(prep.std)}"
    return text + "."


def _numbers(values) -> str:
    text = ", ".join(f"{v:.4g}" for v in values)
    return f"({text})" if len(values) > 1 else text


def _load_pixels(path: Path, prep):
    from .errors import InputError
    from .images import load_image

    try:
        return load_image(path, prep)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _target(output: str | None, kind: str, source: Path | None) -> Path | None:
    """The -o target, checked before any work, so that a bad -o fails fast."""
    from .pngfile import check_replaceable, picture_target

    target = picture_target(output, kind, source)
    if target is not None:
        check_replaceable(target, (source,) if source is not None else ())
    return target


def _emit(picture, target: Path | None, source: Path | None) -> None:
    """Write the picture to `target` (None: stdout); report on stderr (stdout carries only the PNG)."""
    from .pngfile import write_png

    data = picture.png()
    if target is None:
        try:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise typer.Exit(141) from None
        return
    replaced = write_png(data, target, protected=(source,) if source is not None else ())
    w, h = picture.image.size
    typer.echo(f"{'replaced' if replaced else 'wrote'} {target} ({w} x {h} px)", err=True)


@show_app.command()
@_guard
def patches(
    image: Annotated[Path, typer.Argument(help="An image file.", show_default=False)],
    output: OutputOpt = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None,
    resize: ResizeOpt = None, crop_pct: CropPctOpt = None, interpolation: InterpolationOpt = None,
    background: BackgroundOpt = "white",
) -> None:
    """The image as the layer sees it, with its patch grid and token numbers.

    The image after the resize policy and before normalisation, enlarged without smoothing, the
    P x P grid drawn over it and each patch numbered with its row in z0 (0 is the class token).

    Example:

        vitembed show patches cat.jpg                  # writes cat.patches.png

        vitembed show patches cat.jpg --preset vit-b16 --resize crop -o grid.png
    """
    from .pictures import draw_patches

    target = _target(output, "patches", image)
    layer = _choose_layer(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights)
    prep = _prep(layer, resize, crop_pct, interpolation, background)
    pixels = _load_pixels(image, prep)
    s, g = layer.config.image_size, layer.config.num_patch_row
    title = f"{image.name} as the layer sees it: {s} x {s} px in {g} x {g} patches, numbered in token order"
    picture = draw_patches(pixels, layer.config, title, [_describe_prep(prep, False), layer.describe()])
    _emit(picture, target, image)


@show_app.command()
@_guard
def tokens(
    source: Annotated[Path, typer.Argument(help="An image, or tokens saved by `vitembed encode` (.npy / .pt; give the layer options they were made with).", show_default=False)],
    output: OutputOpt = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="With saved tokens: the image they came from, drawn beside them.", rich_help_panel=IMAGE)] = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0, pos_init: PosInitOpt = PosInit.normal,
    resize: ResizeOpt = None, crop_pct: CropPctOpt = None, interpolation: InterpolationOpt = None,
    background: BackgroundOpt = "white", normalize: NormalizeOpt = None,
) -> None:
    """Each patch token's L2 norm and first principal components, beside the image.

    The norm as a heat map and the first three principal components of the patch tokens as R, G,
    B, both on the patch grid, one block of equal pixels per patch.

    Example:

        vitembed show tokens cat.jpg                   # writes cat.tokens.png

        vitembed show tokens cat.npy --preset vit-b16 --image cat.jpg
    """
    from .figures import grid_tokens, token_norms, token_pca
    from .pictures import draw_tokens

    target = _target(output, "tokens", source)
    layer = _choose_layer(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights, seed, pos_init)
    prep = _prep(layer, resize, crop_pct, interpolation, background, normalize)
    saved = source.suffix.lower() in (".npy", ".pt")
    pixels = _load_pixels(image if saved else source, prep) if image is not None or not saved else None
    if saved:
        z0 = _read_tokens(source, layer.config)
        notes = [f"Tokens read from {source.name}; give the layer options they were made with.", layer.describe()]
    else:
        z0 = _tokens_of(layer, pixels, prep)
        notes = [_describe_prep(prep, True), layer.describe()]
    patch_tokens = grid_tokens(z0, layer.config)  # (g, g, D)
    pca = token_pca(patch_tokens, 3)
    title = f"Patch tokens of {source.name}: L2 norm and first principal components (D = {layer.config.emb_dim})"
    picture = draw_tokens(token_norms(patch_tokens), pca.values, pca.explained, title, pixels, notes)
    _emit(picture, target, source)


def _tokens_of(layer: _Layer, pixels, prep):
    """z0 of one preprocessed image, (N + prefix, D) float32 numpy, from the torch layer."""
    import torch

    module = layer.module()
    with torch.no_grad():
        z = module.forward_pixels(torch.from_numpy(pixels)[None], torch.tensor(prep.mean), torch.tensor(prep.std))
    return z[0].numpy()  # (1, N + prefix, D) -> (N + prefix, D)


def _read_tokens(path: Path, config):
    """A saved (N + prefix, D) output as float32 numpy; its shape must be the layer's."""
    import numpy as np

    from .config import PRESETS
    from .errors import ConfigError, InputError

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
    return array


@show_app.command()
@_guard
def filters(
    output: OutputOpt = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0,
) -> None:
    """The first 28 principal components of the patch embedding's filters (ViT Figure 7 left).

    E's D filters (each P x P x C) are the samples; each component is drawn as an RGB (or grey)
    tile scaled to its own min..max. A random layer's are noise; a trained one's are smooth.

    Example:

        vitembed show filters --weights timm:vit_base_patch16_224.augreg2_in21k_ft_in1k

        vitembed show filters --preset vit-b16 -o random-filters.png
    """
    from .figures import filter_pca
    from .pictures import draw_filters

    target = _target(output, "filters", None)
    layer = _choose_layer(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights, seed)
    weight = layer.parameters()["patch_emb_layer.weight"]  # (D, C, P, P)
    pca = filter_pca(weight, 28)
    k = pca.values.shape[0]
    title = f"Patch embedding filters: the first {k} principal components"
    picture = draw_filters(pca.values, pca.explained, weight.shape[0], title, [layer.describe()])
    _emit(picture, target, None)


@show_app.command()
@_guard
def positions(
    output: OutputOpt = None,
    preset: PresetOpt = None, image_size: ImageSizeOpt = None, patch_size: PatchSizeOpt = None,
    num_patch_row: NumPatchRowOpt = None, emb_dim: EmbDimOpt = None, in_channels: InChannelsOpt = None,
    weights: WeightsOpt = None, seed: SeedOpt = 0, pos_init: PosInitOpt = PosInit.normal,
) -> None:
    """Cosine similarity of the position embeddings between patches (ViT Figure 7 centre).

    Tile (i, j) maps the similarity of patch (i, j)'s E_pos row to every patch's, on one scale
    from -1 to 1.

    Example:

        vitembed show positions --pos-init sincos      # MAE's fixed table: smooth, local

        vitembed show positions --weights vit.safetensors -o pos.png
    """
    from .figures import grid_positions, position_similarity
    from .pictures import draw_positions

    target = _target(output, "positions", None)
    layer = _choose_layer(preset, image_size, patch_size, num_patch_row, emb_dim, in_channels, weights, seed, pos_init)
    pos = layer.parameters()["pos_emb"]  # (1, rows, D)
    similarity = position_similarity(grid_positions(pos, layer.config))  # (g, g, g, g)
    g = layer.config.num_patch_row
    title = f"Position embedding similarity: E_pos of each of the {g} x {g} patches against all others"
    picture = draw_positions(similarity, title, [layer.describe()])
    _emit(picture, target, None)
