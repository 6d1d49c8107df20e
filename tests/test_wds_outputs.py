"""WebDataset outputs (--format wds): tar shards of KEY.npy + KEY.json that the `webdataset` library
and Ray Data's `read_webdataset` read back as the .npy outputs; fixed member metadata; resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image, make_images, read_manifest, run_cli

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]
NAMES = ["a.png", "b.png", "c.jpg", "sub/d.png", "sub/e.png"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_images(tmp_path / "photos", NAMES)


def npy_by_input(folder: Path) -> dict[str, np.ndarray]:
    return {r["input"]: np.load(folder / r["output"]) for r in read_manifest(folder) if r["status"] == "ok"}


def read_samples(folder: Path) -> dict[str, tuple[str, np.ndarray, dict]]:
    """input -> (key, tokens, json) of every sample, with the webdataset library."""
    wds = pytest.importorskip("webdataset")
    urls = sorted(map(str, folder.glob("*.tar")))
    return {s["json"]["input"]: (s["__key__"], s["npy"], s["json"])
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_webdataset_reads_the_npy_outputs_tokens(photos, tmp_path, dtype):
    assert run_cli("encode", photos, "-o", tmp_path / "npy", *SMALL, "--dtype", dtype, "-q").returncode == 0
    r = run_cli("encode", photos, "-o", tmp_path / "wds", "--format", "wds", *SMALL, "--dtype", dtype,
                "--shard-size", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "wds").glob("*.tar")) == [f"shard-0000{i}.tar" for i in range(3)]
    samples, expected = read_samples(tmp_path / "wds"), npy_by_input(tmp_path / "npy")
    assert sorted(samples) == sorted(expected)
    for name, tokens in expected.items():
        assert samples[name][1].dtype == tokens.dtype
        np.testing.assert_array_equal(samples[name][1], tokens)
    assert [samples[str(photos / n)][0] for n in NAMES] == [f"{i:09d}" for i in range(5)]
    assert samples[str(photos / "sub/d.png")][2] == {"key": "sub/d", "input": str(photos / "sub/d.png")}
    rows = [(r["output"], r["row"]) for r in read_manifest(tmp_path / "wds")]
    assert rows == [(f"shard-{i // 2:05d}.tar", i % 2) for i in range(5)]


def test_members_carry_fixed_metadata_so_reruns_are_the_same_bytes(photos, tmp_path):
    for out in ("one", "two"):
        assert run_cli("encode", photos, "-o", tmp_path / out, "--format", "wds", *SMALL, "-q").returncode == 0
    assert (tmp_path / "one/shard-00000.tar").read_bytes() == (tmp_path / "two/shard-00000.tar").read_bytes()
    with tarfile.open(tmp_path / "one/shard-00000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.mode, m.isfile()) for m in members} == {(0, 0, 0o444, True)}
    assert [m.name for m in members[:2]] == ["000000000.npy", "000000000.json"]


def test_native_samples_keep_their_shapes_and_grids(photos, tmp_path):
    make_image(photos / "wide.png", size=(160, 30))
    native = [*SMALL, "--resize", "native", "--max-patches", "24"]
    assert run_cli("encode", photos, "-o", tmp_path / "npy", *native, "-q").returncode == 0
    assert run_cli("encode", photos, "-o", tmp_path / "wds", "--format", "wds", *native, "-q").returncode == 0
    samples = read_samples(tmp_path / "wds")
    grids = {r["input"]: r["grid"] for r in read_manifest(tmp_path / "npy")}
    for name, tokens in npy_by_input(tmp_path / "npy").items():
        np.testing.assert_array_equal(samples[name][1], tokens)
        assert samples[name][2]["grid"] == grids[name]
    assert len({s[1].shape for s in samples.values()}) > 1
    r = run_cli("encode", photos, "-o", tmp_path / "wds", "--format", "wds", *native, "--skip-existing", "--json")
    assert r.returncode == 0 and {json.loads(line)["status"] for line in r.stdout.splitlines()} == {"skipped"}


def test_failed_input_has_no_sample_and_its_shard_is_redone(photos, tmp_path):
    (photos / "c.jpg").write_bytes(b"not an image")
    args = ["encode", photos, "-o", tmp_path / "wds", "--format", "wds", *SMALL, "--shard-size", "2", "-q"]
    assert run_cli(*args).returncode == 1
    assert str(photos / "c.jpg") not in read_samples(tmp_path / "wds")
    first = (tmp_path / "wds/shard-00000.tar").stat().st_mtime_ns
    make_image(photos / "c.jpg", seed=7)
    assert run_cli(*args[:-1], "--skip-existing").returncode == 0
    samples = read_samples(tmp_path / "wds")
    assert samples[str(photos / "c.jpg")][0] == "000000002" and len(samples) == 5
    assert (tmp_path / "wds/shard-00000.tar").stat().st_mtime_ns == first  # whole and this run's: skipped


def test_bfloat16_is_refused_in_one_line(photos, tmp_path):
    r = run_cli("encode", photos, "-o", tmp_path / "wds", "--format", "wds", *SMALL, "--dtype", "bf16")
    assert r.returncode == 2 and b"cannot hold bfloat16" in r.stderr and not (tmp_path / "wds").exists()


@pytest.mark.slow
def test_ray_data_read_webdataset_reads_the_tokens(ray_session, photos, tmp_path):
    assert run_cli("encode", photos, "-o", tmp_path / "npy", *SMALL, "-q").returncode == 0
    assert run_cli("encode", photos, "-o", tmp_path / "wds", "--format", "wds", *SMALL, "--shard-size", "2",
                   "-q").returncode == 0
    rows = ray_session.data.read_webdataset(sorted(map(str, (tmp_path / "wds").glob("*.tar")))).take_all()
    expected = npy_by_input(tmp_path / "npy")
    assert sorted(row["json"]["input"] for row in rows) == sorted(expected)
    for row in rows:
        np.testing.assert_array_equal(row["npy"], expected[row["json"]["input"]])
