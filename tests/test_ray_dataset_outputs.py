"""`vitembed encode --ray` into Parquet and WebDataset shards: the same tables as a local run (the
Parquet schema's record differs only in the device that made it; WebDataset tars byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_images, read_manifest, run_cli

pytestmark = pytest.mark.slow  # a Ray cluster, actors that start in seconds

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]
ACTORS = ["--ray-cpus", "0.5", "--ray-actors", "2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = make_images(tmp_path_factory.mktemp("ray-datasets") / "photos", [f"img{i:02d}.png" for i in range(11)])
    (folder / "bad.jpg").write_bytes(b"not an image")
    return folder


def _runs(photos: Path, tmp_path: Path, *options: str) -> tuple[Path, Path]:
    local = run_cli("encode", photos, "-o", tmp_path / "local", *SMALL, *options, "--shard-size", "4", "-q")
    ray = run_cli("encode", photos, "-o", tmp_path / "ray", *SMALL, *options, "--shard-size", "4", "-q", "--ray",
                  *ACTORS)
    assert (local.returncode, ray.returncode) == (1, 1), ray.stderr  # bad.jpg
    manifest = lambda folder: sorted(map(json.dumps, read_manifest(folder)))  # noqa: E731
    assert manifest(tmp_path / "local") == manifest(tmp_path / "ray")
    return tmp_path / "local", tmp_path / "ray"


def test_parquet_tables_equal_a_local_run_s(ray_session, photos, tmp_path):
    import pyarrow.parquet as pq

    local, ray = _runs(photos, tmp_path, "--format", "parquet")
    names = sorted(p.name for p in local.glob("*.parquet"))
    assert names == sorted(p.name for p in ray.glob("*.parquet")) and len(names) == 3
    for name in names:
        a, b = pq.read_table(local / name), pq.read_table(ray / name)
        assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None)), name
        record_a, record_b = (json.loads(t.schema.metadata[b"vitembed"]) for t in (a, b))
        assert (record_a.pop("device"), record_b.pop("device")) == ("cpu", "ray:cpu")  # what must differ
        assert record_a == record_b and a.schema.metadata[b"vitembed.dtype"] == b.schema.metadata[b"vitembed.dtype"]
    assert pq.read_table(ray / names[0]).column("error").null_count == 3  # bad.jpg is row 0's


def test_webdataset_tars_equal_a_local_run_s(ray_session, photos, tmp_path):
    local, ray = _runs(photos, tmp_path, "--format", "wds")
    names = sorted(p.name for p in local.glob("*.tar"))
    assert names == sorted(p.name for p in ray.glob("*.tar")) and len(names) == 3
    for name in names:
        assert (local / name).read_bytes() == (ray / name).read_bytes(), name


def test_a_uri_named_parquet_is_a_parquet_dataset(ray_session, photos, tmp_path):
    import pyarrow.parquet as pq

    r = run_cli("encode", photos, "-o", f"file://{tmp_path}/t.parquet", *SMALL, "-q", "--ray", *ACTORS)
    assert r.returncode == 1, r.stderr  # bad.jpg
    table = pq.read_table(tmp_path / "t.parquet" / "shard-00000.parquet")
    assert table.num_rows == 12 and table.column("error").null_count == 11
    assert json.loads((tmp_path / "t.parquet" / "run.json").read_text())["config"]["format"] == "parquet"
