"""Weights whose values cannot make tokens (NaN, infinite, complex) and shard indexes that name
no shard are refused in one line naming the file and the tensor."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_image, run_cli
from vitembed.errors import WeightsError
from vitembed.weights.load import load_weights

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]


def _seed_state(**changes) -> dict:
    """A seed-class state dict (32 px, P = 8, D = 16) with some tensors replaced."""
    from tests.seed_reference import SeedVitInputLayer

    torch.manual_seed(0)
    state = SeedVitInputLayer(emb_dim=16, num_patch_row=4, image_size=32).state_dict()
    return {**state, **changes}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad, suffix):
    pos = _seed_state()["pos_emb"].clone()
    pos[0, 3, 5] = bad
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(_seed_state(pos_emb=pos), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _seed_state(pos_emb=pos).items()}, path)
    image = make_image(tmp_path / "a.png")
    r = run_cli("encode", image, "--weights", path, "-j", "0", "-o", tmp_path / "out")
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.decode().splitlines() if line.startswith("error")]
    assert errors == [f"error: {path}: pos_emb holds NaN or infinite values; the input layer's weights must be "
                      "finite numbers"]
    assert not (tmp_path / "out").exists()


def test_complex_weights_are_refused_naming_the_tensor(tmp_path):
    weight = _seed_state()["patch_emb_layer.weight"]
    path = tmp_path / "complex.pth"
    torch.save(_seed_state(**{"patch_emb_layer.weight": weight.to(torch.complex64)}), path)
    with pytest.raises(WeightsError, match=r"complex\.pth: patch_emb_layer\.weight is complex \(complex64\)"):
        load_weights(path)
    r = run_cli("info", "--weights", path)
    assert r.returncode == 1 and b"Traceback" not in r.stderr and b"Warning" not in r.stderr, r.stderr[-2000:]


def test_a_layer_file_with_nan_is_refused(tmp_path):
    path = tmp_path / "layer.pt"
    assert run_cli("init", *SMALL, "-o", path).returncode == 0
    data = torch.load(path, weights_only=True)
    data["state_dict"]["cls_token"][0, 0, 0] = float("nan")
    torch.save(data, path)
    with pytest.raises(WeightsError, match=r"layer\.pt: cls_token holds NaN or infinite values"):
        load_weights(path)


def test_finite_weights_still_load(tmp_path):
    path = tmp_path / "good.pth"
    torch.save(_seed_state(), path)
    assert load_weights(path).config.grid == (4, 4)


@pytest.mark.parametrize("entry", ["model.safetensors.index.json", "config.json"])
def test_a_shard_index_naming_itself_or_a_json_file_says_what_it_is(tmp_path, entry):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32, "patch_size": 8,
                                                    "hidden_size": 16, "num_channels": 3}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "vit.embeddings.patch_embeddings.projection.weight": entry}}))
    with pytest.raises(WeightsError) as refused:
        load_weights(folder)
    message = str(refused.value)
    assert "pickle" not in message and f"to {entry!r}" in message and "not a shard" in message, message
