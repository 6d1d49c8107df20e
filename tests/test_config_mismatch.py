"""An -o folder of another configuration is refused with the options that differ, their values
then and now, and the flags that would match the folder: never two fingerprints."""

from __future__ import annotations

import re

from tests.conftest import make_image, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")


def _refusal(tmp_path, *options) -> str:
    make_image(tmp_path / "photos" / "a.png")
    assert run_cli("encode", tmp_path / "photos", "-o", tmp_path / "out", *SMALL, "-q").returncode == 0
    result = run_cli("encode", tmp_path / "photos", "-o", tmp_path / "out", *options, "-q")
    assert result.returncode == 2
    return result.stderr.decode()


def test_mismatch_names_the_options_their_values_and_the_matching_flags(tmp_path):
    err = _refusal(tmp_path, "--image-size", "32", "--patch-size", "4", "--emb-dim", "16", "--seed", "5",
                   "--dtype", "fp16", "--normalize", "clip")
    assert not re.search(r"[0-9a-f]{64}", err)  # no fingerprint
    for told in ("--patch-size 8 then, 4 now", "--seed 0 then, 5 now", "--dtype float32 then, float16 now",
                 "--normalize imagenet then, clip now"):
        assert told in err, err
    assert "to add to it, run with --dtype float32, --patch-size 8, --seed 0, --normalize imagenet;" in err, err
    assert len(err.strip().splitlines()) == 1


def test_mismatch_of_a_random_layer_and_weights_names_weights(tmp_path):
    layer = tmp_path / "layer.pt"
    assert run_cli("init", *SMALL, "-o", layer).returncode == 0
    err = _refusal(tmp_path, "--weights", layer)
    assert "--weights none (a random layer) then, vitembed layer file now" in err
    assert "run with no --weights, --seed 0;" in err
