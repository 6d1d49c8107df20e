"""What a new user meets in the first hour (issue #13): help, messages, output names, the README."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import json_lines, read_manifest, run_cli
from vitembed.formats import DTYPE_ALIASES

COMMANDS = [[], ["encode"], ["init"], ["info"], ["inspect"]]


def help_at_80_columns(*command: str) -> str:
    result = run_cli(*command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def flat(text: str) -> str:
    """Help text as one line: words, without rich's wrapping and panel borders."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_what_users_type(command):
    text = help_at_80_columns(*command)
    assert all(len(line) <= 80 for line in text.splitlines())
    # Typer's type labels are not what anyone types.
    for label in ("<bool>", "<list[str]>", "<int>", "<str>", "<float>", "<path>", "{inputs}", "{files}"):
        assert label not in text, label
    # No example is wrapped into a line that starts in the middle of a pipeline.
    assert not any(line.strip(" │").startswith("|") for line in text.splitlines())


def test_encode_help_metavars():
    text = help_at_80_columns("encode")
    assert "encode [OPTIONS] INPUTS..." in text
    assert re.search(r"--batch-size\s+-b\s+INTEGER", text)
    assert re.search(r"--output\s+-o\s+PATH", text)
    assert re.search(r"--format\s+-f\s+\[npy\|pt\]", text)
    assert re.search(r"--quiet\s+-q\s+No table", text)  # a flag: no placeholder
    assert "jq .output" in text


def test_init_help_has_no_weights():
    text = flat(help_at_80_columns("init"))
    assert "ignored with --weights" not in text and "--seed INTEGER Seed of the random layer." in text


@pytest.mark.parametrize(("alias", "dtype"), [("fp16", "float16"), ("FP16", "float16"), ("half", "float16"),
                                              ("bf16", "bfloat16"), ("fp32", "float32")])
