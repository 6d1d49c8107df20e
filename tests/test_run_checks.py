"""The run's checks: the options' own rules when the request is built (Ray's included), and the
rules that need the encoder and the output plan once per run, before the -o folder is opened."""

import pytest

import vitembed
from vitembed.errors import ConfigError
from vitembed.pipeline import skeleton
from vitembed.pipeline.request import EncodeRequest


def test_the_encoder_and_plan_are_checked_once_per_run(tmp_path, sample_paths, monkeypatch):
    calls = []
    real = skeleton.check
    monkeypatch.setattr(skeleton, "check", lambda *args: (calls.append(args), real(*args)))
    summary = vitembed.encode(sample_paths[:1], tmp_path / "out", preset="vit-ti16", image_size=32, workers=0)
    assert summary.ok == 1 and len(calls) == 1


def test_a_rule_the_plan_decides_refuses_before_the_folder_is_made(tmp_path, sample_paths):
    with pytest.raises(ConfigError, match="bfloat16 cannot be stored in .npy"):
        vitembed.encode(sample_paths[:1], tmp_path / "out", preset="vit-ti16", image_size=32, dtype="bfloat16",
                        workers=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, reason", [
    (dict(output="-"), "-o - writes one tensor"),
    (dict(workers=2), "--workers sets this machine's decoder processes"),
    (dict(decode_timeout=5), "--decode-timeout is not enforced on Ray"),
    (dict(decode="gpu"), "--decode gpu has not run on Ray"),
    (dict(engine="numpy", ray_gpus=1), "--engine numpy runs on the CPU, not on the GPUs"),
])
def test_what_the_options_alone_forbid_on_ray_is_refused_when_the_request_is_built(options, reason):
    with pytest.raises(ConfigError, match=f"--ray: {reason}" if "engine" not in options else reason):
        EncodeRequest.from_options(ray=True, **options)
