"""What vitembed reads that others made, weights (--weights) and outputs (inspect), is read in
bounded memory and time: no device or FIFO, no allocation a header merely claims, no unbounded
read, and one clear line for a malformed file. Every call that could hang or exhaust memory
if a defence regressed runs in a subprocess with a capped address space and a timeout, so that a
regression fails its test instead of taking the machine down with it.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vitembed.cli.main import app
from vitembed.files.ptformat import _pickle
from vitembed.weights.load import load_weights, save_layer

from tests.conftest import make_image, slow_but

GiB = 1 << 30
TORCH_MEMORY = 6 * GiB  # python + torch take about 3.3 GiB of address space before any work
NUMPY_MEMORY = 1 * GiB  # python + numpy + typer + rich: about 0.2 GiB


def run_limited(*args, memory: int = TORCH_MEMORY, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m vitembed ARGS` with its address space capped at `memory` bytes, stopped after `timeout` s."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vitembed", *map(str, args)], capture_output=True,
                          timeout=timeout, env=env, preexec_fn=cap)


def assert_one_line(r, *substrings: str, code: int = 1) -> str:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for s in substrings:
        assert s in err, err
    return err


def small_layer():
    from vitembed.layer.reference import LayerConfig, build_layer

    return build_layer(LayerConfig(32, 8, 16), seed=0)


def input_layer(d: int = 48, p: int = 8, grid: int = 4) -> dict[str, torch.Tensor]:
    """A timm ViT's input layer (all a checkpoint needs to be recognised)."""
    g = torch.Generator().manual_seed(0)
    return {"patch_embed.proj.weight": torch.randn(d, 3, p, p, generator=g), "patch_embed.proj.bias": torch.randn(d, generator=g),
            "cls_token": torch.randn(1, 1, d, generator=g), "pos_embed": torch.randn(1, 1 + grid * grid, d, generator=g)}


def save_safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# --- devices and FIFOs as weights -------------------------------------------------------


