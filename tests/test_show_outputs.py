"""Where `vitembed show` puts its picture by default (the current folder, never among the photos),
and `vitembed encode` passing over the pictures it drew, with one note per run."""

from __future__ import annotations

import shutil

from tests.conftest import json_lines, make_image, run_cli

SMALL = ("--image-size", "32", "--patch-size", "8", "--emb-dim", "16")


def test_show_writes_its_default_picture_in_the_current_folder(tmp_path):
    photos = tmp_path / "photos"
    image = make_image(photos / "a.png")
    here = tmp_path / "here"
    here.mkdir()
    result = run_cli("show", "patches", image, *SMALL, cwd=here)
    assert result.returncode == 0, result.stderr
    assert (here / "a.patches.png").is_file()
    assert sorted(p.name for p in photos.iterdir()) == ["a.png"]


def test_encode_passes_over_pictures_vitembed_drew_with_one_note(tmp_path):
    photos = tmp_path / "photos"
    make_image(photos / "a.png")
    make_image(photos / "b.png", seed=1)
    (photos / "sub").mkdir()
    for name in ("a", "b"):
        assert run_cli("show", "patches", photos / f"{name}.png", *SMALL, cwd=tmp_path).returncode == 0
        shutil.move(tmp_path / f"{name}.patches.png", photos / "sub" / f"{name}.patches.png")
    out = tmp_path / "out"
    result = run_cli("encode", photos, "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    inputs = sorted(line["input"] for line in json_lines(result.stdout))
    assert inputs == [str(photos / "a.png"), str(photos / "b.png")]
    notes = [line for line in result.stderr.decode().splitlines() if line.startswith("note: passed over")]
    assert notes == [f"note: passed over {photos / 'sub' / 'a.patches.png'} and 1 more: PNGs that vitembed show "
                     "drew (they carry its text chunk), not images"]


def test_encode_passes_over_a_picture_named_directly_but_not_a_plain_png(tmp_path):
    image = make_image(tmp_path / "a.png")
    assert run_cli("show", "tokens", image, *SMALL, cwd=tmp_path).returncode == 0
    result = run_cli("encode", image, tmp_path / "a.tokens.png", "-o", tmp_path / "out", *SMALL)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == ["a.npy"]
    assert b"passed over" in result.stderr and b"a.tokens.png" in result.stderr


def test_reading_the_chunk_reads_no_image_data(tmp_path):
    from vitembed.files.pngfile import drawn_by_vitembed

    plain = make_image(tmp_path / "plain.png")
    assert not drawn_by_vitembed(plain)
    assert not drawn_by_vitembed(tmp_path / "missing.png")
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert not drawn_by_vitembed(tmp_path / "short.png")