def test_dtype_aliases(sample_paths, tmp_path, alias, dtype):
    fmt = "pt" if dtype == "bfloat16" else "npy"
    result = run_cli("encode", sample_paths[0], "-o", tmp_path / "out", "--dtype", alias, "--format", fmt, "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["dtype"] == dtype


def test_dtype_help_lists_every_alias():
    text = flat(help_at_80_columns("encode"))
    assert "--dtype DTYPE Output dtype: float32, float16 or bfloat16" in text
    assert all(alias in text for alias in DTYPE_ALIASES)


def test_wrong_dtype_suggests_the_spelling(sample_paths):
    result = run_cli("encode", sample_paths[0], "--dtype", "flaot16")
    assert result.returncode == 2
    assert b"did you mean float16?" in result.stderr and b"Traceback" not in result.stderr


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


def test_table_never_wraps_a_file_name():
    from rich.console import Console

    from vitembed.report import print_table

    name = "photos/" + "a-long-folder-name/" * 5 + "astronaut.png"
    rows = [(name, "tokens/astronaut.npy", "257 x 384", "float32", "ok")]
    header = ("input", "output", "shape", "dtype", "status")
    log = io.StringIO()  # not a terminal: one line per file, however long
    print_table(Console(file=log, width=40), header, rows, paths=(0, 1))
    assert name in log.getvalue() and len(log.getvalue().splitlines()) == 2
    terminal = io.StringIO()  # a terminal: the path is shortened from the left to fit
    print_table(Console(file=terminal, width=70, force_terminal=True, color_system=None), header, rows, paths=(0, 1))
    lines = terminal.getvalue().splitlines()
    assert len(lines) == 2 and all(len(line) <= 70 for line in lines)
    assert "…" in lines[1] and "astronaut.png" in lines[1]


def test_what_was_asked_for_goes_to_stdout(sample_paths, tmp_path):
    presets = run_cli("info", "--presets")
    assert presets.returncode == 0 and presets.stderr == b""
    assert [line for line in presets.stdout.decode().splitlines() if "b16" in line]
    assert run_cli("encode", sample_paths[0], "-o", tmp_path / "a.npy", "-q").returncode == 0
    listed = run_cli("inspect", tmp_path / "a.npy")
    assert listed.returncode == 0 and b"257 x 384" in listed.stdout and listed.stderr == b""


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    result = run_cli("encode", "nope/", "-o", "t/", cwd=tmp_path)
    assert result.returncode == 1 and b"nope" in result.stderr
    assert not (tmp_path / "t").exists()


def test_run_json_records_the_device_used(sample_paths, tmp_path):
    assert run_cli("encode", sample_paths[0], "-o", tmp_path / "out", "-q").returncode == 0  # --device auto
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["device"] == "cpu"


def test_version():
    from importlib import metadata

    import vitembed

    result = run_cli("--version")
    assert result.returncode == 0
    line = result.stdout.decode()
    assert line.startswith(f"vitembed {vitembed.__version__} (")
    for name in ("torch", "Pillow", "numpy"):
        assert f"{name} {metadata.version(name)}" in line


@pytest.mark.slow
def test_version_imports_no_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom vitembed.cli import app\n"
            "assert CliRunner().invoke(app, ['--version']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["cat.npz", "cat.jpg", "cat.safetensors", "tokens.v2"])
def test_output_with_another_suffix_is_refused(sample_paths, tmp_path, name):
    result = run_cli("encode", sample_paths[0], "-o", name, cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"not .{name.rsplit('.', 1)[1]}" in err and f"-o {name}/ for a folder" in err
    assert list(tmp_path.iterdir()) == []


def test_output_pth_is_a_pt_file(sample_paths, tmp_path):
    import torch

    result = run_cli("encode", sample_paths[0], "-o", "cat.pth", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "cat.pth", weights_only=True).shape == (257, 384)
    again = run_cli("encode", sample_paths[0], "-o", "cat.pth", "--skip-existing", "--json", cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "skipped"


@pytest.mark.parametrize("name", ["tokens", "tokens.v2/", "cat.npy/"])
def test_output_folders(sample_paths, tmp_path, name):
    result = run_cli("encode", sample_paths[0], "-o", name, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / name / f"{sample_paths[0].stem}.npy").is_file()


@pytest.mark.slow
def test_stdout_on_a_terminal_is_refused(sample_paths, tmp_path):
    """`-o -` with stdout on a terminal: refused (as gzip does), nothing binary written to it."""
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(sample_paths[0]), "-o", "-"],
                              stdout=follower, stderr=subprocess.PIPE, timeout=120, cwd=tmp_path)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 2
    assert b"terminal" in proc.stderr and b"> cat.npy" in proc.stderr
    assert shown == b""


def test_a_url_is_not_read_and_the_message_says_so(tmp_path):
    url = "https://upload.wikimedia.org/wikipedia/commons/cat.jpg"
    for result in (run_cli("encode", url, "-o", "out", cwd=tmp_path),
                   run_cli("encode", "-", "-o", "out", input=url.encode() + b"\n", cwd=tmp_path)):
        assert result.returncode == 1
        err = result.stderr.decode()
        assert "a URL; vitembed reads only local files" in err and "download it first" in err
    assert f"curl -O {url})" in run_cli("encode", url, cwd=tmp_path).stderr.decode()  # as typed, // kept


def test_outputs_given_by_a_glob_are_passed_over(sample_paths, tmp_path):
    """`encode photos/*` after a run beside the photos: the .npy files are no inputs, and every
    photo keeps its plain output name."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sample_paths:
        shutil.copy(path, photos / path.name)
    assert run_cli("encode", *sorted(photos.iterdir()), "-q").returncode == 0  # beside: photos/*.npy
    globbed = sorted(photos.iterdir())  # what the shell makes of photos/*
    assert len(globbed) == 2 * len(sample_paths)
    result = run_cli("encode", *globbed, "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert [r["status"] for r in records] == ["ok"] * len(sample_paths)
    assert sorted(Path(r["output"]).name for r in records) == sorted(f"{p.stem}.npy" for p in sample_paths)
    notes = [line for line in result.stderr.decode().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"and {len(sample_paths) - 1} more" in notes[0] and "outputs, not images" in notes[0]


@pytest.mark.slow
def test_missing_extra_hint_keeps_its_brackets(tmp_path):
    """Without timm, the hint names the extra: pip install 'vitembed[pretrained]'."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("raise ImportError('no timm here')\n")
    result = run_cli("info", "--weights", "timm:vit_base_patch16_224",
                     env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert result.returncode == 1
    assert b"vitembed[pretrained]" in result.stderr and b"Traceback" not in result.stderr
