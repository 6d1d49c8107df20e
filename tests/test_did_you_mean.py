"""A misspelt name gets the nearest one it could mean, for presets and for every other named choice."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("given", ["vit_b16", "ViT-B/16", "B/16", "vit-b-16"])
def test_preset_spellings_suggest_vit_b16(given):
    result = run_cli("info", "--preset", given)
    assert result.returncode == 2
    assert f"unknown preset {given!r} (did you mean vit-b16?)" in result.stderr.decode()


@pytest.mark.parametrize("option, given, meant", [
    ("--resize", "crap", "crop"), ("--tokens", "z1", "z0"), ("--normalize", "imagnet", "imagenet"),
    ("--interpolation", "bicubc", "bicubic"), ("--format", "npz", "npy"), ("--engine", "nump", "numpy"),
    ("--pos-resample", "tim", "timm"), ("--pos-init", "sincos2", "sincos"),
])
def test_command_line_choices_suggest_the_nearest_name(tmp_path, option, given, meant):
    result = run_cli("encode", tmp_path / "none.png", option, given)
    assert result.returncode == 2
    assert f"(did you mean {meant}?)" in result.stderr.decode()


@pytest.mark.parametrize("options, meant", [
    ({"resize": "crap"}, "crop"), ({"normalize": "imagnet"}, "imagenet"), ({"tokens": "z1"}, "z0"),
    ({"pos_resample": "hff"}, "hf"), ({"engine": "nump"}, "numpy"), ({"format": "ptt"}, "pt"),
    ({"interpolation": "bilinar"}, "bilinear"), ({"preset": "vit_l14"}, "vit-l14"),
])
def test_library_choices_suggest_the_nearest_name(tmp_path, options, meant):
    from vitembed import encode
    from vitembed.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"\(did you mean {meant}\?\)"):
        encode([str(tmp_path / "none.png")], str(tmp_path / "out"), workers=0, **options)
