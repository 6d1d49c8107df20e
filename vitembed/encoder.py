"""The Encoder: preprocessing + layer + engine. Images in, tokens out.

Every way of running vitembed builds one `Encoder` and calls it on batches: the command line
(through `skeleton.run`), a Python program, a Ray actor (`vitembed.ray`). It holds

- the preprocessing (`decode.Preprocess`: resize, normalisation), applied by `decode`;
- the layer's parameters, folded with the normalisation into one affine map (`kernel.fold`),
  for the tokens asked for (z0, patches, patches+pos), and for any grid with `--resize native`
  (each image then has a grid of its own: a list of images gives a list of token arrays);
- the engine that applies it: **numpy** (the CPU's: one matrix product per image, no torch) or
  **torch** (batches on a GPU, or the CPU, with JPEGs optionally decoded on the device).

Tokens come back as numpy arrays in the output dtype (float32, float16, or bfloat16 as its bits
in uint16, which `formats.write_tensor` writes as bfloat16).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .choices import ENGINES, POS_RESAMPLES, unknown
from .layer.config import LayerConfig, format_size
from .errors import ConfigError, InputError
from .files.formats import cast, output_dtype
from .images.decode import PlainJpeg, Preprocess, load_image
from .layer.kernel import GridTables, Kernel, LayerParams

__all__ = ["ENGINES", "Encoder", "FileBatch", "TorchEngine", "encode_images", "resolve_device", "tokens_to_numpy"]



@dataclass
class FileBatch:
    """Tokens of a batch of files: `tokens` (B, N+1, D), a NaN row where `errors[i]` says why; with
    `--resize native`, a list of (N_i + 1, D) arrays, None where `errors[i]` says why."""

    tokens: np.ndarray | list
    errors: list[str | None]


class Encoder:
    """Preprocessing + layer + engine, built once and called on batches.

    Args:
        layer: a `VitInputLayer`, `LayerParams`, or `LoadedWeights` (`load.load_weights`).
        prep: how files become pixels (default: the layer's size and channels, squash, bilinear,
            ImageNet normalisation).
        engine: numpy (CPU), torch (any device), or auto: numpy on the CPU, else torch.
        device: for torch: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.
        dtype: of the tokens returned: float32, float16 or bfloat16, or an alias such as fp16 or
            bf16 (computed in float32).
        tokens: z0 (default: what the first transformer block receives), z0-before-norm (z0
            without the layer's pre-norm), patches (x_p E: N x D, no class token, no E_pos) or
            patches+pos (x_p E + E_pos's patch rows, N x D).
        pos_resample: with `prep.resize == "native"`, how E_pos is resampled to each image's grid
            timm (bicubic, antialiased), hf (transformers' bicubic), torchvision or dinov2; None:
            as the checkpoint's own library does (`LoadedWeights.pos_resample`), else timm's.

    Raises:
        ConfigError: options that cannot work together (the message says which and how to fix it).
    """

    def __init__(self, layer: Any, prep: Preprocess | None = None, *, engine: str = "auto",
                 device: str = "auto", dtype: str = "float32", tokens: str = "z0", pos_resample: str | None = None):
        self.params = as_params(layer)
        self.config: LayerConfig = self.params.config
        cfg = self.config
        self.prep = prep or Preprocess(image_size=cfg.image_size, image_width=cfg.image_width, channels=cfg.in_channels)
        self.dtype = output_dtype(dtype)
        pos_resample = pos_resample or getattr(layer, "pos_resample", "timm")  # the checkpoint library's own
        self.tokens, self.pos_resample = tokens, pos_resample
        _check(self.prep, cfg, engine, pos_resample)
        native = pos_resample if self.prep.resize == "native" else None
        self.kernel: Kernel = self.params.fold(self.prep.mean, self.prep.std, tokens, native)
        self.engine = _engine(engine, device)
        self.torch = TorchEngine(self.kernel, resolve_device(device)) if self.engine == "torch" else None
        self.device = str(self.torch.device) if self.torch is not None else "cpu"

    @property
    def token_shape(self) -> tuple[int, int] | None:
        """(rows, D) of every image's tokens; None where each image has its own grid (native)."""
        return self.kernel.token_shape

    def grid_of(self, pixels) -> tuple[int, int] | None:
        """The patch grid (gh, gw) of one image's pixels where images have grids of their own, else None."""
        return None if self.kernel.grids is None else self.kernel.grid_of(tuple(pixels.shape))

    def decode(self, file) -> np.ndarray:
        """One image file (a path, bytes, or a binary file) -> (H, W, C) uint8 pixels.

        Raises:
            InputError: the file cannot be read or decoded.
        """
        if isinstance(file, (bytes, bytearray, memoryview)):
            file = io.BytesIO(file)
        return load_image(file, self.prep)

    def encode(self, pixels) -> np.ndarray | list[np.ndarray]:
        """(B, H, W, C) pixels -> (B, N+1, D) tokens in the encoder's dtype; a list of
        (H_i, W_i, C) images (native: grids of their own) -> a list of (N_i + 1, D) tokens.

        Pixels are values from 0 to 255, as `decode` gives them: uint8; or other integers, or
        finite floats, within 0..255 (floats from 0 to 1 would be read as nearly black).

        Raises:
            ValueError: another dtype (bool, complex, objects), a value outside 0..255 or not
                finite, or a shape the layer does not take.
        """
        if isinstance(pixels, (list, tuple)):
            return self._encode_list([check_pixels(image) for image in pixels], self.dtype)
        return self._encode_array(check_pixels(pixels), self.dtype)

    def _encode_array(self, pixels: np.ndarray, dtype: str) -> np.ndarray:
        if self.torch is None:
            return cast(self.kernel(pixels), dtype)
        return self.torch.to_numpy(self.torch.from_host(pixels), dtype)

    def _encode_list(self, images: list, dtype: str) -> list[np.ndarray]:
        """Images of one shape together, the tokens back in their order."""
        out: list = [None] * len(images)
        for group in by_shape(images):
            for i, tokens in zip(group, self._encode_array(np.stack([images[i] for i in group]), dtype)):
                out[i] = tokens
        return out

    def encode_files(self, files) -> FileBatch:
        """Image files (paths, bytes or binary files) -> their tokens, with per-file errors."""
        pixels, errors = [], []
        for file in files:
            try:
                pixels.append(self.decode(file))
                errors.append(None)
            except InputError as exc:
                pixels.append(None)
                errors.append(str(exc))
        good = [i for i, e in enumerate(errors) if e is None]
        if self.token_shape is None:  # native: a list, None for a file that failed
            tokens: list = [None] * len(errors)
            for i, z in zip(good, self._encode_list([pixels[i] for i in good], self.dtype)):
                tokens[i] = z
            return FileBatch(tokens, errors)
        tokens = np.full((len(errors), *self.token_shape), np.nan, np.float32)
        if good:
            tokens[good] = self._encode_array(np.stack([pixels[i] for i in good]), "float32")
        return FileBatch(cast(tokens, self.dtype), errors)

    def encode_items(self, items: list) -> list[np.ndarray | InputError]:
        """The pipeline's batches: (H, W, C) uint8 arrays, or `PlainJpeg` bytes for the device to
        decode (torch engine) -> tokens per item, or the InputError of a file the device decoder
        and Pillow both refused."""
        if self.torch is None:
            return self._encode_list(items, self.dtype)
        return self.torch.encode_items(items, self.prep, self.dtype)


def by_shape(items: list) -> list[list[int]]:
    """The indices of `items` (arrays or tensors) grouped by shape, each group in order."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.shape), []).append(i)
    return list(groups.values())


def as_params(layer: Any) -> LayerParams:
    """A layer in any of its forms -> its parameters as float32 numpy arrays."""
    if isinstance(layer, LayerParams):
        return layer
    if hasattr(layer, "state_dict") and hasattr(layer, "config"):
        state = layer.state_dict() if callable(layer.state_dict) else layer.state_dict
        return LayerParams.from_state_dict(layer.config, state)  # a VitInputLayer, or LoadedWeights
    raise TypeError(f"not a layer: {type(layer).__name__}; give a VitInputLayer, LayerParams or LoadedWeights")


def _check(prep: Preprocess, config: LayerConfig, engine: str, pos_resample: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(unknown("engine", engine, ENGINES))
    if pos_resample not in POS_RESAMPLES:
        raise ConfigError(unknown("position resampling", pos_resample, POS_RESAMPLES, " or "))
    if prep.resize == "native":
        if prep.patch_size != config.patch_size:
            raise ConfigError(f"--resize native cuts {prep.patch_size}-pixel patches but the layer's are "
                              f"{config.patch_size}; give Preprocess(patch_size={config.patch_size})")
    elif prep.size != config.size:
        raise ConfigError(f"images are resized to {format_size(prep.size)} but the layer takes "
                          f"{format_size(config.size)}; give the same --image-size to both")
    if prep.channels != config.in_channels:
        raise ConfigError(f"the layer takes {config.in_channels} channels; images can be read with 1 or 3")


def _engine(engine: str, device: str) -> str:
    """numpy where the layer runs on the CPU (unless torch is asked for), else torch."""
    if engine == "torch":
        return "torch"
    on_cpu = device == "cpu" or (device == "auto" and not _accelerator_present())
    if on_cpu:
        return "numpy"
    if engine == "numpy":
        raise ConfigError(f"--engine numpy runs on the CPU, not on --device {device}; "
                          "use --device cpu or --engine torch")
    return "torch"


def _accelerator_present() -> bool:
    """Whether --device auto may find a GPU; judged without importing torch where possible."""
    if "torch" in sys.modules:  # imported already (--weights): ask it, as --device auto does
        return resolve_device("auto").type != "cpu"
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # Apple silicon: MPS
    if sys.platform.startswith("linux"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        nvidia = visible not in ("", "-1") and (os.path.exists("/proc/driver/nvidia/version")
                                                 or os.path.exists("/dev/nvidiactl"))
        return nvidia or os.path.exists("/dev/kfd")  # /dev/kfd: ROCm
    return True  # elsewhere torch decides


def resolve_device(name: str):
    """A torch.device for --device, checking that it exists."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_pixels(pixels) -> np.ndarray:
    """`pixels` as an array of values from 0 to 255: uint8, or integers or finite floats in that
    range (kept as they are); anything else is a ValueError saying what was found."""
    array = np.asarray(pixels)
    if array.dtype == np.uint8:
        return array
    kind = array.dtype.kind
    if kind not in "uif":
        raise ValueError(f"expected pixels as uint8 (or whole numbers or finite floats from 0 to 255), got dtype "
                         f"{array.dtype}")
    if array.size:
        low, high = array.min(), array.max()  # NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 255):
            raise ValueError(f"expected pixel values from 0 to 255, got {array.dtype} values from {low} to {high}"
                             + (" (NaN or infinite)" if kind == "f" and not np.isfinite(array).all() else ""))
    return array


class TorchEngine:
    """The folded layer (`kernel.Kernel`'s W and T) applied with torch on `device`, in batches:
    a convolution with kernel = stride = P over channels-last uint8 pixels, then + T (the table of
    the batch's grid, kept on the device: one per grid with `--resize native`)."""

    def __init__(self, kernel: Kernel, device):
        import torch

        cfg = kernel.config
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.emb_dim
        self.config, self.device, self.kernel = cfg, device, kernel
        # W (P^2 C, D), rows in (P, P, C) order -> the convolution's weight (D, C, P, P)
        weight = torch.from_numpy(kernel.weight).reshape(p, p, c, d).permute(3, 2, 0, 1)
        self.weight = weight.contiguous().to(device)
        self.tables = {cfg.grid: torch.from_numpy(kernel.table).to(device)}  # grid -> (k + N, D)
        norm = kernel.norm
        self.norm = None if norm is None else (torch.from_numpy(norm.weight).to(device),
                                               torch.from_numpy(norm.bias).to(device), norm.eps)

    def table(self, grid: tuple[int, int]):
        """T for a grid, on the device (the last few kept)."""
        import torch

        if grid not in self.tables:
            while sum(t.nbytes for t in self.tables.values()) > GridTables.KEEP_BYTES:
                del self.tables[next(iter(self.tables))]
            self.tables[grid] = torch.from_numpy(self.kernel.table_for(grid)).to(self.device)
        return self.tables[grid]

    def __call__(self, pixels):
        """(B, H, W, C) uint8 pixels on the device -> z0 (B, k + N, D) float32 there."""
        import torch

        if pixels.ndim != 4:
            raise ValueError(f"expected a batch of pixels (B, H, W, C), got {tuple(pixels.shape)}")
        table = self.table(self.kernel.grid_of(tuple(pixels.shape)))
        x = pixels.permute(0, 3, 1, 2).float()  # (B, H, W, C) -> (B, C, H, W), channels-last in memory
        with torch.inference_mode(), _ieee_float32():
            z = torch.nn.functional.conv2d(x, self.weight, stride=self.config.patch_size)  # (1)-(3): (B, D, h, w)
            z = z.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
            k = self.kernel.prefix
            out = z.new_empty(z.shape[0], *table.shape)  # (B, k + N, D)
            out[:, :k] = table[:k]  # (4)-(5): the prefix tokens with their E_pos rows
            torch.add(z, table[k:], out=out[:, k:])  # (5): + bias (+ E_pos) of each patch
            if self.norm is not None:  # the pre-norm (CLIP's ln_pre); the prefix rows are normalised in T
                weight, bias, eps = self.norm
                out[:, k:] = torch.nn.functional.layer_norm(out[:, k:], (self.config.emb_dim,), weight, bias, eps)
        return out

    def from_host(self, pixels: np.ndarray):
        """z0 of (B, H, W, C) uint8 pixels in host memory (copied to the device asynchronously)."""
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # page-locked, so that the copy below is asynchronous
        return self(batch.to(self.device, non_blocking=True))

    def encode_items(self, items: list, prep: Preprocess, dtype: str) -> list:
        """Pixels (host arrays) and PlainJpegs (decoded here, on the device) -> tokens or InputError."""
        import torch

        items, out = list(items), [None] * len(items)
        at = [i for i, item in enumerate(items) if isinstance(item, PlainJpeg)]
        if at:
            from .images.device import decode_jpegs

            for i, decoded in zip(at, decode_jpegs([items[i] for i in at], prep, self.device)):
                items[i], out[i] = (None, InputError(decoded)) if isinstance(decoded, str) else (decoded, None)
        good = [i for i, item in enumerate(items) if item is not None]
        for group in by_shape([items[i] for i in good]):  # one batch per grid (one grid but with native)
            members = [good[j] for j in group]
            if all(isinstance(items[i], np.ndarray) for i in members):
                z = self.from_host(np.stack([items[i] for i in members]))
            else:  # some decoded on the device already
                z = self(torch.stack([torch.from_numpy(items[i]).to(self.device) if isinstance(items[i], np.ndarray)
                                      else items[i] for i in members]))
            for i, tokens in zip(members, self.to_numpy(z, dtype)):
                out[i] = tokens
        return out

    def to_numpy(self, z, dtype: str) -> np.ndarray:
        return tokens_to_numpy(z, dtype)


def tokens_to_numpy(z, dtype: str) -> np.ndarray:
    """Torch tokens (any device) -> a host array in `dtype` (bfloat16 as its uint16 bits)."""
    import torch

    z = z.to(getattr(torch, dtype)).cpu()
    return z.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else z.numpy()


@contextlib.contextmanager
def _ieee_float32():
    """Full float32 convolutions for a while. cuDNN on Ampere and later GPUs convolves float32 in
    TF32 (a 10-bit mantissa) by default, which would put z0 about 1e-3 off; the layer is far too
    small for that to buy any speed. The settings change nothing off CUDA."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved, conv.fp32_precision = conv.fp32_precision, "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
        return
    saved, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def encode_images(images, layer, prep: Preprocess | None = None, device: str = "cpu"):
    """z0 of in-memory images ((H, W, C) uint8 arrays) or files, as a float32 torch tensor
    (B, N+1, D), computed by the torch engine on `device`."""
    encoder = Encoder(layer, prep, engine="torch", device=device)
    pixels = np.stack([np.asarray(x, np.uint8) if isinstance(x, np.ndarray) else encoder.decode(x) for x in images])
    return encoder.torch.from_host(pixels).cpu()
