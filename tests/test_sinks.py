"""Sinks: --shard-size writes complete, resumable shards atomically; writer threads follow the cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import encode_with, make_image, read_manifest, run_cli
from vitembed.pipeline import sinks
from vitembed.errors import ConfigError
from vitembed.images.decode import Preprocess
from vitembed.layer.reference import PRESETS, build_layer
from vitembed.pipeline.skeleton import EncodeOptions

SHAPE = [17, 16]

# --- --shard-size --------------------------------------------------------------------------


def _photos(folder: Path, count: int) -> Path:
    for i in range(count):
        make_image(folder / f"p{i:02d}.png", size=(40 + i, 30 + i), seed=i)
    return folder


def test_shards_layout_rows_andread_manifest(tmp_path):
    photos = _photos(tmp_path / "in", 7)
    single = run_cli("encode", photos, "-o", tmp_path / "single", "-q", "--preset", "vit-ti16", "-j", "0")
    assert single.returncode == 0, single.stderr
    res = run_cli("encode", photos, "-o", tmp_path / "sh", "-q", "--preset", "vit-ti16", "--shard-size", "3",
                  "--json", "-b", "2")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "sh"
    assert sorted(p.name for p in out.glob("*.npy")) == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    shapes = [np.load(out / f"shard-0000{i}.npy", mmap_mode="r").shape for i in range(3)]
    assert shapes == [(3, 197, 192), (3, 197, 192), (1, 197, 192)]
    records = read_manifest(out)
    assert [(r["output"], r["row"]) for r in records] == [(f"shard-{i // 3:05d}.npy", i % 3) for i in range(7)]
    lines = [json.loads(x) for x in res.stdout.decode().splitlines()]
    assert [x["row"] for x in lines] == [i % 3 for i in range(7)]
    for i, r in enumerate(records):
        row = np.load(out / r["output"], mmap_mode="r")[r["row"]]
        torch.testing.assert_close(torch.from_numpy(np.array(row)),
                                   torch.from_numpy(np.load(tmp_path / "single" / f"p{i:02d}.npy")))
    assert json.loads((out / "run.json").read_text())["config"]["shard_size"] == 3


def test_shard_with_failed_input_has_nan_row(tmp_path):
    photos = _photos(tmp_path / "in", 4)
    (photos / "p01.png").write_bytes(b"not an image")
    res = run_cli("encode", photos, "-o", tmp_path / "sh", "-q", "--preset", "vit-ti16", "--shard-size", "4")
    assert res.returncode == 1 and b"p01.png" in res.stderr
    shard = np.load(tmp_path / "sh" / "shard-00000.npy")
    assert shard.shape == (4, 197, 192)
    assert np.isnan(shard[1]).all() and not np.isnan(shard[[0, 2, 3]]).any()
    failed = [r for r in read_manifest(tmp_path / "sh") if r["status"] == "error"]
    assert len(failed) == 1 and failed[0]["input"].endswith("p01.png")
    assert (failed[0]["output"], failed[0]["row"]) == ("shard-00000.npy", 1)  # where its NaN row lies


def test_shards_resume_skips_full_shards_and_redoes_the_short_last(tmp_path):
    photos = _photos(tmp_path / "in", 5)
    args = ["encode", photos, "-o", tmp_path / "sh", "-q", "--preset", "vit-ti16", "--shard-size", "2"]
    assert run_cli(*args).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sh").glob("*.npy")}
    make_image(photos / "p05.png", seed=5)  # one more input: the last shard (1 row) becomes 2 rows
    res = run_cli(*args, "--skip-existing", "--json")
    assert res.returncode == 0, res.stderr
    status = [(json.loads(x)["status"], json.loads(x)["row"]) for x in res.stdout.decode().splitlines()]
    assert status == [("skipped", 0), ("skipped", 1), ("skipped", 0), ("skipped", 1), ("ok", 0), ("ok", 1)]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sh").glob("*.npy")}
    assert after["shard-00000.npy"] == first["shard-00000.npy"]
    assert np.load(tmp_path / "sh" / "shard-00002.npy").shape == (2, 197, 192)


def test_shard_write_is_atomic(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "in", 3)
    out = tmp_path / "sh"

    def failing_write(file, arr, fmt, dtype=None):
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "write_tensor", failing_write)
    layer = build_layer(PRESETS["vit-ti16"])
    summary, _ = encode_with([photos], out, layer, Preprocess(), workers=0, shard_size=2)
    assert summary.stopped and "disk full" in summary.stopped
    assert summary.ok == 0
    assert os.listdir(out) == []  # neither a shard nor a temporary


def test_shard_size_needs_an_npy_folder(tmp_path):
    photos = _photos(tmp_path / "in", 1)
    res = run_cli("encode", photos / "p00.png", "-o", tmp_path / "x.npy", "--shard-size", "2")
    assert res.returncode == 2 and b"--shard-size" in res.stderr
    res = run_cli("encode", photos, "-o", tmp_path / "d", "--format", "pt", "--shard-size", "2")
    assert res.returncode == 2 and b"--shard-size" in res.stderr
    with pytest.raises(ConfigError, match="shard size"):
        EncodeOptions(shard_size=0)


# --- writer threads ---------------------------------------------------------------------


@pytest.mark.parametrize("cores, writers, expected", [(64, None, 16), (1, None, 2), (8, None, 8), (64, 3, 3)])
def test_writer_threads_follow_the_cores(tmp_path, monkeypatch, cores, writers, expected):
    """One writer thread per core, 2 to 16 (a GPU outruns a few), unless set."""
    make_image(tmp_path / "in" / "a.png")
    sizes = []
    real = sinks.ThreadPoolExecutor
    monkeypatch.setattr(sinks, "ThreadPoolExecutor", lambda max_workers, **k: sizes.append(max_workers) or real(max_workers, **k))
    monkeypatch.setattr(sinks.os, "cpu_count", lambda: cores)
    layer = build_layer(PRESETS["vitbook-s14"])
    summary, _ = encode_with([tmp_path / "in"], tmp_path / "out", layer, Preprocess(), engine="torch", workers=0,
                             writers=writers)
    assert summary.ok == 1 and sizes == [expected]
    with pytest.raises(ConfigError, match="writers must be at least 1"):
        EncodeOptions(writers=0)


def test_a_large_shard_size_holds_only_the_rows_written(tmp_path):
    import tracemalloc

    from tests.conftest import encode_with
    from vitembed.layer.config import LayerConfig
    from vitembed.layer.reference import build_layer

    photos = _photos(tmp_path / "in", 4)
    tracemalloc.start()
    summary, _ = encode_with([photos], tmp_path / "sh", build_layer(LayerConfig(32, 8, 16)), workers=0,
                             shard_size=20000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.ok == 4 and np.load(tmp_path / "sh" / "shard-00000.npy").shape == (4, *SHAPE)
    assert peak < 50 << 20  # 20000 rows would be 21 MB of this small layer's tokens; vit-b16's 12 GB
