"""A resume (`--skip-existing`) never calls a wrong, missing, damaged or linked output "skipped",
and a failed re-encode leaves no earlier output looking current."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import json_lines, make_image, make_images, npy_outputs, read_manifest, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16", "-j", "0")



def _statuses(stdout: bytes) -> dict[str, dict]:
    return {Path(x["input"]).name: x for x in json_lines(stdout)}


def test_failed_reencode_is_not_skipped_later_and_leaves_no_stale_output(tmp_path):
    photos = make_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos, "-o", out, *SMALL).returncode == 0
    (photos / "b.png").write_bytes(b"corrupted now")
    r = run_cli("encode", photos, "-o", out, "--json", *SMALL)
    assert r.returncode == 1 and _statuses(r.stdout)["b.png"]["status"] == "error"
    assert not (out / "b.npy").exists(), "the previous run's output of a now-failing input stays, looking current"
    r = run_cli("encode", photos, "-o", out, "--json", "--skip-existing", *SMALL)
    got = _statuses(r.stdout)
    assert r.returncode == 1 and got["b.png"]["status"] == "error" and got["a.png"]["status"] == "skipped"


def test_output_of_an_input_whose_last_line_is_an_error_is_made_again(tmp_path):
    """An output left beside a manifest whose last line for its input is an error (a run that
    did not remove it) is not taken for that input's."""
    photos = make_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos, "-o", out, *SMALL).returncode == 0
    with open(out / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"input": str(photos / "b.png"), "output": None, "status": "error",
                            "error": "it failed"}) + "\n")
    r = run_cli("encode", photos, "-o", out, "--json", "--skip-existing", *SMALL)
    assert r.returncode == 0 and _statuses(r.stdout)["b.png"]["status"] == "ok"


@pytest.mark.parametrize("cut", [200, 1000])
def test_truncated_output_with_a_valid_header_is_made_again(tmp_path, cut):
    photos = make_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos, "-o", out, *SMALL).returncode == 0
    want = (out / "a.npy").read_bytes()
    (out / "a.npy").write_bytes(want[:cut])  # the header (128 bytes) is whole, the data is not
    r = run_cli("encode", photos, "-o", out, "--json", "--skip-existing", *SMALL)
    assert r.returncode == 0 and _statuses(r.stdout)["a.png"]["status"] == "ok"
    assert (out / "a.npy").read_bytes() == want


def test_truncated_shard_with_a_valid_header_is_made_again(tmp_path):
    photos = make_images(tmp_path / "in", [f"x{i}.png" for i in range(4)])
    out = tmp_path / "out"
    args = ("encode", photos, "-o", out, "--shard-size", "4", *SMALL)
    assert run_cli(*args).returncode == 0
    want = (out / "shard-00000.npy").read_bytes()
    (out / "shard-00000.npy").write_bytes(want[:1000])
    r = run_cli(*args, "--json", "--skip-existing")
    assert r.returncode == 0 and [x["status"] for x in json_lines(r.stdout)] == ["ok"] * 4
    assert (out / "shard-00000.npy").read_bytes() == want


def test_truncated_output_not_of_this_run_is_an_error_not_skipped(tmp_path):
    """Beside the inputs there is no manifest: a damaged file there is named, never skipped."""
    photos = make_images(tmp_path / "in", ["a.png"])
    assert run_cli("encode", photos / "a.png", *SMALL).returncode == 0
    data = (photos / "a.npy").read_bytes()
    (photos / "a.npy").write_bytes(data[:200])
    r = run_cli("encode", photos / "a.png", "--json", "--skip-existing", *SMALL)
    record = json_lines(r.stdout)[0]
    assert r.returncode == 1 and record["status"] == "error" and "truncated" in record["error"]


