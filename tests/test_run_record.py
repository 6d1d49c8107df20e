"""run.json's schema version: written by every run, and the reader follows it (a run.json without
one is version 1); a record of an older schema is upgraded to the current form, then compared."""

from __future__ import annotations

import json

from tests.conftest import make_image, run_cli
from vitembed.pipeline.folder import RUN_SCHEMA

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j0", "-q"]


def _encode(tmp_path, *extra: str):
    return run_cli("encode", tmp_path / "in", "-o", tmp_path / "out", *SMALL, *extra)


def _assert_resumes(tmp_path) -> None:
    """A run of the same configuration into out/ skips its one input: the folder's record matched."""
    result = _encode(tmp_path, "--skip-existing", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["status"] == "skipped"


def test_run_json_says_its_schema_version(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["schema"] == RUN_SCHEMA == 3
    assert list(record) == ["schema", "config", "vitembed", "versions", "device"]


def test_a_run_json_without_schema_is_read_as_version_1(tmp_path):
    """A folder of a vitembed that wrote no version: the same configuration resumes, skipping its output."""
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    run_file = tmp_path / "out" / "run.json"
    record = json.loads(run_file.read_text())
    del record["schema"]
    run_file.write_text(json.dumps(record, indent=2) + "\n")
    _assert_resumes(tmp_path)


def test_a_run_json_of_an_unknown_schema_is_refused_as_unreadable(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    run_file = tmp_path / "out" / "run.json"
    record = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**record, "schema": 99}, indent=2) + "\n")
    result = _encode(tmp_path)
    assert result.returncode == 2
    assert b"run.json is unreadable (its schema is 99" in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr


# A run.json as schema 2 wrote it for SMALL (fields at their defaults left out), less its weights.
SCHEMA_2_CONFIG = {
    "layer": {"image_size": 32, "patch_size": 8, "emb_dim": 16, "in_channels": 3, "class_token": True,
              "num_reg_tokens": 0, "pos_embed_prefix": True},
    "preprocess": {"image_size": 32, "resize": "squash", "crop_pct": 0.875, "interpolation": "bilinear",
                   "background": [255, 255, 255], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "channels": 3, "fast_decode": False},
    "format": "npy",
    "dtype": "float32",
}


def _older_record(tmp_path, schema: int | None, **changes) -> None:
    """Replace out/run.json with one of `schema` (None: no schema key) for the same weights."""
    run_file = tmp_path / "out" / "run.json"
    record = json.loads(run_file.read_text())
    config = {**SCHEMA_2_CONFIG, "weights": record["config"]["weights"], **changes}
    older = {"config": config, "vitembed": "0.1.0", "versions": record["versions"], "device": "cpu"}
    run_file.write_text(json.dumps(older if schema is None else {"schema": schema, **older}, indent=2) + "\n")


def test_a_folder_of_schema_2_or_without_schema_resumes_when_its_configuration_is_this_run_s(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    for schema in (2, None):
        _older_record(tmp_path, schema)
        _assert_resumes(tmp_path)


def test_a_folder_of_schema_2_of_another_configuration_is_refused_with_the_difference(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    _older_record(tmp_path, 2, tokens="patches")
    result = _encode(tmp_path, "--skip-existing")
    assert result.returncode == 2
    assert b"--tokens patches then, z0 now" in result.stderr, result.stderr


def test_run_json_records_every_field_at_its_default(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    config = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert (config["shard_size"], config["tokens"], config["pos_resample"]) == (None, "z0", "timm")
    assert config["layer"]["image_width"] is None and config["layer"]["dist_token"] is False
    assert config["preprocess"]["max_patches"] is None and config["steps"]["prefix_tokens"] == ["class"]
