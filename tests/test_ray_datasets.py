"""Datasets on Ray: `vitembed encode --ray` over tar shards and Parquet tables (paths and file://
URIs) gives a local run's bytes, and `vitembed.ray.encode` takes `ray.data.read_webdataset`'s
rows. One Ray instance serves the session (`ray_session`, conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, run_cli
from tests.test_ray import ACTORS, SMALL, assert_same_folder
from tests.test_tar_inputs import pack

pytestmark = pytest.mark.slow  # a Ray cluster, actors that start in seconds


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """Two tar shards (one gzipped) and a Parquet table of small images, and the images as files."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("ray-datasets")
    images = [make_image(root / "images" / f"{i:03d}{['.jpg', '.png'][i % 2]}", size=(40 + i, 30 + i), seed=i)
              for i in range(8)]
    pack(root / "data" / "s0.tar", [(p.name, p.read_bytes()) for p in images[:4]] + [("bad.jpg", b"not an image")])
    pack(root / "data" / "s1.tar.gz", [(p.name, p.read_bytes()) for p in images[4:]], "w:gz")
    pq.write_table(pa.table({"image": [p.read_bytes() for p in images]}), root / "data" / "t.parquet",
                   row_group_size=3)
    return root


def test_tars_and_tables_on_ray_give_a_local_run_s_bytes(ray_session, datasets, tmp_path):
    local = run_cli("encode", datasets / "data", "-o", tmp_path / "local", *SMALL, "-q")
    ray = run_cli("encode", datasets / "data", "-o", tmp_path / "ray", *SMALL, "-q", "--ray", *ACTORS)
    assert (local.returncode, ray.returncode) == (1, 1), ray.stderr  # bad.jpg
    assert_same_folder(tmp_path / "local", tmp_path / "ray")
    assert len(list((tmp_path / "ray").rglob("*.npy"))) == 16


def test_file_uris_of_shards_and_tables_are_read_on_ray(ray_session, datasets, tmp_path):
    uri = f"file://{datasets}/data"
    ray = run_cli("encode", f"{uri}/s{{0..0}}.tar", f"{uri}/t.parquet", "-o", tmp_path / "ray", *SMALL, "--json",
                  "--ray", *ACTORS)
    lines = json_lines(ray.stdout)
    assert [line["input"] for line in lines] == [f"{uri}/s0.tar/{k}" for k in ("000", "001", "002", "003", "bad")] + [
        f"{uri}/t.parquet/{i:06d}" for i in range(8)]
    local = run_cli("encode", datasets / "data" / "s0.tar", datasets / "data" / "t.parquet", "-o", tmp_path / "local",
                    *SMALL, "-q")
    assert local.returncode == 1
    for path in (tmp_path / "local").rglob("*.npy"):
        assert path.read_bytes() == (tmp_path / "ray" / path.relative_to(tmp_path / "local")).read_bytes()


def test_vitembed_ray_encode_takes_read_webdataset_rows(ray_session, datasets, tmp_path):
    import vitembed.ray

    local = tmp_path / "local"
    assert run_cli("encode", datasets / "images", "-o", local, *SMALL, "-q").returncode == 0
    ds = ray_session.data.read_webdataset(str(datasets / "data" / "s1.tar.gz"), decoder=None)
    out = vitembed.ray.encode(ds, image_size=32, patch_size=8, emb_dim=16, num_cpus=0.5, actors=1)
    rows = out.take_all()
    assert [row["__key__"] for row in rows] == ["004", "005", "006", "007"]
    assert "jpg" not in rows[0] and "png" not in rows[0]
    for row in rows:
        assert row["error"] is None
        assert np.array_equal(np.asarray(row["tokens"]), np.load(next(local.glob(f"{row['__key__']}.*"))))


def test_rows_ray_decoded_are_refused_with_the_reader_option_to_use(ray_session, datasets, tmp_path):
    import vitembed.ray

    jpegs = pack(tmp_path / "j.tar", [(f"{k}.jpg", (datasets / "images" / f"{k}.jpg").read_bytes()) for k in ("000", "002")])
    ds = ray_session.data.read_webdataset(str(jpegs))  # Ray decodes images by default
    with pytest.raises(Exception, match=r"decoder=None"):
        vitembed.ray.encode(ds, image_size=32, patch_size=8, emb_dim=16, num_cpus=0.5, actors=1).take_all()