def test_link_planted_at_an_output_name_is_never_skipped(tmp_path):
    photos = make_images(tmp_path / "in", ["coffee.png", "dog.png"])
    out = tmp_path / "out"
    assert run_cli("encode", photos, "-o", out, *SMALL).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "dog.npy").rename(elsewhere / "dog.npy")
    want = (out / "coffee.npy").read_bytes()
    (out / "coffee.npy").unlink()
    (out / "coffee.npy").symlink_to(Path("..") / "elsewhere" / "dog.npy")
    r = run_cli("encode", photos, "-o", out, "--json", "--skip-existing", *SMALL)
    got = _statuses(r.stdout)
    assert got["coffee.png"]["status"] != "skipped"
    assert "link" in (got["coffee.png"]["error"] or "")
    r = run_cli("encode", photos, "-o", out, "--json", "--overwrite", *SMALL)
    assert r.returncode == 0
    assert not (out / "coffee.npy").is_symlink() and (out / "coffee.npy").read_bytes() == want
    assert np.load(elsewhere / "dog.npy").shape == (17, 16)


def test_shard_whose_inputs_now_all_fail_keeps_no_earlier_rows(tmp_path):
    photos = make_images(tmp_path / "in", [f"x{i}.png" for i in range(4)])
    out = tmp_path / "out"
    args = ("encode", photos, "-o", out, "--shard-size", "2", *SMALL)
    assert run_cli(*args).returncode == 0
    for name in ("x2.png", "x3.png"):
        (photos / name).write_bytes(b"broken now")
    r = run_cli(*args, "--json")
    assert r.returncode == 1
    shard = out / "shard-00001.npy"
    assert not shard.exists() or np.isnan(np.load(shard)).all(), "the earlier run's finite rows remain"
    fresh = tmp_path / "fresh"
    run_cli("encode", photos, "-o", fresh, "--shard-size", "2", *SMALL)
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(p.name for p in fresh.glob("shard-*"))


def test_native_resume_checks_the_grid_not_only_d(tmp_path):
    """With --resize native a user's (5000, D) float32 file beside an image is neither replaced
    nor skipped: its rows do not fit the grid native gives that image."""
    photos = make_images(tmp_path / "in", ["doc.png"])
    user = np.zeros((5000, 16), np.float32)
    np.save(photos / "doc.npy", user)
    native = ("--resize", "native", "--max-patches", "64")
    for extra in ((), ("--skip-existing",)):
        r = run_cli("encode", photos / "doc.png", "--json", *native, *SMALL, *extra)
        record = json_lines(r.stdout)[0]
        assert r.returncode == 1 and record["status"] == "error" and "--overwrite" in record["error"], r.stderr
        np.testing.assert_array_equal(np.load(photos / "doc.npy"), user)
    assert run_cli("encode", photos / "doc.png", *native, *SMALL, "--overwrite").returncode == 0
    r = run_cli("encode", photos / "doc.png", "--json", *native, *SMALL, "--skip-existing")
    assert r.returncode == 0 and json_lines(r.stdout)[0]["status"] == "skipped"


def test_manifest_tells_a_raw_byte_from_its_escape_text(tmp_path):
    """A name with the byte 0xE9 and one with the text \\xe9 get distinct manifest lines (and so
    distinct resumes); plain UTF-8 names are written as before."""
    folder = tmp_path / "in"
    folder.mkdir()
    make_image(folder / "plain-é.png", seed=1)
    raw = bytes(folder) + b"/r\xe9.png"
    make_image(Path(raw.decode("utf-8", "surrogateescape")), seed=2)
    make_image(folder / "r\\xe9.png", seed=3)
    out = tmp_path / "out"
    assert run_cli("encode", folder, "-o", out, *SMALL).returncode == 0
    inputs = [m["input"] for m in read_manifest(out)]
    assert len(set(inputs)) == 3, inputs
    assert str(folder / "plain-é.png") in inputs
    r = run_cli("encode", folder, "-o", out, "--json", "--skip-existing", *SMALL)
    assert r.returncode == 0 and all(x["status"] == "skipped" for x in json_lines(r.stdout))


