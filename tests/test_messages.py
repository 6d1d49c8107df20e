"""What a user reads when something goes wrong: one line, no traceback, the right exit code,
nothing from a file name driving the terminal, and a reason that says what is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vitembed
from tests.conftest import make_image, read_manifest, run_cli, slow_but
from vitembed.errors import ConfigError

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]
SMALL_API = dict(image_size=32, patch_size=8, emb_dim=16, workers=0)
FULL = Path("/dev/full")


def _error_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode(errors="replace").splitlines() if line.startswith("error")]


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", slow_but([  # a process each
    ["info", "--presets"], ["info", "--presets", "--json"], ["info", *SMALL],
    ["inspect", "TOKENS"], ["inspect", "--json", "TOKENS"],
    ["show", "positions", *SMALL, "-o", "-"],
], ["inspect", "TOKENS"], ids=["info-presets", "info-presets-json", "info", "inspect", "inspect-json", "show"]))
def test_stdout_on_a_full_disk_is_one_line(tmp_path, args):
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.zeros((17, 16), np.float32))
    args = [str(tokens) if a == "TOKENS" else a for a in args]
    with open(FULL, "wb") as full:
        r = subprocess.run([sys.executable, "-m", "vitembed", *args], stdout=full, stderr=subprocess.PIPE,
                           timeout=120)
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert _error_lines(r.stderr) == ["error: stdout: disk full (no space left on device)"]


@pytest.mark.parametrize("bad", slow_but([np.nan, np.inf, -np.inf], -np.inf))
def test_show_tokens_of_non_finite_tokens_is_one_line(tmp_path, bad):
    z = np.random.default_rng(0).normal(size=(17, 16)).astype(np.float32)
    z[3, 4] = bad
    np.save(tmp_path / "z.npy", z)
    r = run_cli("show", "tokens", tmp_path / "z.npy", *SMALL, "-o", tmp_path / "z.png")
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert _error_lines(r.stderr) == [f"error: {tmp_path / 'z.npy'}: holds NaN or infinite values (the row of an "
                                      "input that failed?); only finite tokens can be drawn"]
    assert not (tmp_path / "z.png").exists()


def test_a_batch_size_over_the_bound_is_a_usage_error(tmp_path):
    image = make_image(tmp_path / "a.png")
    r = run_cli("encode", image, *SMALL, "-j", "0", "-b", "100000000", "-o", tmp_path / "out")
    assert r.returncode == 2 and _error_lines(r.stderr) == ["error: batch size must be at most 4096, got 100000000"]
    assert not (tmp_path / "out").exists()
    assert run_cli("encode", image, *SMALL, "-j", "0", "-b", "4096", "-o", tmp_path / "out").returncode == 0


@pytest.mark.parametrize("options, message", [
    (dict(workers=10**9), "workers must be at most 1024, got 1000000000"),
    (dict(batch_size=10**8), "batch size must be at most 4096, got 100000000"),
    (dict(shard_size=2.5), "shard size must be a whole number, got 2.5"),
    (dict(batch_size=2.5), "batch size must be a whole number, got 2.5"),
    (dict(workers="2"), "workers must be a whole number, got '2'"),
    (dict(batch_size=True), "batch size must be a whole number, got True"),
])
def test_api_counts_out_of_bounds_or_not_whole_are_refused(tmp_path, options, message):
    image = make_image(tmp_path / "a.png")
    with pytest.raises(ConfigError) as refused:
        vitembed.encode([image], tmp_path / "out", **{**SMALL_API, **options})
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crop_pct", ["1e-300", "0.05", "nan"])
def test_a_tiny_crop_pct_is_a_usage_error(tmp_path, crop_pct):
    image = make_image(tmp_path / "a.png")
    r = run_cli("encode", image, *SMALL, "-j", "0", "--resize", "crop", "--crop-pct", crop_pct)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _error_lines(r.stderr) == [f"error: crop-pct must be from 0.1 to 1, got {float(crop_pct)}"]
    assert not (tmp_path / "a.npy").exists()


ESCAPE = "\x1b[2J"  # clears the screen


def test_escape_sequences_in_file_names_are_escaped_in_error_lines(tmp_path):
    bad = tmp_path / f"bad{ESCAPE}.png"
    bad.write_bytes(b"not an image")
    r = run_cli("encode", bad, *SMALL, "-j", "0", "-o", tmp_path / "out")
    assert r.returncode == 1 and b"\x1b" not in r.stderr
    assert any("bad\\x1b[2J.png" in line for line in _error_lines(r.stderr)), r.stderr
    r = run_cli("show", "patches", bad, *SMALL, "-o", tmp_path / "p.png")
    assert r.returncode == 1 and b"\x1b" not in r.stderr and "bad\\x1b[2J.png" in r.stderr.decode()


def test_escape_sequences_in_notes_and_written_lines_are_escaped(tmp_path):
    image = make_image(tmp_path / f"pic{ESCAPE}.png")
    r = run_cli("show", "patches", image, *SMALL, cwd=tmp_path)
    assert r.returncode == 0 and b"\x1b" not in r.stderr and "pic\\x1b[2J.patches.png" in r.stderr.decode()
    r = run_cli("init", *SMALL, "-o", tmp_path / f"layer{ESCAPE}.pt")
    assert r.returncode == 0 and b"\x1b" not in r.stderr and "layer\\x1b[2J.pt" in r.stderr.decode()


@pytest.mark.skipif(not Path("/dev/null").is_char_device(), reason="needs /dev/null")
def test_an_output_folder_that_is_a_device_says_so(tmp_path):
    image = make_image(tmp_path / "a.png")
    r = run_cli("encode", image, *SMALL, "-j", "0", "-o", "/dev/null")
    assert r.returncode == 1
    assert _error_lines(r.stderr) == ["error: /dev/null: exists and is a character device, not a folder"]
    r = run_cli("show", "patches", image, *SMALL, "-o", "/dev/null/x.png")
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert _error_lines(r.stderr) == ["error: /dev/null/x.png: cannot write: /dev/null: exists and is a character "
                                      "device, not a folder"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_folder_that_takes_no_files_says_so(tmp_path):
    image = make_image(tmp_path / "a.png")
    r = run_cli("encode", image, *SMALL, "-j", "0", "-o", "/proc/self/")
    assert r.returncode == 1
    [line] = _error_lines(r.stderr)
    assert line.endswith("no file can be created in this folder (a special file system, such as /proc)"), line


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where mounting is allowed (root on Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line(many_images, small_disk):
    out = small_disk / "out"
    r = run_cli("encode", many_images, "-o", out, "--image-size", "64", "--patch-size", "8", "--emb-dim", "64",
                "-b", "4", "-q")
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"disk full" in r.stderr
    written = list(out.glob("*.npy"))
    assert written and len(written) < 300
    for path in written:
        assert np.load(path).shape == (65, 64)
    assert not list(out.glob(".vitembed-*.tmp"))


@pytest.mark.slow
def test_a_read_only_target_is_one_line(photo_dir, small_disk):
    (small_disk / "out").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    r = run_cli("encode", photo_dir, "-o", small_disk / "out", *SMALL)
    assert r.returncode == 1 and b"read-only" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--seed", "1180591620717411303424"], "seed"),
    (["--image-size", "140000", "--patch-size", "14"], "image-size (140000) is over the limit"),
    (["--emb-dim", "1000000000"], "emb-dim"),
    (["--decode-timeout", "nan"], "decode timeout"),
    (["--shard-size", "100000000", "-o", "OUT"], "shard size"),
])
def test_absurd_options_are_one_line_usage_errors(tmp_path, args, needle):
    image = make_image(tmp_path / "a.png")
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    r = run_cli("encode", image, *args)
    assert r.returncode == 2 and needle.encode() in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["-o", "-"], ["--json", "-o", "OUT"]])
def test_encode_stdout_on_a_full_disk_is_one_line(tmp_path, args):
    import subprocess
    import sys

    image = make_image(tmp_path / "a.png")
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(image), *args, *SMALL],
                           stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    errors = [line for line in r.stderr.decode().splitlines() if line.startswith("error")]
    assert errors == ["error: stopped: stdout: disk full (no space left on device)"]


def test_markup_in_names_and_options_is_printed_as_is(sample_paths, tmp_path):
    """Rich markup never eats a `[` from a user, a file system or another library."""
    holiday = tmp_path / "holiday [draft]"
    holiday.mkdir()
    shutil.copy(sample_paths[0], holiday / "cat.png")
    (tmp_path / "d[").mkdir()
    shutil.copy(sample_paths[1], tmp_path / "d[/x].png")  # a file name that closes a tag
    shutil.copy(sample_paths[2], tmp_path / "[bold]b.png")
    out = tmp_path / "out [/]"
    result = run_cli("encode", holiday, tmp_path / "d[/x].png", tmp_path / "[bold]b.png", tmp_path / "[red]gone.png",
                     "-o", out)
    assert result.returncode == 1, result.stderr
    err = result.stderr.decode()
    assert "Traceback" not in err and "MarkupError" not in err
    for name in ("holiday [draft]/cat.png", "d[/x].png", "[bold]b.png", "[red]gone.png: no such file",
                 "[bold]b.npy", "out [/]"):
        assert name in err, name
    assert [r["status"] for r in read_manifest(out)] == ["ok", "ok", "ok", "error"]

    listed = run_cli("inspect", out / "[bold]b.npy", out / "x].npy", out / "[/nope].npy")
    assert listed.returncode == 1
    assert "[bold]b.npy" in listed.stdout.decode() and "x].npy" in listed.stdout.decode()
    assert "[/nope].npy" in listed.stderr.decode()

    made = run_cli("init", "-o", tmp_path / "layer [bold].pt")
    assert made.returncode == 0 and "layer [bold].pt" in made.stderr.decode()


@pytest.mark.parametrize("command", [["encode", "x.png"], ["info"]])
@pytest.mark.parametrize("weights", ["timm:x[pretrained]", "missing [bold]w.pt"])
def test_markup_in_weights_is_printed_as_is(tmp_path, command, weights):
    result = run_cli(*command, "--weights", weights, cwd=tmp_path)
    assert result.returncode in (1, 2)
    err = result.stderr.decode()
    assert "Traceback" not in err
    # timm's own message names the model; without timm, the hint is pip install 'vitembed[pretrained]'.
    assert ("[pretrained]" if weights.startswith("timm") else weights) in err


def test_a_url_is_not_read_and_the_message_says_so(tmp_path):
    url = "https://upload.wikimedia.org/wikipedia/commons/cat.jpg"
    for result in (run_cli("encode", url, "-o", "out", cwd=tmp_path),
                   run_cli("encode", "-", "-o", "out", input=url.encode() + b"\n", cwd=tmp_path)):
        assert result.returncode == 1
        err = result.stderr.decode()
        assert "a URL; vitembed reads only local files" in err and "download it first" in err
    assert f"curl -O {url})" in run_cli("encode", url, cwd=tmp_path).stderr.decode()  # as typed, // kept


@pytest.mark.slow
def test_missing_extra_hint_keeps_its_brackets(tmp_path):
    """Without timm, the hint names the extra: pip install 'vitembed[pretrained]'."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise ImportError('no timm here')\n")
    result = run_cli("info", "--weights", "timm:vit_base_patch16_224",
                     env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert result.returncode == 1
    assert b"vitembed[pretrained]" in result.stderr and b"Traceback" not in result.stderr
