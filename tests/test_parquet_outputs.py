"""Parquet outputs (-o NAME.parquet, --format parquet): tokens equal the per-image outputs, read
back with pyarrow + numpy, polars, DuckDB and Hugging Face datasets; failed inputs keep a row;
the run's record in the schema; atomic shards; resume after a failure or a kill -9; the Python API."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vitembed
from tests.conftest import make_image, make_images, read_manifest, run_cli
from vitembed.images.inputs import Source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]
NAMES = ["a.png", "b.png", "c.jpg", "sub/d.png", "sub/e.png"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_images(tmp_path / "photos", NAMES)


def read_rows(folder: Path) -> tuple[dict[str, dict], list]:
    """Every row of a folder's Parquet shards by input, with pyarrow and numpy alone; and the schemas."""
    rows, schemas = {}, []
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        schemas.append(table.schema)
        tokens = table.column("tokens").combine_chunks()
        if isinstance(tokens.type, pa.FixedShapeTensorType):
            good = tokens.storage.is_valid().to_numpy(zero_copy_only=False)
            arrays = [None] * len(table)
            encoded = tokens.filter(tokens.storage.is_valid()).to_numpy_ndarray()
            for i, array in zip(np.flatnonzero(good), encoded):
                arrays[i] = array
        else:  # native: a list of D-long lists per row
            arrays = [None if row is None else np.array(row) for row in tokens.to_pylist()]
        for i, record in enumerate(table.drop_columns(["tokens"]).to_pylist()):
            rows[record["input"]] = {**record, "tokens": arrays[i]}
    return rows, schemas


def npy_tokens(folder: Path, photos: Path) -> dict[str, Path]:
    """The per-image output files of a run over `photos`, by input as the manifest names it."""
    return {r["input"]: folder / r["output"] for r in read_manifest(folder) if r["status"] == "ok"}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tokens_equal_the_npy_outputs(photos, tmp_path, dtype):
    assert run_cli("encode", photos, "-o", tmp_path / "npy", *SMALL, "--dtype", dtype, "-q").returncode == 0
    r = run_cli("encode", photos, "-o", tmp_path / "tokens.parquet", *SMALL, "--dtype", dtype, "--shard-size", "2", "-q")
    assert r.returncode == 0, r.stderr
    rows, schemas = read_rows(tmp_path / "tokens.parquet")
    files = npy_tokens(tmp_path / "npy", photos)
    assert sorted(rows) == sorted(files) and len(schemas) == 3  # 5 rows, 2 a shard
    for name, path in files.items():
        expected = np.load(path)
        assert rows[name]["tokens"].dtype == expected.dtype
        np.testing.assert_array_equal(rows[name]["tokens"], expected)
        assert rows[name]["error"] is None
    assert {rows[str(photos / "sub/d.png")]["key"], rows[str(photos / "a.png")]["key"]} == {"sub/d", "a"}
    assert all(s.field("tokens").type.shape == [17, 16] for s in schemas)


def test_bfloat16_is_stored_as_its_bits_with_the_dtype_in_the_schema(photos, tmp_path):
    torch = pytest.importorskip("torch")
    assert run_cli("encode", photos, "-o", tmp_path / "pt", *SMALL, "--format", "pt", "--dtype", "bf16", "-q").returncode == 0
    r = run_cli("encode", photos, "-o", tmp_path / "t.parquet", *SMALL, "--dtype", "bf16", "-q")
    assert r.returncode == 0, r.stderr
    rows, schemas = read_rows(tmp_path / "t.parquet")
    assert schemas[0].metadata[b"vitembed.dtype"] == b"bfloat16"
    for name, path in npy_tokens(tmp_path / "pt", photos).items():
        expected = torch.load(path, weights_only=True).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(rows[name]["tokens"], expected)


def test_native_rows_have_their_own_shapes_and_grids(photos, tmp_path):
    native = [*SMALL, "--resize", "native", "--max-patches", "24"]
    make_image(photos / "wide.png", size=(160, 30))
    assert run_cli("encode", photos, "-o", tmp_path / "npy", *native, "-q").returncode == 0
    r = run_cli("encode", photos, "-o", tmp_path / "t.parquet", *native, "--shard-size", "3", "-q")
    assert r.returncode == 0, r.stderr
    rows, schemas = read_rows(tmp_path / "t.parquet")
    manifest = {m["input"]: m for m in read_manifest(tmp_path / "npy")}
    shapes = set()
    for name, path in npy_tokens(tmp_path / "npy", photos).items():
        np.testing.assert_array_equal(rows[name]["tokens"].astype(np.float32), np.load(path))
        assert rows[name]["grid"] == manifest[name]["grid"]
        shapes.add(rows[name]["tokens"].shape)
    assert len(shapes) > 1  # the images' grids differ
    assert "grid" in schemas[0].names