def _weights_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A weights path that is, or leads to, a device or a FIFO; and the words its refusal must hold."""
    if case in ("zero.pt", "urandom.pt"):
        (tmp_path / case).symlink_to("/dev/" + case.removesuffix(".pt"))
        return tmp_path / case, "not a regular file (a character device)"
    if case.startswith("fifo"):
        os.mkfifo(tmp_path / case)
        return tmp_path / case, "not a regular file (a FIFO)"
    folder = tmp_path / "vit"
    folder.mkdir()
    if case == "folder/model.safetensors -> /dev/zero":
        (folder / "model.safetensors").symlink_to("/dev/zero")
        return folder, "not a regular file"
    names = list(input_layer())
    if case == "index entry /dev/zero":
        weight_map, words = {k: "/dev/zero" for k in names}, "outside its folder"
    elif case == "index entry ../":
        torch.save(input_layer(), tmp_path / "outside.bin")
        weight_map, words = {k: "../outside.bin" for k in names}, "outside its folder"
    else:  # an entry inside the folder that is a link to a device
        (folder / "shard.bin").symlink_to("/dev/zero")
        weight_map, words = {k: "shard.bin" for k in names}, "not a regular file"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, words


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero.pt", "urandom.pt", "fifo.pt", "fifo.safetensors",
                                  "folder/model.safetensors -> /dev/zero", "index entry /dev/zero",
                                  "index entry ../", "index entry -> /dev/zero"])
def test_device_or_fifo_as_weights_is_refused(tmp_path, case):
    """/dev/zero, /dev/urandom or a FIFO as weights, directly, through a folder or
    through a shard index, is refused before it is opened (it used to eat all memory or hang)."""
    path, words = _weights_case(tmp_path, case)
    assert_one_line(run_limited("info", "--weights", path, timeout=60), words)


# --- sizes a checkpoint claims ----------------------------------------------------------


def _layer_file_claiming(tmp_path: Path, suffix: str, **config) -> Path:
    """A layer file of a small layer whose stored config claims something else."""
    path = tmp_path / f"layer{suffix}"
    save_layer(small_layer(), path)
    if suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta["config"] = json.dumps({**json.loads(meta["config"]), **config})
        save_file(state, str(path), metadata=meta)
    else:
        payload = torch.load(path, weights_only=True)
        payload["config"].update(config)
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("case, words", [
    # What the issue found: shapes far past any ViT, refused by the layer's size limits (config.LIMITS).
    ("expanded pos_embed 8192", ("over the limit",)),  # 8192 x 8192 patches: 3.2e9 values, 12.9 GB
    ("expanded conv_weight 4096", ("over the limit",)),  # patches of 4096 x 4096 pixels: 2.4e9 values, 9.7 GB
    ("layer image_size 22400", ("over the limit",)),
    ("layer image_size 1400000", ("over the limit",)),
    ("layer.safetensors image_size 22400", ("over the limit",)),
    # Within those limits, the storage and config checks: a zero-stride tensor is never copied,
    # and a layer file's config must be its tensors'.
    ("expanded pos_embed 1024", ("pos_embed", "storage")),  # 1024 x 1024 patches from one stored value
    ("expanded conv_weight 1024", ("patch_embed.proj.weight", "storage")),
    ("layer image_size 4000", ("its config",)),
    ("layer patch_size 16", ("its config",)),
    ("layer emb_dim 32", ("its config",)),
])
@pytest.mark.slow
def test_tiny_checkpoint_cannot_force_huge_allocations(tmp_path, case, words):
    """A few KB that claim GBs (zero-stride tensors, a layer file whose config
    lies about the tensors) are refused before anything is materialised, in one line."""
    if case.startswith("expanded"):
        _, tensor, size = case.split()
        state = input_layer(d=48, p=8, grid=2)
        if tensor == "pos_embed":
            state["pos_embed"] = torch.zeros(1).expand(1, 1 + int(size) ** 2, 48)
        else:
            state["patch_embed.proj.weight"] = torch.zeros(1).expand(48, 3, int(size), int(size))
        path = tmp_path / "tiny.pt"
        torch.save(state, path)
        assert path.stat().st_size < 50_000
    else:
        name, key, value = case.split()
        path = _layer_file_claiming(tmp_path, Path(name).suffix or ".pt", **{key: int(value)})
    assert_one_line(run_limited("info", "--weights", path, timeout=60), *words)
    r = run_limited("encode", make_image(tmp_path / "x.png"), "-o", tmp_path / "z.npy", "--weights", path,
                    "--workers", "0", timeout=60)
    assert_one_line(r, *words)


@pytest.mark.slow
def test_storage_and_size_checks_let_real_layers_through(tmp_path):
    state = input_layer()
    state["pos_embed"] = state["pos_embed"].transpose(1, 2).contiguous().transpose(1, 2)  # strided, not contiguous
    torch.save(state, tmp_path / "strided.pt")
    loaded = load_weights(tmp_path / "strided.pt")
    torch.testing.assert_close(loaded.state_dict["pos_emb"], state["pos_embed"], atol=0, rtol=0)
    assert loaded.build()(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 48)
    # 10000 x 10000 patches: 19 GB of position embedding, refused before resampling.
    assert_one_line(run_limited("info", "--weights", tmp_path / "strided.pt", "--image-size", "80000"), "limit", code=2)


# --- inspect, bounded -------------------------------------------------------------------


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)  # the magic bytes, then the header
    return buffer.getvalue()


def _sparse_npy(path: Path, dtype: str, shape: tuple[int, ...]) -> Path:
    header = _npy_header(dtype, shape)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize)  # a hole: no blocks
    return path


def _zip_bomb(path: Path, values: int) -> Path:
    """A .pt of `values` float32 zeros whose storage record is deflated: a few MB that inflate to GBs.

    The deflate stream is one block of 16 MiB of zeros, flushed so that the next starts afresh,
    repeated: no need to compress gigabytes here.
    """
    chunk = bytes(16 << 20)
    nbytes = values * 4
    assert nbytes % len(chunk) == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    count = nbytes // len(chunk)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    deflated = block * count + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    records = [("archive/data.pkl", _pickle("float32", (values,)), None), ("archive/byteorder", b"little", None),
               ("archive/data/0", deflated, (crc, nbytes)), ("archive/version", b"3\n", None)]
    with open(path, "wb") as f:
        f.write(_raw_zip(records))
    return path


def _raw_zip(records) -> bytes:
    """A zip archive from (name, bytes, None | (crc, size)): None is stored, a pair is deflated data."""
    import struct

    out, central = bytearray(), bytearray()
    for name, data, deflated in records:
        method, (crc, size) = (8, deflated) if deflated else (0, (zlib.crc32(data), len(data)))
        raw = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(raw), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(out)) + raw
        out += b"PK\x03\x04" + fields + raw + data
    n = len(records)
    return bytes(out + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, len(central), len(out), 0))


def _inspect_case(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...], int]:
    """A file for `inspect`, the words of its one-line refusal, and the memory cap to run under."""
    if case == "zip-bomb.pt":  # 1.5 GB of zeros in a few MB
        return _zip_bomb(tmp_path / case, 384 << 20), ("compressed",), TORCH_MEMORY
    if case == "zero-stride.pt":  # 1.6e9 values in 1.6 KB
        torch.save(torch.zeros(1).expand(40000, 40000), tmp_path / case)
        return tmp_path / case, ("storage",), TORCH_MEMORY
    if case in ("x.npz", "x.pth"):
        if case == "x.npz":
            np.savez(tmp_path / case, a=np.zeros(3), b=np.ones(2))
        else:
            torch.save({"a": torch.zeros(3)}, tmp_path / case)
        return tmp_path / case, ("npz" if case == "x.npz" else "holds a dict",), TORCH_MEMORY
    if case == "fifo.npy":
        os.mkfifo(tmp_path / case)
        return tmp_path / case, ("not a regular file (a FIFO)",), NUMPY_MEMORY
    if case == "zero.npy":
        (tmp_path / case).symlink_to("/dev/zero")
        return tmp_path / case, ("not a regular file (a character device)",), NUMPY_MEMORY
    if case == "object.npy":
        np.save(tmp_path / case, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return tmp_path / case, ("object",), NUMPY_MEMORY
    # a header that promises 1 TiB the file does not hold
    (tmp_path / case).write_bytes(_npy_header("float32", (1 << 38,)) + bytes(64))
    return tmp_path / case, ("truncated",), NUMPY_MEMORY


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zip-bomb.pt", "zero-stride.pt", "x.npz", "x.pth", "fifo.npy", "zero.npy",
                                  "object.npy", "short.npy"])
def test_inspect_is_bounded(tmp_path, case):
    """Inspect refuses, in one line of its own words, whatever would make it
    allocate without bound, hang or crash."""
    path, words, memory = _inspect_case(tmp_path, case)
    err = assert_one_line(run_limited("inspect", path, memory=memory, timeout=60), str(path.name), *words)
    assert "allow_pickle" not in err and "weights_only" not in err


@pytest.mark.parametrize("dtype,gib", slow_but([("float16", 0.25), ("float32", 4), ("float32", 1024)], ("float32", 1024),
                                              several=True))  # a process each
def test_inspect_streams_large_sparse_npy_in_bounded_memory(tmp_path, dtype, gib):
    """A .npy of any size is read in chunks (holes of a sparse file as zeros,
    unread), within 1 GiB of address space; a few values written at the end are seen."""
    values = int(gib * GiB) // np.dtype(dtype).itemsize
    path = _sparse_npy(tmp_path / "big.npy", dtype, (values // 1024, 1024))
    with open(path, "r+b") as f:
        f.seek(-4 * np.dtype(dtype).itemsize, os.SEEK_END)
        f.write(np.array([1, -2, 3, 6], dtype=dtype).tobytes())
    r = run_limited("inspect", path, "--json", memory=NUMPY_MEMORY, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    stats = json.loads(r.stdout)
    n = values
    assert stats["shape"] == [values // 1024, 1024] and stats["dtype"] == dtype
    assert (stats["min"], stats["max"]) == (-2.0, 6.0)
    assert stats["mean"] == pytest.approx(8 / n, rel=1e-9)
    assert stats["std"] == pytest.approx(np.sqrt(50 / n - (8 / n) ** 2), rel=1e-9)


def test_inspect_statistics_equal_numpy_across_chunks(tmp_path, monkeypatch):
    from vitembed.files import stats

    monkeypatch.setattr(stats, "CHUNK", 1000)  # many chunks, one of them partial
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((37, 129)) * 3 + 1e4).astype(np.float32)  # a large mean: a naive sum of squares loses it
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    np.save(tmp_path / "be.npy", a.astype(">f4"))
    torch.save(torch.from_numpy(a).t(), tmp_path / "t.pt")  # strided
    torch.save(torch.from_numpy(a), tmp_path / "a.pth")
    torch.save(torch.from_numpy(a)[:, ::2].t(), tmp_path / "view.pt")  # a view with gaps: read block by block
    v = a.astype(np.float64)
    for name in ("a.npy", "f.npy", "be.npy", "t.pt", "a.pth", "view.pt"):
        s = stats.tensor_stats(tmp_path / name)
        w = v[:, ::2] if name == "view.pt" else v
        assert s["shape"] == list(w.T.shape if name in ("t.pt", "view.pt") else w.shape), name
        assert (s["min"], s["max"]) == (w.min(), w.max()), name
        assert s["mean"] == pytest.approx(w.mean(), rel=1e-12) and s["std"] == pytest.approx(w.std(), rel=1e-9), name
    np.save(tmp_path / "i.npy", np.arange(-5, 2500, dtype=np.int16))
    s = stats.tensor_stats(tmp_path / "i.npy")
    assert (s["min"], s["max"], s["mean"]) == (-5, 2499, pytest.approx(1247.0))
    torch.save(torch.ones(3, 2, dtype=torch.bfloat16), tmp_path / "b.pt")
    assert stats.tensor_stats(tmp_path / "b.pt") == {"shape": [3, 2], "dtype": "bfloat16", "min": 1.0, "mean": 1.0,
                                                     "std": 0.0, "max": 1.0}
    np.save(tmp_path / "e.npy", np.zeros((0, 4), np.float32))
    assert stats.tensor_stats(tmp_path / "e.npy")["mean"] is None


@pytest.mark.parametrize("name,looks", [("cat.png", "a PNG image"), ("cat.jpg", "a JPEG image"),
                                        ("notes.npy", None), ("empty.npy", "empty")])
def test_inspect_names_what_a_non_output_file_looks_like(tmp_path, name, looks):
    """Not numpy's advice about allow_pickle, but what the file is."""
    path = tmp_path / name
    if name.startswith("cat"):
        make_image(path)
    else:
        path.write_bytes(b"some notes\n" if name == "notes.npy" else b"")
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "not a .npy or .pt output" in result.output and name in result.output
    assert "pickle" not in result.output
    if looks:
        assert looks in result.output


