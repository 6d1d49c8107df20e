"""`vitembed` end to end, in subprocesses: files, folders, stdin, stdout, JSON, formats, errors."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_image, run_cli, slow_but
from vitembed.images.decode import Preprocess, load_image
from vitembed.layer.reference import PRESETS, build_layer, resolve_config
from vitembed.encoder import encode_images


# The CLI on a CPU runs the numpy engine; expected_tokens runs the torch layer. They agree up to
# float32 rounding (a matrix product summed in another order).
ENGINES_AGREE = dict(rtol=1e-5, atol=5e-5)


def expected_tokens(path: Path, preset: str = "vitbook-s14", seed: int = 0, **prep) -> np.ndarray:
    """z0 of one image from the torch layer (`encode_images`)."""
    layer = build_layer(PRESETS[preset], seed)
    return encode_images([path], layer, Preprocess(image_size=layer.config.image_size, **prep))[0].numpy()


def test_single_file_beside_input(photo_dir):
    result = run_cli("encode", photo_dir / "a.png")
    assert result.returncode == 0, result.stderr
    out = np.load(photo_dir / "a.npy")
    assert out.shape == (257, 384) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected_tokens(photo_dir / "a.png"), **ENGINES_AGREE)
    assert result.stdout == b""
    assert b"257 x 384" in result.stderr  # the shape report


def test_folder_to_output_dir_keeps_structure(photo_dir, tmp_path):
    out = tmp_path / "out"
    (photo_dir / "notes.txt").write_text("not an image")
    result = run_cli("encode", photo_dir, "-o", out, "--preset", "vit-ti16", "-q")
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert files == ["a.npy", "b.npy", "sub/c.npy"]
    assert np.load(out / "sub/c.npy").shape == (197, 192)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["output"] for m in manifest] == ["a.npy", "b.npy", "sub/c.npy"]
    assert all(m["status"] == "ok" and m["shape"] == [197, 192] for m in manifest)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["layer"]["emb_dim"] == 192
    assert run["config"]["preprocess"]["resize"] == "squash"
    assert len(run["config"]["weights"]["fingerprint"]) == 64
    assert result.stderr.strip() == b""  # --quiet


@pytest.mark.parametrize("fmt", slow_but(["npy", "pt"], "npy"))
def test_deterministic_byte_identical(photo_dir, tmp_path, fmt):
    for name in ("r1", "r2"):
        assert run_cli("encode", photo_dir, "-o", tmp_path / name, "-q", "--workers", "1", "--format", fmt).returncode == 0
    files = sorted((tmp_path / "r1").rglob(f"*.{fmt}"))
    assert len(files) == 3
    for f in files:
        assert f.read_bytes() == (tmp_path / "r2" / f.relative_to(tmp_path / "r1")).read_bytes()
    other = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / f"seed1.{fmt}", "--seed", "1", "-q")
    assert other.returncode == 0
    assert (tmp_path / f"seed1.{fmt}").read_bytes() != (tmp_path / f"r1/a.{fmt}").read_bytes()


def test_stdin_paths_and_null_separated(photo_dir, tmp_path):
    paths = [photo_dir / "a.png", photo_dir / "sub" / "c.png"]
    newline = run_cli("encode", "-", "-o", tmp_path / "nl", "--json", input=b"\n".join(bytes(p) for p in paths) + b"\n")
    assert newline.returncode == 0, newline.stderr
    lines = [json.loads(line) for line in newline.stdout.decode().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok"]
    # Paths from stdin keep their path under -o, with the root dropped.
    assert {Path(line["output"]).name for line in lines} == {"a.npy", "c.npy"}
    assert all(str(tmp_path / "nl") in line["output"] for line in lines)
    weird = photo_dir / "new\nline.png"
    shutil.copy(photo_dir / "a.png", weird)
    null = run_cli("encode", "-", "-0", "-o", tmp_path / "nul", "-q", input=bytes(weird) + b"\0" + bytes(paths[0]) + b"\0")
    assert null.returncode == 0, null.stderr
    assert len(list((tmp_path / "nul").rglob("*.npy"))) == 2
    assert list((tmp_path / "nul").rglob("new\nline.npy"))


def test_stdout_npy_is_the_only_output(photo_dir):
    result = run_cli("encode", photo_dir / "b.png", "-o", "-")
    assert result.returncode == 0, result.stderr
    array = np.load(io.BytesIO(result.stdout), allow_pickle=False)
    np.testing.assert_allclose(array, expected_tokens(photo_dir / "b.png"), **ENGINES_AGREE)
    assert not (photo_dir / "b.npy").exists()


def test_stdout_pt(photo_dir):
    result = run_cli("encode", photo_dir / "b.png", "-o", "-", "--format", "pt", "-q")
    assert result.returncode == 0
    tensor = torch.load(io.BytesIO(result.stdout), weights_only=True)
    assert tensor.shape == (257, 384)


def test_stdout_refuses_many_inputs(photo_dir):
    result = run_cli("encode", photo_dir, "-o", "-")
    assert result.returncode == 2
    assert b"exactly one input" in result.stderr and result.stdout == b""


def test_pt_output_and_dtypes(photo_dir, tmp_path):
    result = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "a.pt", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    tensor = torch.load(tmp_path / "a.pt", weights_only=True)
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (257, 384)
    # A compact tensor: the file does not carry its batch's storage.
    assert tensor.untyped_storage().nbytes() == 257 * 384 * 2
    ref = torch.from_numpy(expected_tokens(photo_dir / "a.png"))
    # The engines' float32 tolerance (5e-5, another order of sums), then bfloat16's rounding: a
    # value that lands near a rounding boundary may go to the neighbouring step (2^-7 relative).
    torch.testing.assert_close(tensor.float(), ref.bfloat16().float(), rtol=2.0 ** -7, atol=5e-5)
    half = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "h.npy", "--dtype", "float16", "-q")
    assert half.returncode == 0 and np.load(tmp_path / "h.npy").dtype == np.float16
    bad = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "b.npy", "--dtype", "bfloat16")
    assert bad.returncode == 2 and b"bfloat16" in bad.stderr


def test_json_lines(photo_dir, tmp_path):
    (photo_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run_cli("encode", photo_dir, "-o", tmp_path / "o", "--json", "-q")
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 4
    assert all(set(r) == {"input", "output", "shape", "dtype", "status", "error"} for r in records)
    bad = [r for r in records if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["input"].endswith("broken.png") and bad[0]["output"] is None and bad[0]["error"]
    good = [r for r in records if r["status"] == "ok"]
    assert all(r["shape"] == [257, 384] and r["dtype"] == "float32" and r["error"] is None for r in good)


def test_collisions_get_their_own_files(tmp_path):
    folder = tmp_path / "pets"
    make_image(folder / "pet.png", seed=1)
    make_image(folder / "pet.jpg", seed=2)
    make_image(folder / "pet.jpeg", seed=3)
    result = run_cli("encode", folder, "--json", "-q")
    assert result.returncode == 0, result.stderr
    outputs = {Path(json.loads(line)["input"]).name: Path(json.loads(line)["output"]).name
               for line in result.stdout.decode().splitlines()}
    # Input order is by name: pet.jpeg, pet.jpg, pet.png.
    assert outputs == {"pet.jpeg": "pet.npy", "pet.jpg": "pet.jpg.npy", "pet.png": "pet.png.npy"}
    for src, out in outputs.items():
        np.testing.assert_allclose(np.load(folder / out), expected_tokens(folder / src), **ENGINES_AGREE)


def test_error_exit_codes_and_others_go_on(photo_dir, tmp_path):
    (photo_dir / "empty.jpg").write_bytes(b"")
    result = run_cli("encode", photo_dir, tmp_path / "missing.png", "-o", tmp_path / "o")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "empty.jpg" in err and "missing.png" in err and "no such file" in err
    assert "Traceback" not in err
    assert len(list((tmp_path / "o").rglob("*.npy"))) == 3
    assert not list((tmp_path / "o").rglob("empty*"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image-size", "200", "--patch-size", "16"], "192 or 208"),
        (["--preset", "vit-nope"], "unknown preset"),
        (["--resize", "stretch"], "stretch"),
        (["--device", "cuda:7"], "cuda"),
        (["--batch-size", "0"], "batch size"),
    ],
)
def test_usage_errors_exit_2(photo_dir, args, needle):
    result = run_cli("encode", photo_dir / "a.png", *args)
    assert result.returncode == 2
    assert needle.encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert not (photo_dir / "a.npy").exists()


def test_unwritable_output_is_one_clear_error(photo_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("encode", photo_dir / "a.png", "-o", blocker / "out")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert f"{blocker / 'out'}: a path component is a file, not a folder".encode() in result.stderr


def test_options_override_preset(photo_dir, tmp_path):
    result = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "x.npy", "--preset", "vit-b16",
                     "--image-size", "96", "--emb-dim", "40", "--resize", "crop", "--normalize", "clip", "-q")
    assert result.returncode == 0, result.stderr
    out = np.load(tmp_path / "x.npy")
    assert out.shape == ((96 // 16) ** 2 + 1, 40)
    layer = build_layer(resolve_config("vit-b16", image_size=96, emb_dim=40), 0)
    prep = Preprocess(image_size=96, resize="crop").with_normalize("clip")
    np.testing.assert_allclose(out, encode_images([photo_dir / "a.png"], layer, prep)[0].numpy(), **ENGINES_AGREE)


def test_num_patch_row_and_grey(photo_dir, tmp_path):
    result = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "g.npy", "--num-patch-row", "7",
                     "--in-channels", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "g.npy").shape == (50, 384)


def test_init_and_weights_roundtrip(photo_dir, tmp_path):
    random = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "random.npy", "--preset", "vit-s16", "--seed", "9", "-q")
    assert random.returncode == 0, random.stderr
    np.testing.assert_allclose(np.load(tmp_path / "random.npy"), expected_tokens(photo_dir / "a.png", "vit-s16", 9),
                               **ENGINES_AGREE)
    for suffix in ("pt", "safetensors"):
        layer_file = tmp_path / f"layer.{suffix}"
        made = run_cli("init", "--preset", "vit-s16", "--seed", "9", "-o", layer_file)
        assert made.returncode == 0, made.stderr
        encoded = run_cli("encode", photo_dir / "a.png", "-o", tmp_path / f"w-{suffix}.npy", "--weights", layer_file, "-q")
        assert encoded.returncode == 0, encoded.stderr
        # The file holds the random layer's parameters exactly: the same bytes come out.
        assert (tmp_path / f"w-{suffix}.npy").read_bytes() == (tmp_path / "random.npy").read_bytes()
    payload = torch.load(tmp_path / "layer.pt", weights_only=True)
    assert payload["format"] == "vitembed-layer" and payload["version"] == 1
    assert payload["config"]["patch_size"] == 16 and "pos_emb" in payload["state_dict"]


def test_bad_weights_file(photo_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli("encode", photo_dir / "a.png", "--weights", bad)
    assert result.returncode == 1 and b"bad.pt" in result.stderr and b"Traceback" not in result.stderr


def test_info_text_and_json():
    text = run_cli("info", "--preset", "vit-b16")
    assert text.returncode == 0
    # What the command was asked for goes to stdout (`vitembed info | grep`), as with --json.
    assert b"197 x 768" in text.stdout and b"768" in text.stdout and text.stderr == b""
    data = json.loads(run_cli("info", "--json").stdout)
    assert data["tokens"] == [257, 384] and data["patch_dim"] == 588 and data["grid"] == [16, 16]
    assert data["parameters"] == 588 * 384 + 384 + 384 + 257 * 384
    presets = json.loads(run_cli("info", "--presets", "--json").stdout)
    assert set(presets) == set(PRESETS)


def test_inspect(photo_dir, tmp_path):
    run_cli("encode", photo_dir / "a.png", "-o", tmp_path / "a.npy", "-q")
    result = run_cli("inspect", tmp_path / "a.npy", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    array = np.load(tmp_path / "a.npy").astype(np.float64)
    assert stats["shape"] == [257, 384] and stats["dtype"] == "float32"
    assert stats["mean"] == pytest.approx(array.mean()) and stats["max"] == pytest.approx(array.max())
    (tmp_path / "junk.npy").write_bytes(b"junk")
    bad = run_cli("inspect", tmp_path / "junk.npy")
    assert bad.returncode == 1 and b"junk.npy" in bad.stderr and b"Traceback" not in bad.stderr


@pytest.mark.parametrize("command", slow_but([[], ["encode"], ["init"], ["info"], ["inspect"], ["show"], ["show", "patches"],
                                              ["show", "tokens"], ["show", "filters"], ["show", "positions"]],
                                             [], ["encode"], ["show", "positions"]))
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert b"Usage" in result.stdout


@pytest.mark.slow
def test_help_and_info_do_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vitembed.cli.main import app\n"
        "r = CliRunner().invoke(app, ['info', '--preset', 'vit-b16'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['encode', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for args in (['show', '--help'], ['show', 'tokens', '--help'], ['show', 'positions', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0 and 'Usage' in r.output, r.output\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_api_exports():
    """Every public name resolves to the object of the module it is documented in (lazily)."""
    import importlib

    import vitembed

    for name, module in vitembed._EXPORTS.items():
        assert getattr(vitembed, name) is getattr(importlib.import_module(f"vitembed.{module}"), name), name
    assert set(dir(vitembed)) == set(vitembed.__all__) >= {"Encoder", "encode", "VitInputLayer", "load_weights"}
    with pytest.raises(AttributeError):
        vitembed.nothing_here  # noqa: B018


def test_workers_zero_and_batches_equal(photo_dir, tmp_path):
    a = run_cli("encode", photo_dir, "-o", tmp_path / "a", "--workers", "0", "--batch-size", "1", "-q")
    b = run_cli("encode", photo_dir, "-o", tmp_path / "b", "--workers", "2", "--batch-size", "2", "-q")
    assert a.returncode == b.returncode == 0
    for f in (tmp_path / "a").rglob("*.npy"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io, deprecated in 0.29
def test_loaded_photos_match_an_independent_decode_and_resize(sample_paths):
    """The sample photos (PNG and JPEG) as load_image gives them equal torchvision's own decoders
    (libpng, libjpeg) and its tensor resize (bilinear, antialiased) to one level of rounding, in
    under 1% of the values: no Pillow call is shared with the code under test."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    for path in sample_paths:
        ours = load_image(path, Preprocess()).astype(np.int16)
        decoded = decode_image(str(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8
        ref = F.resize(decoded, [224, 224], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        diff = np.abs(ours - ref.permute(1, 2, 0).numpy().astype(np.int16))
        assert ours.shape == (224, 224, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.01, path.name


@pytest.mark.slow
def test_stdout_reader_leaving_early_ends_quietly(sample_paths):
    """`-o - | head -c 10`: the cut-short tensor is not reported as written; exit 141, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(sample_paths[0]), "-o", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"\x93NUMPY\x01\x00v\x00"
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert b"Traceback" not in stderr and b"encoded" not in stderr


def test_decoder_server_starts_early_unless_unused():
    from vitembed.cli.startup import wants_decoders as _decoders_wanted

    assert _decoders_wanted(["photos/", "-o", "out/"]) and _decoders_wanted(["x", "-j", "2"])
    for args in (["x", "-j", "0"], ["x", "-j0"], ["x", "--workers", "0"], ["x", "--workers=0"], ["--help"], ["-h"]):
        assert not _decoders_wanted(args), args


def _exit_script(*lines: str) -> subprocess.CompletedProcess:
    """Python `lines` run after importing sys, atexit, threading, time and _exit_without_teardown."""
    head = "import atexit, sys, threading, time\nfrom vitembed.cli.startup import exit_without_teardown as _exit_without_teardown\n"
    return subprocess.run([sys.executable, "-c", head + "\n".join(lines)], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("code, status, stderr", [(None, 0, ""), (3, 3, ""), ("bad thing", 1, "bad thing\n")])
def test_exit_without_teardown_flushes_and_keeps_the_status(code, status, stderr):
    r = _exit_script("atexit.register(lambda: sys.stdout.write('atexit ran'))", "sys.stdout.write('buffered ')",
                     f"_exit_without_teardown({code!r})", "sys.stdout.write('not reached')")
    assert (r.returncode, r.stdout, r.stderr) == (status, "buffered atexit ran", stderr)


@pytest.mark.slow
def test_exit_without_teardown_leaves_a_profiler_its_exit():
    r = _exit_script("sys.setprofile(lambda *a: None)", "_exit_without_teardown(0)", "sys.setprofile(None)",
                     "sys.stdout.write('returned')")
    assert r.returncode == 0 and r.stdout == "returned"


@pytest.mark.slow
def test_exit_without_teardown_waits_for_a_running_thread():
    r = _exit_script("t = threading.Thread(target=lambda: (time.sleep(0.3), sys.stdout.write('thread done')))",
                     "t.start()", "_exit_without_teardown(0)", "sys.stdout.write(' returned ')")
    assert r.returncode == 0 and r.stdout == " returned thread done"
