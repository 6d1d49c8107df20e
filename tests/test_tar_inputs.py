"""WebDataset tar shards as inputs (`vitembed/images/tars.py`): the same tokens as the images as
files, samples grouped as WebDataset groups them, and hostile shards (traversal names, links, huge
declared sizes, truncation, duplicate keys, samples without an image) reported per sample or
shard while the rest goes on."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, read_manifest, run_cli

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]


def pack(tar_path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    """A tar of (name, bytes) regular members, in order."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tar_path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six small images: JPEGs, PNGs and one grey PNG."""
    folder = tmp_path / "images"
    for i in range(6):
        suffix, mode = [(".jpg", "RGB"), (".png", "RGB"), (".png", "L")][i % 3]
        make_image(folder / f"{i:03d}{suffix}", size=(40 + i, 30 + 2 * i), mode=mode, seed=i)
    return folder


def members_of(folder: Path) -> list[tuple[str, bytes]]:
    """Each image of `folder` as a sample: KEY.EXT, KEY.json, KEY.txt."""
    out = []
    for path in sorted(folder.iterdir()):
        key = path.stem
        out += [(path.name, path.read_bytes()), (f"{key}.json", json.dumps({"key": key}).encode()),
                (f"{key}.txt", f"caption {key}".encode())]
    return out


