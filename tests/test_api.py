"""The Python API: the Encoder, `vitembed.encode` and its rules (the CLI's)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import vitembed
from tests.conftest import make_image, run_cli
from vitembed.layer.config import LayerConfig
from vitembed.errors import ConfigError
from vitembed.images.decode import Preprocess
from vitembed.layer.reference import build_layer

SMALL = LayerConfig(32, 8, 16)


@pytest.fixture(scope="module")
def encoder():
    return vitembed.Encoder(build_layer(SMALL, seed=1))


def test_encode_files_paths_and_bytes_with_per_file_errors(encoder, tmp_path):
    good = make_image(tmp_path / "a.png")
    batch = encoder.encode_files([good, good.read_bytes(), tmp_path / "missing.png", b"not an image"])
    assert batch.tokens.shape == (4, 17, 16) and batch.tokens.dtype == np.float32
    np.testing.assert_array_equal(batch.tokens[0], batch.tokens[1])
    assert batch.errors[:2] == [None, None] and "no such file" in batch.errors[2] and "not an image" in batch.errors[3]
    assert np.isnan(batch.tokens[2:]).all() and not np.isnan(batch.tokens[:2]).any()


def test_encode_equals_the_torch_engine_and_the_reference_layer(encoder, tmp_path):
    import torch

    layer = build_layer(SMALL, seed=1)
    pixels = np.stack([encoder.decode(make_image(tmp_path / f"{i}.png", seed=i)) for i in range(3)])
    numpy_tokens = encoder.encode(pixels)
    torch_tokens = vitembed.Encoder(layer, engine="torch", device="cpu").encode(pixels)
    prep = Preprocess(image_size=32)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) \
        / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = layer(x).numpy()
    np.testing.assert_allclose(numpy_tokens, reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(torch_tokens, reference, rtol=1e-5, atol=1e-4)


def test_bfloat16_tokens_come_back_as_their_bits(tmp_path):
    import torch

    bf16 = vitembed.Encoder(build_layer(SMALL, seed=1), dtype="bf16")  # an alias
    batch = bf16.encode_files([make_image(tmp_path / "a.png")])
    assert bf16.dtype == "bfloat16" and batch.tokens.dtype == np.uint16
    f32 = vitembed.Encoder(build_layer(SMALL, seed=1)).encode_files([tmp_path / "a.png"]).tokens
    expected = torch.from_numpy(f32).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert (batch.tokens == expected).mean() > 0.999  # ties may round to the neighbouring step


def test_wrong_pixels_are_a_clear_error(encoder):
    with pytest.raises(ValueError, match=r"expected pixels of shape \(32, 32, 3\)"):
        encoder.encode(np.zeros((1, 16, 16, 3), np.uint8))


@pytest.mark.parametrize("options, cli, message", [
    (dict(skip_existing=True, overwrite=True), ["--skip-existing", "--overwrite"], "contradict each other"),
    (dict(weights="x.pt", preset="vit-b16"), ["--weights", "x.pt", "--preset", "vit-b16"], "drop --preset"),
    (dict(dtype="bfloat16"), ["--dtype", "bfloat16"], "bfloat16 cannot be stored in .npy"),
    (dict(shard_size=4), ["--shard-size", "4"], "--shard-size writes shards into an -o folder"),
    (dict(batch_size=0), ["--batch-size", "0"], "batch size must be at least 1"),
])
def test_the_library_refuses_what_the_cli_refuses_with_the_same_message(tmp_path, options, cli, message):
    image = make_image(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        vitembed.encode([image], **options)
    r = run_cli("encode", image, *cli)
    assert r.returncode == 2 and f"error: {refused.value}".encode() in r.stderr
    assert not (tmp_path / "a.npy").exists()