def test_polars_duckdb_and_datasets_read_the_tokens(photos, tmp_path):
    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    datasets = pytest.importorskip("datasets")
    from vitembed.files.tables import huggingface_features

    out = tmp_path / "t.parquet"
    assert run_cli("encode", photos, "-o", out, *SMALL, "--shard-size", "2", "-q").returncode == 0
    expected, _ = read_rows(out)
    frame = polars.read_parquet(out / "*.parquet").sort("input")
    assert frame["input"].to_list() == sorted(expected)
    for name, tokens in zip(frame["input"], frame["tokens"].to_list()):
        np.testing.assert_array_equal(np.array(tokens, np.float32).reshape(17, 16), expected[name]["tokens"])
    found = duckdb.sql(f"SELECT input, tokens FROM read_parquet('{out}/*.parquet') ORDER BY input").fetchall()
    for name, tokens in found:
        np.testing.assert_array_equal(np.array(tokens, np.float32).reshape(17, 16), expected[name]["tokens"])
    shards = sorted(map(str, out.glob("*.parquet")))
    table = datasets.load_dataset("parquet", data_files=shards, split="train",
                                  features=huggingface_features(shards[0]), cache_dir=str(tmp_path / "hf"))
    assert len(table) == len(expected)
    for row in table:
        np.testing.assert_array_equal(np.array(row["tokens"], np.float32).reshape(17, 16), expected[row["input"]]["tokens"])


def test_failed_input_keeps_a_row_and_is_redone_on_resume(photos, tmp_path):
    (photos / "b.png").write_bytes(b"not an image")
    out = tmp_path / "t.parquet"
    args = ["encode", photos, "-o", out, *SMALL, "--shard-size", "2", "-q"]
    assert run_cli(*args).returncode == 1
    rows, _ = read_rows(out)
    bad = rows[str(photos / "b.png")]
    assert bad["tokens"] is None and "Pillow" in bad["error"] and len(rows) == 5
    failed = next(r for r in read_manifest(out) if r["status"] == "error")  # says where its row is
    assert (failed["input"], failed["output"], failed["row"]) == (str(photos / "b.png"), "shard-00000.parquet", 1)
    untouched = (out / "shard-00001.parquet").stat().st_mtime_ns
    make_image(photos / "b.png", seed=9)  # mended: its shard (rows a, b) is written again
    r = run_cli(*args[:-1], "--skip-existing")
    assert r.returncode == 0, r.stderr
    rows, _ = read_rows(out)
    assert rows[str(photos / "b.png")]["error"] is None and rows[str(photos / "b.png")]["tokens"].shape == (17, 16)
    assert (out / "shard-00001.parquet").stat().st_mtime_ns == untouched
    statuses = {r["input"]: r["status"] for r in read_manifest(out)[-5:]}
    assert statuses[str(photos / "b.png")] == "ok" and statuses[str(photos / "sub/d.png")] == "skipped"


def test_schema_metadata_holds_the_run_record_and_a_mismatch_is_refused(photos, tmp_path):
    out = tmp_path / "t.parquet"
    assert run_cli("encode", photos, "-o", out, *SMALL, "-q").returncode == 0
    record = json.loads(pq.read_schema(out / "shard-00000.parquet").metadata[b"vitembed"])
    assert record == json.loads((out / "run.json").read_text())
    assert record["config"]["format"] == "parquet" and record["config"]["shard_size"] == 1024
    r = run_cli("encode", photos, "-o", out, *SMALL, "--dtype", "fp16", "-q")
    assert r.returncode == 2 and b"another configuration" in r.stderr
    assert run_cli("encode", photos, "-o", out, *SMALL, "--dtype", "fp16", "-q", "--overwrite").returncode == 0
    assert pq.read_schema(out / "shard-00000.parquet").metadata[b"vitembed.dtype"] == b"float16"


def test_failed_write_leaves_no_temporary_and_no_shard(photos, tmp_path, monkeypatch):
    from vitembed.files import tables

    write, calls = tables.write_parquet, []

    def full_disk_on_the_second(f, *args, **kwargs):  # the first shard is written, the second fills the disk
        calls.append(1)
        if len(calls) == 1:
            return write(f, *args, **kwargs)
        f.write(b"PAR1" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tables, "write_parquet", full_disk_on_the_second)
    out = tmp_path / "t.parquet"
    summary = vitembed.encode([photos], out, image_size=32, patch_size=8, emb_dim=16, workers=0, shard_size=2,
                              writers=1)
    assert summary.stopped and "disk full" in summary.stopped
    assert sorted(p.name for p in out.iterdir() if p.name not in ("run.json", "manifest.jsonl", ".vitembed.lock")) == ["shard-00000.parquet"]
    assert pq.read_table(out / "shard-00000.parquet").num_rows == 2


