"""Parquet image tables as inputs (`vitembed/images/tables.py`): the same tokens as the images as
files, rows named by number or --key-column, Hugging Face's Image struct, and bad tables (a wrong
column type, null images, a huge row group, no pyarrow) reported clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import json_lines, make_image, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    return [make_image(folder / f"{i:03d}{['.jpg', '.png'][i % 2]}", size=(40 + i, 30 + 2 * i), seed=i)
            for i in range(5)]


def tokens(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def reference(images: list[Path], tmp_path: Path) -> list[bytes]:
    """The tokens of the images as files, in order."""
    out = tmp_path / "reference"
    assert run_cli("encode", images[0].parent, "-o", out, *SMALL).returncode == 0
    return [(out / f"{p.stem}.npy").read_bytes() for p in images]


def test_a_pyarrow_table_gives_the_file_tokens(images: list[Path], tmp_path: Path) -> None:
    table = pa.table({"id": list(range(5)), "image": [p.read_bytes() for p in images]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    out = tmp_path / "out"
    result = run_cli("encode", tmp_path / "t.parquet", "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    assert [line["input"] for line in json_lines(result.stdout)] == [f"{tmp_path}/t.parquet/{i:06d}" for i in range(5)]
    assert tokens(out) == {f"t/{i:06d}.npy": data for i, data in enumerate(reference(images, tmp_path))}


def test_key_column_names_rows_and_a_repeated_key_is_an_error(images: list[Path], tmp_path: Path) -> None:
    table = pa.table({"name": ["cat", "dog", "sub/fox", "cat", None], "image": [p.read_bytes() for p in images]})
    pq.write_table(table, tmp_path / "t.parquet")
    out = tmp_path / "out"
    result = run_cli("encode", tmp_path / "t.parquet", "-o", out, *SMALL, "--key-column", "name", "--json")
    lines = [(line["input"].rsplit("t.parquet/", 1)[1], line["status"], line["error"]) for line in json_lines(result.stdout)]
    assert [line[:2] for line in lines] == [("cat", "ok"), ("dog", "ok"), ("sub/fox", "ok"), ("cat", "error"),
                                            ("None", "error")]
    assert "earlier row" in lines[3][2] and "null" in lines[4][2]
    want = reference(images, tmp_path)
    assert tokens(out) == {"t/cat.npy": want[0], "t/dog.npy": want[1], "t/sub/fox.npy": want[2]}


def test_hugging_face_image_structs_are_read(images: list[Path], tmp_path: Path) -> None:
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in images] + [{"bytes": None, "path": "elsewhere.jpg"}]
    pq.write_table(pa.table({"label": list(range(6)), "image": pa.array(rows, kind)}), tmp_path / "hf.parquet")
    result = run_cli("encode", tmp_path / "hf.parquet", "-o", tmp_path / "out", *SMALL, "--json")
    lines = json_lines(result.stdout)
    assert [line["status"] for line in lines] == ["ok"] * 5 + ["error"]
    assert "the row names a file, elsewhere.jpg, which is not read" in lines[5]["error"]
    assert list(tokens(tmp_path / "out").values()) == reference(images, tmp_path)


@pytest.mark.slow
def test_a_datasets_table_gives_the_file_tokens(images: list[Path], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # a heavy import
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
                                     "label": list(range(5))}, features=features)
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    result = run_cli("encode", tmp_path / "hf.parquet", "-o", tmp_path / "out", *SMALL)
    assert result.returncode == 0, result.stderr
    assert list(tokens(tmp_path / "out").values()) == reference(images, tmp_path)


def test_a_wrong_column_is_one_clear_error(images: list[Path], tmp_path: Path) -> None:
    pq.write_table(pa.table({"name": ["a"], "n": [1]}), tmp_path / "plain.parquet")
    pq.write_table(pa.table({"name": ["a"], "image": [images[0].read_bytes()]}), tmp_path / "t.parquet")
    result = run_cli("encode", tmp_path / "plain.parquet", tmp_path / "t.parquet", "-o", tmp_path / "out", *SMALL,
                     "--json")
    lines = json_lines(result.stdout)
    assert lines[0]["input"] == f"{tmp_path}/plain.parquet"
    assert "no column of image bytes" in lines[0]["error"] and "n (int64)" in lines[0]["error"]
    assert lines[1]["status"] == "ok"
    result = run_cli("encode", tmp_path / "t.parquet", "-o", tmp_path / "out2", *SMALL, "--image-column", "name")
    assert result.returncode == 1
    assert "column 'name' holds string, not image bytes" in result.stderr.decode()
    result = run_cli("encode", tmp_path / "t.parquet", "-o", tmp_path / "out3", *SMALL, "--key-column", "nope")
    assert "no column 'nope' for --key-column" in result.stderr.decode()


def test_a_null_image_is_that_rows_error(images: list[Path], tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [images[0].read_bytes(), None, b"not an image"]}), tmp_path / "t.parquet")
    result = run_cli("encode", tmp_path / "t.parquet", "-o", tmp_path / "out", *SMALL, "--json")
    lines = json_lines(result.stdout)
    assert [line["status"] for line in lines] == ["ok", "error", "error"]
    assert lines[1]["error"] == "its image is null" and "not an image" in lines[2]["error"]


def test_not_a_parquet_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but nothing else")
    result = run_cli("encode", tmp_path / "fake.parquet", "-o", tmp_path / "out", *SMALL)
    assert result.returncode == 1
    assert "fake.parquet: not a Parquet table pyarrow reads" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_a_huge_row_group_is_refused_before_reading(images: list[Path], tmp_path: Path) -> None:
    import os

    rows = [os.urandom(4096) for _ in range(40)]  # 160 KiB of one row group, incompressible
    groups = [pa.table({"image": [images[0].read_bytes()]}), pa.table({"image": rows}),
              pa.table({"image": [images[1].read_bytes()]})]
    with pq.ParquetWriter(tmp_path / "t.parquet", groups[0].schema) as writer:
        for group in groups:
            writer.write_table(group)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 3
    # --max-pixels 16384: 65536 bytes read at once at most
    result = run_cli("encode", tmp_path / "t.parquet", "-o", tmp_path / "out", *SMALL, "--max-pixels", "16384",
                     "--json")
    lines = json_lines(result.stdout)
    assert [line["status"] for line in lines] == ["ok", "error", "ok"]
    assert lines[1]["input"] == f"{tmp_path}/t.parquet"
    assert "rows 1 to 40 (row group 1) hold" in lines[1]["error"] and "over the 65536 read at once" in lines[1]["error"]
    assert lines[2]["input"] == f"{tmp_path}/t.parquet/000041"


def test_rows_become_bytes_in_batches_of_a_bounded_size() -> None:
    from types import SimpleNamespace

    from vitembed.images.tables import BATCH_BYTES, BATCH_ROWS, batch_rows

    assert batch_rows(SimpleNamespace(num_rows=10, total_byte_size=10 * BATCH_BYTES)) == 1
    assert batch_rows(SimpleNamespace(num_rows=100_000, total_byte_size=100_000 * (BATCH_BYTES // 100))) == 100
    assert batch_rows(SimpleNamespace(num_rows=100_000, total_byte_size=100_000)) == BATCH_ROWS


def test_missing_pyarrow_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    from vitembed.images.inputs import iter_sources

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    [source] = iter_sources([str(tmp_path / "t.parquet")])
    assert source.error == ("Parquet tables are read with pyarrow, which is not installed: "
                            "pip install 'vitembed[parquet]'")


def test_a_folder_of_tables_is_walked_in_order(images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "tables"
    folder.mkdir()
    for n, part in enumerate([images[:2], images[2:]]):
        pq.write_table(pa.table({"image": [p.read_bytes() for p in part]}), folder / f"part-{n}.parquet")
    result = run_cli("encode", folder, "-o", tmp_path / "out", *SMALL)
    assert result.returncode == 0, result.stderr
    assert sorted(tokens(tmp_path / "out")) == ["part-0/000000.npy", "part-0/000001.npy", "part-1/000000.npy",
                                                "part-1/000001.npy", "part-1/000002.npy"]
    assert list(tokens(tmp_path / "out").values()) == reference(images, tmp_path)