# --- malformed weights folders ----------------------------------------------------------


PROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "size": {"height": 32, "width": 32}, "resample": 2}
CENTRE_CROP = {"do_center_crop": True, "size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}

MALFORMED = {  # name: (file, its JSON text, words of the refusal)
    "string image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": "0.5"}, "image_mean"),
    "missing image_std": ("preprocessor_config.json", {k: v for k, v in PROCESSOR.items() if k != "image_std"},
                          "image_std"),
    "crop_size.height x": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "crop_size": {"height": "x"}},
                           "crop_size"),
    "list size": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "size": [36]}, "size"),
    "1e308 image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": [1e308] * 3}, "image_mean"),
    "10**400 crop_size": ("preprocessor_config.json", {**PROCESSOR, **CENTRE_CROP, "crop_size": {"height": 10**400}},
                          "crop_size"),
    "10**400 image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [10**400] * 3}, "image_std"),
    "NaN image_mean": ("preprocessor_config.json", {**PROCESSOR, "image_mean": [0.5, float("nan"), 0.5]}, "image_mean"),
    "NaN image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [float("nan")] * 3}, "image_std"),
    "zero image_std": ("preprocessor_config.json", {**PROCESSOR, "image_std": [0.5, 0, 0.5]}, "image_std"),
    "timm crop_pct abc": ("config.json", {"pretrained_cfg": {"crop_pct": "abc"}}, "crop_pct"),
    "timm NaN std": ("config.json", {"pretrained_cfg": {"mean": [0.5] * 3, "std": [float("nan")] * 3}}, "std"),
}