def test_python_api_writes_a_parquet_dataset(photos, tmp_path):
    summary = vitembed.encode([photos], tmp_path / "tokens.parquet", preset="vit-ti16", image_size=32, workers=0)
    assert summary.ok == 5
    table = pq.read_table(tmp_path / "tokens.parquet" / "shard-00000.parquet")
    assert table.num_rows == 5 and table.schema.field("tokens").type.shape == [5, 192]


def test_carried_metadata_becomes_columns(tmp_path):
    image = make_image(tmp_path / "in" / "x.png")
    sources = [Source(image, Path("x.png"), meta={"json": '{"caption": "a cat"}', "txt": "a cat"}),
               Source(image, Path("y.png"))]
    plan = vitembed.OutputPlan.from_option(str(tmp_path / "t.parquet"), None)
    from vitembed.weights.cache import random_layer_params

    encoder = vitembed.Encoder(random_layer_params(vitembed.resolve_config(image_size=32, patch_size=8, emb_dim=16), 0))
    summary = vitembed.run(sources, encoder, plan, vitembed.EncodeOptions(workers=0))
    assert summary.ok == 2
    table = pq.read_table(tmp_path / "t.parquet" / "shard-00000.parquet")
    assert table.column("json").to_pylist() == ['{"caption": "a cat"}', None]
    assert table.column("txt").to_pylist() == ["a cat", None]


def test_format_rules_are_one_line_each(photos, tmp_path):
    r = run_cli("encode", photos, "-o", tmp_path / "t.parquet", "--format", "wds", *SMALL)
    assert r.returncode == 2 and b"names a Parquet dataset but --format is wds" in r.stderr
    r = run_cli("encode", photos, "-o", tmp_path / "t.npy", "--format", "parquet", *SMALL)
    assert r.returncode == 2 and b"writes shards into a folder" in r.stderr


def test_without_pyarrow_one_line_says_what_to_install(photos, tmp_path):
    fake = tmp_path / "fake"
    (fake / "pyarrow").mkdir(parents=True)
    (fake / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}
    r = run_cli("encode", photos, "-o", tmp_path / "t.parquet", *SMALL, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(b"pip install 'vitembed[parquet]'")
    assert not (tmp_path / "t.parquet").exists()


def _table(folder: Path) -> list[dict]:
    rows, _ = read_rows(folder)
    return [{**r, "tokens": None if r["tokens"] is None else r["tokens"].tobytes()} for _, r in sorted(rows.items())]


@pytest.mark.slow
def test_kill_9_mid_run_then_skip_existing_gives_a_clean_run_s_table(many_images, tmp_path):
    args = [sys.executable, "-m", "vitembed", "encode", str(many_images), "--preset", "vit-ti16", "--shard-size", "16",
            "--workers", "0", "--batch-size", "4", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([*args, "-o", str(tmp_path / "clean.parquet")], check=True, env=env, timeout=300)
    out = tmp_path / "t.parquet"
    killed = subprocess.Popen([*args, "-o", str(out)], env=env)
    deadline = time.monotonic() + 120
    while not (out / "shard-00002.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(list(out.glob("*.parquet"))) < 19  # stopped mid-run
    subprocess.run([*args, "-o", str(out), "--skip-existing"], check=True, env=env, timeout=300)
    assert _table(out) == _table(tmp_path / "clean.parquet")
    assert not [p for p in out.iterdir() if p.name.startswith(".vitembed-")]
    last = {r["input"]: r["status"] for r in read_manifest(out)}
    assert len(last) == 300 and set(last.values()) <= {"ok", "skipped"}


def test_a_link_planted_at_a_shard_is_replaced_never_followed(photos, tmp_path):
    out, outside = tmp_path / "t.parquet", tmp_path / "outside.parquet"
    outside.write_bytes(b"keep me")
    out.mkdir()
    (out / "shard-00000.parquet").symlink_to(outside)
    assert run_cli("encode", photos, "-o", out, *SMALL, "--skip-existing", "-q").returncode == 0
    assert outside.read_bytes() == b"keep me"
    assert not (out / "shard-00000.parquet").is_symlink() and pq.read_table(out / "shard-00000.parquet").num_rows == 5