def tokens(folder: Path) -> dict[str, bytes]:
    """Every .npy under `folder`, by its path below it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def reference(images: Path, tmp_path: Path) -> dict[str, bytes]:
    """The tokens of the images as files, by stem."""
    out = tmp_path / "reference"
    assert run_cli("encode", images, "-o", out, *SMALL).returncode == 0
    return {Path(name).stem: data for name, data in tokens(out).items()}


def test_tar_shards_give_the_folder_tokens(images: Path, tmp_path: Path) -> None:
    members = members_of(images)
    pack(tmp_path / "shards" / "00000.tar", members[:9])
    pack(tmp_path / "shards" / "00001.tar.gz", members[9:], "w:gz")
    out = tmp_path / "out"
    result = run_cli("encode", tmp_path / "shards", "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert [line["input"] for line in lines] == [f"{tmp_path}/shards/{shard}/{i:03d}" for shard, i in
                                                 [("00000.tar", 0), ("00000.tar", 1), ("00000.tar", 2),
                                                  ("00001.tar.gz", 3), ("00001.tar.gz", 4), ("00001.tar.gz", 5)]]
    got = tokens(out)
    assert sorted(got) == [f"0000{i // 3}/{i:03d}.npy" for i in range(6)]
    want = reference(images, tmp_path)
    assert {Path(name).stem: data for name, data in got.items()} == want


def test_webdataset_tarwriter_shards_give_the_folder_tokens(images: Path, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    shards = tmp_path / "wds"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "shard-%03d.tar"), maxcount=4, verbose=0) as sink:
        for path in sorted(images.iterdir()):
            sink.write({"__key__": f"sample{path.stem}", path.suffix[1:]: path.read_bytes(), "txt": "a caption"})
    out = tmp_path / "out"
    result = run_cli("encode", f"{shards}/shard-{{000..001}}.tar", "-o", out, *SMALL)
    assert result.returncode == 0, result.stderr
    got = tokens(out)
    assert sorted(got) == [f"shard-00{i // 4}/sample{i:03d}.npy" for i in range(6)]
    want = reference(images, tmp_path)
    assert {Path(name).stem.removeprefix("sample"): data for name, data in got.items()} == want


def test_sample_text_members_go_to_source_meta(images: Path, tmp_path: Path) -> None:
    from vitembed.images.inputs import iter_sources

    shard = pack(tmp_path / "s.tar", members_of(images)[:6])
    sources = list(iter_sources([str(shard)]))
    assert [s.meta for s in sources] == [{"json": '{"key": "000"}', "txt": "caption 000"},
                                         {"json": '{"key": "001"}', "txt": "caption 001"}]
    assert [s.rel.as_posix() for s in sources] == ["s/000", "s/001"]


def test_outputs_go_beside_the_shard_without_o(images: Path, tmp_path: Path) -> None:
    shard = pack(tmp_path / "data" / "s.tar", members_of(images)[:6])
    assert run_cli("encode", shard, *SMALL).returncode == 0
    assert sorted(p.name for p in (tmp_path / "data" / "s").iterdir()) == ["000.npy", "001.npy"]


def test_unsafe_members_are_passed_over_with_one_note(images: Path, tmp_path: Path) -> None:
    jpeg = (images / "000.jpg").read_bytes()
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("../evil.jpg", "/abs/evil.jpg", "a/../../evil.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
        for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info = tarfile.TarInfo(f"link{kind.decode()}.jpg")
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        info = tarfile.TarInfo("dev.jpg")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 5
        tar.addfile(info)
        info = tarfile.TarInfo("good.jpg")
        info.size = len(jpeg)
        tar.addfile(info, io.BytesIO(jpeg))
    out = tmp_path / "out"
    result = run_cli("encode", shard, "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    assert [line["input"] for line in json_lines(result.stdout)] == [f"{shard}/good"]
    stderr = result.stderr.decode()
    assert stderr.count("passed over tar members") == 1
    assert "../evil.jpg and 5 more" in stderr
    assert not (tmp_path / "evil.npy").exists() and sorted(tokens(out)) == ["hostile/good.npy"]


def test_huge_declared_sizes_are_refused_before_reading(images: Path, tmp_path: Path) -> None:
    jpeg = (images / "000.jpg").read_bytes()
    big = os.urandom(20_000)
    shard = pack(tmp_path / "big.tar", [("a.jpg", big), ("b.jpg", jpeg)])
    out = tmp_path / "out"
    # --max-pixels 1000: an image member over 4000 bytes is never held
    result = run_cli("encode", shard, "-o", out, *SMALL, "--max-pixels", "4096", "--json")
    lines = {line["input"].rsplit("/", 1)[1]: line for line in json_lines(result.stdout)}
    assert "declares 20000 bytes, over the 16384 allowed" in lines["a"]["error"]
    assert lines["b"]["status"] == "ok"


def test_a_size_no_file_holds_ends_as_a_truncation(images: Path, tmp_path: Path) -> None:
    jpeg = (images / "000.jpg").read_bytes()
    shard = pack(tmp_path / "lie.tar", [("a.jpg", jpeg)])
    data = shard.read_bytes().rstrip(b"\0")
    data += b"\0" * (-len(data) % 512)
    info = tarfile.TarInfo("b.jpg")
    info.size = 1 << 70  # base-256 in a GNU header: no file holds it
    shard.write_bytes(data + info.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096)
    start = time.monotonic()
    result = run_cli("encode", shard, "-o", tmp_path / "out", *SMALL, "--json")
    assert time.monotonic() - start < 60
    lines = json_lines(result.stdout)
    assert [line["status"] for line in lines] == ["ok", "error"]
    assert lines[1]["input"] == str(shard) and "breaks off after 1 sample, from b on" in lines[1]["error"]


def test_a_truncated_shard_keeps_the_samples_before_the_break(images: Path, tmp_path: Path) -> None:
    shard = pack(tmp_path / "cut.tar", members_of(images))
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    result = run_cli("encode", shard, "-o", tmp_path / "out", *SMALL, "--json")
    assert result.returncode == 1
    lines = json_lines(result.stdout)
    assert [line["status"] for line in lines[:-1]] == ["ok"] * (len(lines) - 1) and len(lines) >= 3
    assert lines[-1]["input"] == str(shard) and "the shard breaks off after" in lines[-1]["error"]


def test_a_corrupt_image_member_is_its_sample_error(images: Path, tmp_path: Path) -> None:
    shard = pack(tmp_path / "bad.tar", [("a.jpg", b"\xff\xd8\xffnot really"), ("b.jpg", (images / "000.jpg").read_bytes())])
    result = run_cli("encode", shard, "-o", tmp_path / "out", *SMALL, "--json", "--workers", "1")
    lines = json_lines(result.stdout)
    assert [(line["input"].rsplit("/", 1)[1], line["status"]) for line in lines] == [("a", "error"), ("b", "ok")]


def test_a_duplicate_key_and_a_sample_without_image_are_errors(images: Path, tmp_path: Path) -> None:
    jpeg = (images / "000.jpg").read_bytes()
    shard = pack(tmp_path / "odd.tar", [("a.jpg", jpeg), ("b.json", b"{}"), ("c.jpg", jpeg), ("a.png", jpeg),
                                        ("d.jpg", jpeg), ("d.jpg", jpeg)])
    result = run_cli("encode", shard, "-o", tmp_path / "out", *SMALL, "--json")
    lines = [(line["input"].rsplit("/", 1)[1], line["status"], line["error"]) for line in json_lines(result.stdout)]
    assert lines[0] == ("a", "ok", None) and lines[2] == ("c", "ok", None)
    assert lines[1][:2] == ("b", "error") and "no image member" in lines[1][2] and "it has json" in lines[1][2]
    assert lines[3][:2] == ("a", "error") and "earlier sample" in lines[3][2]
    assert lines[4][:2] == ("d", "error") and "two d.jpg members" in lines[4][2]
    assert sorted(tokens(tmp_path / "out")) == ["odd/a.npy", "odd/c.npy"]


def test_an_img2dataset_folder_is_read_through_its_tars(images: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "img2dataset"
    pack(folder / "00000.tar", members_of(images))
    pq.write_table(pa.table({"url": ["http://x"] * 6, "key": [f"{i:03d}" for i in range(6)], "status": ["success"] * 6}),
                   folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")
    result = run_cli("encode", folder, "-o", tmp_path / "out", *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    assert len(json_lines(result.stdout)) == 6


def test_skip_existing_resumes_tar_inputs(images: Path, tmp_path: Path) -> None:
    shard = pack(tmp_path / "s.tar", members_of(images))
    out = tmp_path / "out"
    assert run_cli("encode", shard, "-o", out, *SMALL).returncode == 0
    first = tokens(out)
    (out / "s" / "002.npy").unlink()
    result = run_cli("encode", shard, "-o", out, *SMALL, "--skip-existing", "--json")
    assert [line["status"] for line in json_lines(result.stdout)] == ["skipped"] * 2 + ["ok"] + ["skipped"] * 3
    assert tokens(out) == first
    assert [r["output"] for r in read_manifest(out) if r["input"] == f"{shard}/002"] == ["s/002.npy"] * 2


def test_a_brace_pattern_through_the_python_api(images: Path, tmp_path: Path) -> None:
    import vitembed

    members = members_of(images)
    for n in range(3):
        pack(tmp_path / f"p{n:02d}.tar", members[6 * n: 6 * n + 6])
    summary = vitembed.encode(f"{tmp_path}/p{{00..02}}.tar", tmp_path / "out", image_size=32, patch_size=8,
                              emb_dim=16, workers=0)
    assert summary.ok == 6 and summary.errors == 0
    assert sorted(tokens(tmp_path / "out")) == [f"p0{i // 2}/{i:03d}.npy" for i in range(6)]


def test_brace_patterns_expand_lazily_and_bounded() -> None:
    from vitembed.images.tars import expand_braces, has_braces

    assert list(expand_braces("s/{008..011}.tar")) == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert list(expand_braces("{a,b}-{1..2}")) == ["a-1", "a-2", "b-1", "b-2"]
    assert list(expand_braces("{x}")) == ["{x}"] and not has_braces("{x}")
    with pytest.raises(ValueError, match="over the 1000000"):
        expand_braces("{0..9999}{0..999}")


@pytest.mark.slow
def test_kill_9_mid_run_then_skip_existing_equals_a_clean_run(many_images: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    paths = sorted(many_images.iterdir())
    for n in range(3):
        pack(shards / f"{n:05d}.tar", [(p.name, p.read_bytes()) for p in paths[100 * n: 100 * n + 100]])
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run_cli("encode", shards, "-o", clean, *SMALL).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = [sys.executable, "-m", "vitembed", "encode", str(shards), "-o", str(out), *SMALL, "-q", "--workers", "1"]
    process = subprocess.Popen(args, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.npy"))) < 20 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < len(list(out.rglob("*.npy"))) < 300
    result = run_cli("encode", shards, "-o", out, *SMALL, "--skip-existing", "--json")
    assert result.returncode == 0, result.stderr
    statuses = [line["status"] for line in json_lines(result.stdout)]
    assert statuses.count("skipped") >= 20 and len(statuses) == 300
    assert tokens(out) == tokens(clean)


def test_the_progress_count_counts_the_samples_of_shards(images: Path, tmp_path: Path) -> None:
    from vitembed.images.inputs import count_inputs, iter_sources

    members = members_of(images)
    pack(tmp_path / "d" / "a.tar", members[:9])
    pack(tmp_path / "d" / "b.tar.gz", members[9:], "w:gz")
    assert count_inputs([str(tmp_path / "d")]) == 6 == len(list(iter_sources([str(tmp_path / "d")])))


def test_member_bytes_do_not_travel_back_once_read() -> None:
    import pickle

    from vitembed.errors import InputError
    from vitembed.files.reads import Held

    held = Held("s.tar/k", b"x" * 1000, "s/k")
    sent = pickle.loads(pickle.dumps(held))  # to a decoder: with its bytes
    assert (str(sent), sent.data, sent.beside) == ("s.tar/k", b"x" * 1000, "s/k")
    assert sent.fetch(1000) == b"x" * 1000
    back = pickle.loads(pickle.dumps(sent))  # its outcome, back: without them
    assert str(back) == "s.tar/k" and back.data is None and held.data == b"x" * 1000
    with pytest.raises(InputError, match="too large: 1000 bytes"):
        held.fetch(999)


def test_a_plain_shard_is_read_in_place_and_a_compressed_one_as_bytes(images: Path, tmp_path: Path) -> None:
    from vitembed.files.reads import Held, Stored
    from vitembed.images.inputs import iter_sources

    members = members_of(images)
    plain, packed = pack(tmp_path / "p.tar", members), pack(tmp_path / "c.tar.gz", members, "w:gz")
    in_place = [s.path for s in iter_sources([str(plain)])]
    as_bytes = [s.path for s in iter_sources([str(packed)])]
    assert all(type(p) is Stored for p in in_place) and all(type(p) is Held for p in as_bytes)
    assert [p.fetch(1 << 20) for p in in_place] == [p.data for p in as_bytes] == [
        data for name, data in members if not name.endswith((".json", ".txt"))]


def test_a_stored_member_is_read_from_the_planned_file_only(images: Path, tmp_path: Path) -> None:
    import pickle

    from vitembed.errors import InputError
    from vitembed.files import reads
    from vitembed.images.inputs import iter_sources

    shard = pack(tmp_path / "s.tar", members_of(images))
    first, second = (pickle.loads(pickle.dumps(s.path)) for s in list(iter_sources([str(shard)]))[:2])
    with reads.files_kept_open():
        assert first.fetch(1 << 20)[:2] in (b"\xff\xd8", b"\x89P")
        (fd,) = reads._kept.files.values()  # one open for both members
        assert second.fetch(1 << 20) and list(reads._kept.files.values()) == [fd]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its scope
    with pytest.raises(InputError, match="too large"):
        first.fetch(first.size - 1)
    os.utime(shard, ns=(1, 1))  # the same bytes, but not the file planned from
    with pytest.raises(InputError, match="changed since the run was planned"):
        first.fetch(1 << 20)
    shard.unlink()
    os.mkfifo(shard)  # never opened in a way that blocks
    with pytest.raises(InputError, match="a FIFO"):
        first.fetch(1 << 20)