def test_resume_follows_collision_names_that_moved(tmp_path):
    folder = tmp_path / "in"
    make_image(folder / "pet.png", seed=1)
    out = tmp_path / "out"
    assert run_cli("encode", folder, "-o", out, *SMALL, "-q").returncode == 0
    make_image(folder / "pet.jpg", seed=2)  # sorts first: now pet.jpg -> pet.npy, pet.png -> pet.png.npy
    r = run_cli("encode", folder, "-o", out, "--skip-existing", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert [rec["status"] for rec in json_lines(r.stdout)] == ["ok", "ok"]
    fresh = tmp_path / "fresh"
    assert run_cli("encode", folder, "-o", fresh, *SMALL, "-q").returncode == 0
    assert npy_outputs(out) == npy_outputs(fresh)


def test_sharded_resume_with_changed_inputs_rewrites_the_shards_that_moved(tmp_path):
    photos = make_images(tmp_path / "sC", [f"img{i:03d}.png" for i in range(1, 9)])
    args = ("encode", photos, "-o", tmp_path / "shC", "--shard-size", "4", *SMALL)
    assert run_cli(*args).returncode == 0
    make_image(photos / "img000.png", seed=99)  # sorts first: every row moves by one
    r = run_cli(*args, "--skip-existing", "--json")
    assert r.returncode == 0, r.stderr
    assert all(x["status"] == "ok" for x in json_lines(r.stdout))
    fresh = tmp_path / "fresh"
    assert run_cli("encode", photos, "-o", fresh, "--shard-size", "4", *SMALL).returncode == 0
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00002.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "shC" / name), np.load(fresh / name))
    rows = {(m["output"], m["row"]): Path(m["input"]).name for m in read_manifest(tmp_path / "shC")[-9:]}
    assert rows[("shard-00000.npy", 0)] == "img000.png"


def test_sharded_resume_over_another_folder_skips_nothing(tmp_path):
    first = make_images(tmp_path / "a", [f"x{i}.png" for i in range(4)])
    other = tmp_path / "b"
    other.mkdir()
    for i, p in enumerate(sorted(first.iterdir())):
        make_image(other / f"y{i}.png", seed=50 + i)
    assert run_cli("encode", first, "-o", tmp_path / "sh", "--shard-size", "4", *SMALL).returncode == 0
    r = run_cli("encode", other, "-o", tmp_path / "sh", "--shard-size", "4", "--skip-existing", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in json_lines(r.stdout)] == ["ok"] * 4


def test_sharded_resume_redoes_a_shard_with_a_failed_row(tmp_path):
    photos = make_images(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    good = (photos / "b.png").read_bytes()
    (photos / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    args = ("encode", photos, "-o", tmp_path / "sh", "--shard-size", "4", *SMALL)
    assert run_cli(*args).returncode == 1
    again = run_cli(*args, "--skip-existing", "--json")  # still broken: still an error, never "skipped"
    assert again.returncode == 1
    assert {Path(x["input"]).name: x["status"] for x in json_lines(again.stdout)}["b.png"] == "error"
    (photos / "b.png").write_bytes(good)
    fixed = run_cli(*args, "--skip-existing", "--json")
    assert fixed.returncode == 0 and [x["status"] for x in json_lines(fixed.stdout)] == ["ok"] * 4
    assert not np.isnan(np.load(tmp_path / "sh" / "shard-00000.npy")).any()


@pytest.mark.parametrize("out", [None, "one.npy"])
def test_resume_checks_the_shape_and_dtype_it_finds(tmp_path, out):
    bs = make_images(tmp_path / "bs", ["a.png"])
    target = [] if out is None else ["-o", tmp_path / out]
    assert run_cli("encode", bs / "a.png", *target).returncode == 0  # (257, 384)
    r = run_cli("encode", bs / "a.png", *target, "--preset", "vit-b16", "--skip-existing", "--json")
    record = json_lines(r.stdout)[0]
    assert r.returncode == 1 and record["status"] == "error" and "(257, 384) float32" in record["error"]
    r = run_cli("encode", bs / "a.png", *target, "--skip-existing", "--json")
    assert r.returncode == 0 and json_lines(r.stdout)[0]["status"] == "skipped"
    assert json_lines(r.stdout)[0]["shape"] == [257, 384]
