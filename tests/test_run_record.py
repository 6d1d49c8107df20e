"""run.json's schema version: written by every run, and the reader follows it (a run.json without
one is version 1, read as before)."""

from __future__ import annotations

import json

from tests.conftest import make_image, run_cli
from vitembed.pipeline.folder import RUN_SCHEMA

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j0", "-q"]


def _encode(tmp_path, *extra: str):
    return run_cli("encode", tmp_path / "in", "-o", tmp_path / "out", *SMALL, *extra)


def test_run_json_says_its_schema_version(tmp_path):
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["schema"] == RUN_SCHEMA == 2
    assert list(record) == ["schema", "config", "vitembed", "versions", "device"]


def test_a_run_json_without_schema_is_read_as_version_1(tmp_path):
    """A folder of a vitembed that wrote no version: the same configuration resumes, skipping its output."""
    make_image(tmp_path / "in" / "a.png")
    assert _encode(tmp_path).returncode == 0
    run_file = tmp_path / "out" / "run.json"
    record = json.loads(run_file.read_text())
    del record["schema"]
    run_file.write_text(json.dumps(record, indent=2) + "\n")
    result = _encode(tmp_path, "--skip-existing", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["status"] == "skipped"


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
