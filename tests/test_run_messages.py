"""What `vitembed encode` tells the user on stderr about the run as a whole: where the layer came
from, where the files went, the shapes written, one-line failures, and notes counted per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli

RANDOM_LINE = "note: the layer is random (seed 3): pass --weights for a trained model's input layer"


def test_random_layer_is_told_on_stderr_once_but_not_with_quiet(tmp_path, photo_dir):
    result = run_cli("encode", photo_dir, "-o", tmp_path / "out", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().count(RANDOM_LINE) == 1
    assert not result.stdout.strip()  # stdout carries data only
    quiet = run_cli("encode", photo_dir, "-o", tmp_path / "quiet", "--seed", "3", "-q")
    assert quiet.returncode == 0 and b"layer is random" not in quiet.stderr


def test_summary_names_a_random_layers_seed_and_preset(tmp_path, photo_dir):
    result = run_cli("encode", photo_dir, "-o", tmp_path / "out", "--seed", "3", "--preset", "vit-ti16")
    summary = result.stderr.decode().strip().splitlines()[-1]
    assert "; layer random (seed 3, preset vit-ti16);" in summary, summary


def test_summary_names_the_weights_file_and_no_random_line(tmp_path, photo_dir):
    layer = tmp_path / "layer.pt"
    assert run_cli("init", "--preset", "vit-ti16", "-o", layer).returncode == 0
    result = run_cli("encode", photo_dir, "-o", tmp_path / "out", "--weights", layer)
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert "layer is random" not in err
    assert f"; layer {layer} (vitembed layer file);" in err.strip().splitlines()[-1]


def test_folder_encoded_without_output_ends_with_where_the_files_went(photo_dir):
    result = run_cli("encode", photo_dir)
    assert result.returncode == 0, result.stderr
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == f"outputs written beside their images, under {photo_dir}; -o DIR puts them in a folder of their own"
    assert (photo_dir / "a.npy").is_file()
    quiet = run_cli("encode", photo_dir, "-q", "--skip-existing")
    assert quiet.returncode == 0 and b"outputs written" not in quiet.stderr


def test_native_run_summary_gives_the_range_of_token_rows(tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "wide.png", size=(60, 8))
    make_image(folder / "square.png", size=(32, 32))
    result = run_cli("encode", folder, "-o", tmp_path / "out", "--resize", "native", "--image-size", "32",
                     "--patch-size", "8", "--emb-dim", "16", "--max-patches", "16")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("2 encoded; tokens ") and "; tokens 11-17 x 16;" in summary, summary


def test_one_input_that_fails_gives_one_error_line_and_a_one_line_summary(tmp_path):
    result = run_cli("encode", tmp_path / "nope.png", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [f"error: {tmp_path / 'nope.png'}: no such file or folder",
                                                    "0 encoded, 1 failed"]


def _strained_images(folder: Path) -> Path:
    make_image(folder / "tiny.png", size=(4, 4))  # 8x to 32 px
    make_image(folder / "tiny2.png", size=(5, 5), seed=1)
    make_image(folder / "tall.png", size=(10, 100), seed=2)  # 10:1 squashed to 1:1
    make_image(folder / "fine.png", size=(40, 30), seed=3)
    return folder


def _strain_notes(stderr: bytes) -> list[str]:
    lines = stderr.decode().splitlines()
    return [line for line in lines if line.startswith("note: ") and ("beyond 2:1" in line or "than 4x" in line)]


STRAIN_NOTE = ("note: 2 images upscaled more than 4x (first: {folder}/tiny.png) and 1 image squashed beyond 2:1 "
               "(first: {folder}/tall.png): their tokens see few pixels of their own, or a distorted image; "
               "--resize crop|pad|native keeps the aspect ratio")


def test_upscaled_and_squashed_images_get_one_note_per_run_with_decoder_processes(tmp_path):
    folder = _strained_images(tmp_path / "photos")
    result = run_cli("encode", folder, "-o", tmp_path / "out", "-j", "2", "--image-size", "32", "--patch-size", "8",
                     "--emb-dim", "16")
    assert result.returncode == 0, result.stderr
    assert _strain_notes(result.stderr) == [STRAIN_NOTE.format(folder=folder)]


def test_upscale_note_in_process_and_none_with_pad_for_the_squashed(tmp_path):
    folder = _strained_images(tmp_path / "photos")
    result = run_cli("encode", folder, "-o", tmp_path / "out", "--resize", "pad", "--image-size", "32",
                     "--patch-size", "8", "--emb-dim", "16")
    assert result.returncode == 0, result.stderr
    notes = _strain_notes(result.stderr)
    assert len(notes) == 1 and notes[0].startswith(f"note: 2 images upscaled more than 4x (first: {folder}/tiny.png):")


@pytest.mark.slow  # a Ray cluster
def test_upscale_and_squash_note_on_ray(ray_session, tmp_path):
    folder = _strained_images(tmp_path / "photos")
    result = run_cli("encode", folder, "-o", tmp_path / "out", "--image-size", "32", "--patch-size", "8",
                     "--emb-dim", "16", "--ray", "--ray-cpus", "0.5", "--ray-actors", "2")
    assert result.returncode == 0, result.stderr
    assert _strain_notes(result.stderr) == [STRAIN_NOTE.format(folder=folder)]
