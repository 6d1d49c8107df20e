"""The options model: one frozen request, built and checked in one place for the command line and
the Python API, and commands whose options are written out in their own signatures."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import vitembed
from vitembed.errors import ConfigError
from vitembed.pipeline.request import EncodeRequest, ImageOptions, LayerOptions

from tests.conftest import make_image, run_cli

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j", "0"]
SMALL_API = dict(image_size=32, patch_size=8, emb_dim=16, workers=0)


@pytest.mark.parametrize("options, cli", [
    (dict(ray_gpus=1), ["--ray-gpus", "1"]),
    (dict(ray_address="auto", ray_actors=2), ["--ray-address", "auto", "--ray-actors", "2"]),
    (dict(ray=True, device="cpu"), ["--ray", "--device", "cpu"]),
    (dict(max_patches=4), ["--max-patches", "4"]),
    (dict(weights="x.pt", pos_init="sincos"), ["--weights", "x.pt", "--pos-init", "sincos"]),
    (dict(weights="x.pt", num_patch_row=4), ["--weights", "x.pt", "--num-patch-row", "4"]),
    (dict(seed=2**63), ["--seed", str(2**63)]),
    (dict(dtype="fp12"), ["--dtype", "fp12"]),
    (dict(output="s3://bucket/tokens/"), ["-o", "s3://bucket/tokens/"]),
])
def test_the_api_and_the_cli_refuse_the_same_combinations_with_the_same_message(tmp_path, options, cli):
    image = make_image(tmp_path / "a.png")
    options = {**SMALL_API, **options}
    if options.pop("output", None):
        cli_output, api_output = [], cli[1]
    else:
        cli_output, api_output = ["-o", str(tmp_path / "out")], tmp_path / "out"
    with pytest.raises(ConfigError) as refused:
        vitembed.encode([image], api_output, **options)
    r = run_cli("encode", image, *SMALL, *cli_output, *cli)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().strip().splitlines()[-1] == f"error: {refused.value}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "a.npy").exists()


def test_the_request_is_checked_when_built_before_any_input_is_read(tmp_path):
    """The builder alone refuses: no inputs, weights or outputs are needed to find these."""
    with pytest.raises(ConfigError, match="--ray-cpus applies to a run on Ray: add --ray"):
        EncodeRequest.from_options(ray_cpus=2.0)
    with pytest.raises(ConfigError, match="--weights fixes the layer shape; drop --preset"):
        EncodeRequest.from_options(weights=str(tmp_path / "absent.pt"), preset="vit-b16")
    with pytest.raises(TypeError, match="not an encode option: colour"):
        EncodeRequest.from_options(colour="red")


def test_the_request_is_frozen_and_in_parts():
    request = EncodeRequest.from_options(preset="vit-b16", resize="crop", output="out/", dtype="fp16", workers=0,
                                         engine="numpy")
    assert request.layer.preset == "vit-b16" and request.preprocessing.resize == "crop"
    assert request.output.path == "out/" and request.output.dtype == "float16"  # the alias, resolved once
    assert request.executor.engine == "numpy" and request.run.workers == 0 and request.run.ray is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.executor = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.layer.seed = 3


def test_on_ray_the_request_keeps_the_engine_it_was_given():
    """The actors' engine is the user's; the request is not rewritten to numpy on the CPU."""
    request = EncodeRequest.from_options(ray=True, engine="torch", ray_gpus=0.5, ray_actors=2)
    assert request.executor.engine == "torch" and request.executor.device == "auto"
    assert (request.run.ray.engine, request.run.ray.gpus, request.run.ray.actors) == ("torch", 0.5, 2)


def test_ray_options_given_twice_are_refused():
    from vitembed.pipeline.skeleton import RayOptions

    with pytest.raises(ConfigError, match="--ray-gpus: give them in RayOptions, or ray=True with them"):
        EncodeRequest.from_options(ray=RayOptions(cpus=2.0), ray_gpus=1.0)


def test_show_and_info_refuse_what_encode_refuses(tmp_path):
    """The layer part is checked wherever it is built: `show` and `info` give encode's messages."""
    with pytest.raises(ConfigError) as refused:
        LayerOptions(weights="x.pt", pos_init="sincos")
    r = run_cli("show", "positions", "--weights", "x.pt", "--pos-init", "sincos", "-o", tmp_path / "p.png")
    assert r.returncode == 2 and r.stderr.decode().strip().splitlines()[-1] == f"error: {refused.value}"
    r = run_cli("info", "--weights", "x.pt", "--num-patch-row", "4", "--image-size", "64")
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines()[-1] == (
        "error: give --num-patch-row alone with --weights, or --image-size and --patch-size")
    with pytest.raises(ConfigError, match="--max-patches 4 is for --resize native"):
        ImageOptions(max_patches=4)


def _commands():
    from vitembed.cli.main import app
    from vitembed.cli.show import show_app

    return [*app.registered_commands, *show_app.registered_commands]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c.callback.__name__)
def test_each_command_declares_its_options_in_its_own_signature(command):
    """No signature rewriting: what Typer parses is what the function, as written, declares."""
    import typer.main

    written = inspect.unwrap(command.callback)
    declared = [name for name, p in inspect.signature(written).parameters.items()
                if p.annotation not in ("typer.Context", "Context")]
    parsed = [param.name for param in typer.main.get_command_from_info(
        command, pretty_exceptions_short=True, rich_markup_mode="rich").params]
    assert sorted(declared) == sorted(parsed)
    assert not hasattr(written, "__signature__")
