"""Hardening of what vitembed reads that others made: weights (--weights) and outputs (inspect).

Issue #12, items 4, 5 and 11. Every call that could hang or exhaust memory
if a defence regressed runs in a subprocess with a capped address space and a timeout, so that a
regression fails its test instead of taking the machine down with it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vitembed.cli import app
from vitembed.ptformat import _pickle
from vitembed.weights import load_weights, save_layer

from tests.conftest import make_image

GiB = 1 << 30
TORCH_MEMORY = 6 * GiB  # python + torch take about 3.3 GiB of address space before any work


def run_limited(*args, memory: int = TORCH_MEMORY, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m vitembed ARGS` with its address space capped at `memory` bytes, stopped after `timeout` s."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vitembed", *map(str, args)], capture_output=True,
                          timeout=timeout, env=env, preexec_fn=cap)


def assert_one_line(r, *substrings: str, code: int = 1) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for s in substrings:
        assert s in err, err
    return err


def small_layer():
    from vitembed.layer import LayerConfig, build_layer

    return build_layer(LayerConfig(32, 8, 16), seed=0)


def input_layer(d: int = 48, p: int = 8, grid: int = 4) -> dict[str, torch.Tensor]:
    """A timm ViT's input layer (all a checkpoint needs to be recognised)."""
    g = torch.Generator().manual_seed(0)
    return {"patch_embed.proj.weight": torch.randn(d, 3, p, p, generator=g), "patch_embed.proj.bias": torch.randn(d, generator=g),
            "cls_token": torch.randn(1, 1, d, generator=g), "pos_embed": torch.randn(1, 1 + grid * grid, d, generator=g)}


def save_safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# --------------------------------------------------------------------------- item 4


