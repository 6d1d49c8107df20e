"""`vitembed.encode`'s inputs: one path is one input, anything that is not paths is refused first."""

from __future__ import annotations

from pathlib import Path

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
