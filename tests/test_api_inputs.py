"""`vitembed.encode`'s inputs: one path is one input, anything that is not paths is refused first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vitembed
from tests.conftest import make_image
from vitembed.errors import ConfigError

SMALL = dict(image_size=32, patch_size=8, emb_dim=16, workers=0)


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlike"])
def test_one_path_string_is_one_input_not_its_characters(tmp_path, monkeypatch, as_path):
    """"ab.png" iterated would be "a", "b", ".", ...: "." walks the current folder (here tmp_path)."""
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "ab.png")
    make_image(tmp_path / "other.png", seed=1)
    seen = []
    summary = vitembed.encode(Path("ab.png") if as_path else "ab.png", tmp_path / "out", on_result=seen.append,
                              **SMALL)
    assert summary.total == 1 and summary.ok == 1, seen
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == ["ab.npy"]


def test_a_one_character_relative_name_is_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "a", format="PNG")
    summary = vitembed.encode("a", tmp_path / "out", **SMALL)
    assert summary.total == 1 and summary.ok == 1


@pytest.mark.parametrize("inputs, named", [
    (b"ab.png", "bytes"),
    ({"ab.png": 1}, "dict"),
    (5, "int"),
    (2.5, "float"),
    (None, "NoneType"),
    (["ab.png", 3], "int"),
    (["ab.png", b"ab.png"], "bytes"),
    ([["ab.png"]], "list"),
])
def test_inputs_that_are_not_paths_are_refused_before_anything_runs(tmp_path, monkeypatch, inputs, named):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "ab.png")
    with pytest.raises(ConfigError, match=rf"inputs must be a path or an iterable of paths.*{named}"):
        vitembed.encode(inputs, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ab.npy").exists()


# --------------------------------------------------------------------------- Encoder.encode's pixels

PIXELS = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def encoder():
    from vitembed.layer.config import LayerConfig
    from vitembed.layer.reference import build_layer

    return vitembed.Encoder(build_layer(LayerConfig(32, 8, 16), seed=1))


def _with(value, dtype):
    pixels = PIXELS.astype(dtype)
    pixels[1, 5, 7, 2] = value
    return pixels


@pytest.mark.parametrize("pixels, message", [
    (PIXELS.astype(bool), "got dtype bool"),
    (PIXELS.astype(np.complex64), "got dtype complex64"),
    (PIXELS.astype(object), "got dtype object"),
    (_with(2**40, np.int64), "from 0 to 1099511627776"),
    (_with(-1, np.int16), "from -1 to"),
    (_with(np.nan, np.float32), "NaN or infinite"),
    (_with(np.inf, np.float64), "NaN or infinite"),
    (_with(300.0, np.float32), "to 300.0"),
], ids=["bool", "complex", "object", "int64-2**40", "negative", "nan", "inf", "over-255"])
def test_encode_refuses_pixels_that_are_not_0_to_255(encoder, pixels, message):
    with pytest.raises(ValueError, match=r"expected pixel") as refused:
        encoder.encode(pixels)
    assert message in str(refused.value)
    with pytest.raises(ValueError, match=r"expected pixel"):
        encoder.encode(list(pixels))  # a list of images too


def test_encode_takes_uint8_and_whole_numbers_and_floats_within_0_to_255(encoder):
    expected = encoder.encode(PIXELS)
    np.testing.assert_array_equal(encoder.encode(PIXELS.astype(np.int64)), expected)
    np.testing.assert_allclose(encoder.encode(PIXELS.astype(np.float32)), expected, rtol=1e-6, atol=1e-5)