def _weights_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A weights path that is, or leads to, a device or a FIFO; and the words its refusal must hold."""
    if case in ("zero.pt", "urandom.pt"):
        (tmp_path / case).symlink_to("/dev/" + case.removesuffix(".pt"))
        return tmp_path / case, "not a regular file (a character device)"
    if case.startswith("fifo"):
        os.mkfifo(tmp_path / case)
        return tmp_path / case, "not a regular file (a FIFO)"
    folder = tmp_path / "vit"
    folder.mkdir()
    if case == "folder/model.safetensors -> /dev/zero":
        (folder / "model.safetensors").symlink_to("/dev/zero")
        return folder, "not a regular file"
    names = list(input_layer())
    if case == "index entry /dev/zero":
        weight_map, words = {k: "/dev/zero" for k in names}, "outside its folder"
    elif case == "index entry ../":
        torch.save(input_layer(), tmp_path / "outside.bin")
        weight_map, words = {k: "../outside.bin" for k in names}, "outside its folder"
    else:  # an entry inside the folder that is a link to a device
        (folder / "shard.bin").symlink_to("/dev/zero")
        weight_map, words = {k: "shard.bin" for k in names}, "not a regular file"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, words


@pytest.mark.parametrize("case", ["zero.pt", "urandom.pt", "fifo.pt", "fifo.safetensors",
                                  "folder/model.safetensors -> /dev/zero", "index entry /dev/zero",
                                  "index entry ../", "index entry -> /dev/zero"])
def test_device_or_fifo_as_weights_is_refused(tmp_path, case):
    """Issue #12 item 4: /dev/zero, /dev/urandom or a FIFO as weights, directly, through a folder or
    through a shard index, is refused before it is opened (it used to eat all memory or hang)."""
    path, words = _weights_case(tmp_path, case)
    assert_one_line(run_limited("info", "--weights", path, timeout=60), words)


# --------------------------------------------------------------------------- item 5


def _layer_file_claiming(tmp_path: Path, suffix: str, **config) -> Path:
    """A layer file of a small layer whose stored config claims something else."""
    path = tmp_path / f"layer{suffix}"
    save_layer(small_layer(), path)
    if suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
        save_file(state, str(path), metadata=meta)
    else:
        payload = torch.load(path, weights_only=True)
        payload["config"].update(config)
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("case", ["expanded pos_embed", "expanded conv weight", "layer image_size 22400",
                                  "layer image_size 1400000", "layer.safetensors image_size 22400",
                                  "layer patch_size 16", "layer emb_dim 32"])
def test_tiny_checkpoint_cannot_force_huge_allocations(tmp_path, case):
    """Issue #12 item 5: a few KB that claim GBs (zero-stride tensors, a layer file whose config
    lies about the tensors) are refused before anything is materialised, in one line."""
    if case.startswith("expanded"):
        state = input_layer(d=48, p=8, grid=2)
        if case == "expanded pos_embed":  # 8192 x 8192 patches: 3.2e9 values, 12.9 GB as float32
            state["pos_embed"] = torch.zeros(1).expand(1, 1 + 8192 * 8192, 48)
            words = ("pos_embed", "storage")
        else:  # patches of 4096 x 4096 pixels: 2.4e9 values, 9.7 GB
            state["patch_embed.proj.weight"] = torch.zeros(1).expand(48, 3, 4096, 4096)
            words = ("patch_embed.proj.weight", "storage")
        path = tmp_path / "tiny.pt"
        torch.save(state, path)
        assert path.stat().st_size < 50_000
    else:
        name, key, value = case.split()
        path = _layer_file_claiming(tmp_path, Path(name).suffix or ".pt", **{key: int(value)})
        words = ("its config",)
    assert_one_line(run_limited("info", "--weights", path, timeout=60), *words)
    r = run_limited("encode", make_image(tmp_path / "x.png"), "-o", tmp_path / "z.npy", "--weights", path,
                    "--workers", "0", timeout=60)
    assert_one_line(r, *words)


def test_storage_and_size_checks_let_real_layers_through(tmp_path):
    state = input_layer()
    state["pos_embed"] = state["pos_embed"].transpose(1, 2).contiguous().transpose(1, 2)  # strided, not contiguous
    torch.save(state, tmp_path / "strided.pt")
    loaded = load_weights(tmp_path / "strided.pt")
    torch.testing.assert_close(loaded.state_dict["pos_emb"], state["pos_embed"], atol=0, rtol=0)
    assert loaded.build()(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 48)
    # 10000 x 10000 patches: 19 GB of position embedding, refused before resampling.
    assert_one_line(run_limited("info", "--weights", tmp_path / "strided.pt", "--image-size", "80000"), "limit", code=2)


# --------------------------------------------------------------------------- item 11


PROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "size": {"height": 32, "width": 32}, "resample": 2}
CENTRE_CROP = {"do_center_crop": True, "size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}

MALFORMED = {  # name: (file, its JSON text, words of the refusal)
    "string image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": "0.5"}, "image_mean"),
    "missing image_std": ("preprocessor_config.json", {k: v for k, v in PROCESSOR.items() if k != "image_std"},
                          "image_std"),
    "crop_size.height x": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "crop_size": {"height": "x"}},
                           "crop_size"),
    "list size": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "size": [36]}, "size"),
    "1e308 image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": [1e308] * 3}, "image_mean"),
    "10**400 crop_size": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "crop_size": {"height": 10**400}},
                          "crop_size"),
    "10**400 image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [10**400] * 3}, "image_std"),
    "NaN image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": [0.5, float("nan"), 0.5]}, "image_mean"),
    "NaN image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [float("nan")] * 3}, "image_std"),
    "zero image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [0.5, 0, 0.5]}, "image_std"),
    "timm crop_pct abc": ("config.json", {"pretrained_cfg": {"crop_pct": "abc"}}, "crop_pct"),
    "timm NaN std": ("config.json", {"pretrained_cfg": {"mean": [0.5] * 3, "std": [float("nan")] * 3}}, "std"),
}


@pytest.mark.parametrize("case", [*MALFORMED, "layer version abc"])
def test_malformed_weights_folder_is_one_clear_line(tmp_path, case):
    """Issue #12 item 11: a malformed config beside the weights is one line naming the file and the
    reason, never a traceback nor NaN tokens reported "ok"."""
    if case == "layer version abc":
        path = tmp_path / "layer.pt"
        save_layer(small_layer(), path)
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "version": "abc"}, path)
        where, words = path, "version"
    else:
        name, content, words = MALFORMED[case]
        path = tmp_path / "vit"
        save_safetensors(input_layer(), path / "model.safetensors")
        (path / name).write_text(json.dumps(content))
        where = path / name
    result = CliRunner().invoke(app, ["info", "--weights", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(where) in lines[0] and words in lines[0], result.output


def test_valid_processor_variants_still_load(tmp_path):
    folder = tmp_path / "vit"
    save_safetensors(input_layer(), folder / "model.safetensors")
    for processor, expected in (
        ({**PROCESSOR, "image_mean": 0.25, "image_std": 0.5}, {"mean": (0.25,) * 3, "std": (0.5,) * 3}),
        ({**PROCESSOR, **CENTRE_CROP}, {"resize": "crop"}),
        ({**PROCESSOR, **CENTRE_CROP, "size": 36, "crop_size": 32}, {"resize": "crop"}),
        ({**PROCESSOR, "size": [32, 32]}, {"resize": "squash"}),
        ({**PROCESSOR, "do_normalize": False}, {"mean": (0.0,) * 3, "std": (1.0,) * 3}),
    ):
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
        loaded = load_weights(folder)
        assert {k: loaded.preprocess[k] for k in expected} == expected, processor