@pytest.mark.parametrize("case", [*MALFORMED, "layer version abc"])
def test_malformed_weights_folder_is_one_clear_line(tmp_path, case):
    """A malformed config beside the weights is one line naming the file and the
    reason, never a traceback nor NaN tokens reported "ok"."""
    if case == "layer version abc":
        path = tmp_path / "layer.pt"
        save_layer(small_layer(), path)
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "version": "abc"}, path)
        where, words = path, "version"
    else:
        name, content, words = MALFORMED[case]
        path = tmp_path / "vit"
        save_safetensors(input_layer(), path / "model.safetensors")
        (path / name).write_text(json.dumps(content))
        where = path / name
    result = CliRunner().invoke(app, ["info", "--weights", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(where) in lines[0] and words in lines[0], result.output


def test_valid_processor_variants_still_load(tmp_path):
    folder = tmp_path / "vit"
    save_safetensors(input_layer(), folder / "model.safetensors")
    for processor, expected in (
        ({**PROCESSOR, "image_mean": 0.25, "image_std": 0.5}, {"mean": (0.25,) * 3, "std": (0.5,) * 3}),
        ({**PROCESSOR, **CENTRE_CROP}, {"resize": "crop"}),
        ({**PROCESSOR, **CENTRE_CROP, "size": 36, "crop_size": 32}, {"resize": "crop"}),
        ({**PROCESSOR, "size": [32, 32]}, {"resize": "squash"}),
        ({**PROCESSOR, "do_normalize": False}, {"mean": (0.0,) * 3, "std": (1.0,) * 3}),
    ):
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
        loaded = load_weights(folder)
        assert {k: loaded.preprocess[k] for k in expected} == expected, processor
