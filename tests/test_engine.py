"""The numpy engine: the layer computed in the decoder processes, and the cache of random layers."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import encode_with, make_image, run_cli
from tests.layers import SMALL_CONFIGS, random_layer
from vitembed.layer.blas import blas_threads, set_blas_threads, single_blas_thread
from vitembed.layer.config import LayerConfig
from vitembed.encoder import Encoder, encode_images
from vitembed.errors import ConfigError
from vitembed.images.decode import Preprocess, load_image
from vitembed.layer.kernel import LayerParams, fingerprint
from vitembed.layer.reference import PRESETS, build_layer
from vitembed.weights.cache import cached_random_layer, random_layer_params

CONFIGS = [*SMALL_CONFIGS, PRESETS["vitbook-s14"], PRESETS["vit-b16"]]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_kernel_equals_normalise_then_forward(config, bias):
    """Kernel (patchify in HWC order, normalisation folded into E, one matmul) gives the seed
    layer's forward on normalised images, to float32 rounding."""
    layer = random_layer(config, bias)
    c, (h, w) = config.in_channels, config.size
    pixels = torch.randint(0, 256, (3, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.rand(c) * 0.8, torch.rand(c) + 0.1
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    kernel = LayerParams.from_module(layer).fold(tuple(mean.tolist()), tuple(std.tolist()))
    with torch.no_grad():
        expected = layer(x).numpy()
    got = np.stack([kernel(p) for p in pixels.numpy()])
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_kernel_equals_explicit_unfold_matmul(sample_paths):
    """Against steps (1)-(5) spelled out with torch's unfold on the normalised photo."""
    config = PRESETS["vitbook-s14"]
    layer = build_layer(config)
    prep = Preprocess()
    pixels = load_image(sample_paths[0], prep)
    kernel = LayerParams.from_module(layer).fold(prep.mean, prep.std)
    x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)
    p = config.patch_size
    patches = torch.nn.functional.unfold(x[None], kernel_size=p, stride=p)[0].T  # (N_p, C P P)
    e = layer.patch_emb_layer.weight.detach().reshape(config.emb_dim, -1).T
    z = torch.cat([layer.cls_token.detach()[0], patches @ e + layer.patch_emb_layer.bias.detach()]) + layer.pos_emb.detach()[0]
    np.testing.assert_allclose(kernel(pixels), z.numpy(), rtol=1e-5, atol=1e-4)


def test_fingerprint_same_for_numpy_and_torch():
    """run.json's fingerprint does not depend on the engine, so either one can resume a folder."""
    layer = build_layer(PRESETS["vit-ti16"], seed=3)
    assert fingerprint(LayerParams.from_module(layer).state_dict()) == fingerprint(layer.state_dict())


def _encode(images: Path, out: Path, engine: str, **options) -> list:
    return encode_with([images], out, random_layer_params(PRESETS["vit-ti16"], 0), Preprocess(), engine=engine,
                       **options)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engines_agree_end_to_end(sample_paths, tmp_path, dtype):
    images = tmp_path / "in"
    images.mkdir()
    for p in sample_paths:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    tol = dict(rtol=1e-5, atol=5e-5) if dtype == "float32" else dict(rtol=1e-3, atol=2e-3)
    runs = {}
    for engine in ("numpy", "torch"):
        summary, results = _encode(images, tmp_path / engine, engine, dtype=dtype, workers=2)
        assert (summary.ok, summary.errors) == (len(sample_paths), 1)
        runs[engine] = {r.input.name: r for r in results}
    assert runs["numpy"].keys() == runs["torch"].keys()
    for name, r in runs["numpy"].items():
        if r.status == "error":
            assert runs["torch"][name].status == "error" and "broken.jpg" == name
            continue
        a, b = np.load(r.output), np.load(runs["torch"][name].output)
        assert a.dtype == b.dtype == np.dtype(dtype) and a.shape == b.shape == (197, 192)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), **tol)
        assert r.nbytes == r.output.stat().st_size


def test_tokens_do_not_depend_on_workers_or_blas_threads(sample_paths, tmp_path):
    """One BLAS thread in every process that runs the kernel: the same bytes with 0, 1 or 2 decoders."""
    images = tmp_path / "in"
    images.mkdir()
    for p in sample_paths[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    outputs = {}
    for workers in (0, 1, 2):
        _encode(images, tmp_path / f"w{workers}", "numpy", workers=workers)
        outputs[workers] = sorted((p.name, p.read_bytes()) for p in (tmp_path / f"w{workers}").glob("*.npy"))
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 3


def test_single_blas_thread_restores_the_callers_count():
    previous = set_blas_threads(2)
    if previous is None:
        pytest.skip("numpy's BLAS is not the bundled OpenBLAS")
    try:
        with single_blas_thread():
            assert blas_threads() == 1
        assert blas_threads() == 2
    finally:
        set_blas_threads(previous)


def test_write_failure_in_a_decoder_stops_the_run(tmp_path, sample_paths):
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    summary, _ = encode_with(sample_paths, tmp_path / "blocker" / "out", build_layer(PRESETS["vit-ti16"]),
                             engine="numpy", workers=2)
    assert summary.stopped and "blocker" in summary.stopped and summary.ok == 0


def test_engine_numpy_refuses_a_gpu(tmp_path, sample_paths):
    with pytest.raises(ConfigError, match="--engine numpy runs on the CPU"):
        encode_with([sample_paths[0]], tmp_path / "out", build_layer(PRESETS["vit-ti16"]), device="cuda", engine="numpy")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="engine"):
        Encoder(build_layer(PRESETS["vit-ti16"]), engine="jax")


# --- the cache of random layers ------------------------------------------------------------


@pytest.mark.slow
def test_second_run_imports_no_torch_and_gives_the_same_bytes(tmp_path, sample_paths, no_torch_env):
    """The first run draws the random layer with torch and caches it; the second runs with a
    torch that cannot be imported, and writes the same bytes."""
    env = {"VITEMBED_CACHE_DIR": str(tmp_path / "cache")}
    first = run_cli("encode", *sample_paths[:2], "-o", tmp_path / "one", "-q", env=env)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    no_torch = {**env, **no_torch_env}
    second = run_cli("encode", *sample_paths[:2], "-o", tmp_path / "two", "-q", env=no_torch)
    assert second.returncode == 0, second.stderr
    for p in sorted((tmp_path / "one").glob("*.npy")):
        assert p.read_bytes() == (tmp_path / "two" / p.name).read_bytes()
    # run.json agrees too: the second run could resume the first one's folder.
    assert json.loads((tmp_path / "one/run.json").read_text())["config"] == json.loads((tmp_path / "two/run.json").read_text())["config"]
    resumed = run_cli("encode", *sample_paths[:2], "-o", tmp_path / "one", "-q", "--skip-existing", env=no_torch)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pt_outputs_without_torch(tmp_path, sample_paths, dtype, no_torch_env):
    """.pt files (a folder of them, or one on stdout) come from the numpy engine too, with no torch
    in the run, and load with torch.load(weights_only=True) as the torch engine's do."""
    env = {"VITEMBED_CACHE_DIR": str(tmp_path / "cache")}
    warm = run_cli("encode", sample_paths[0], "-o", tmp_path / "warm", "-q", env=env)  # caches the layer
    assert warm.returncode == 0, warm.stderr
    reference = run_cli("encode", *sample_paths[:2], "-o", tmp_path / "torch", "-q", "--format", "pt",
                        "--engine", "torch", "--dtype", dtype, env=env)
    assert reference.returncode == 0, reference.stderr
    no_torch = {**env, **no_torch_env}
    folder = run_cli("encode", *sample_paths[:2], "-o", tmp_path / "numpy", "-q", "--format", "pt",
                     "--dtype", dtype, env=no_torch)
    assert folder.returncode == 0, folder.stderr
    piped = run_cli("encode", sample_paths[0], "-o", "-", "-q", "--format", "pt", "--dtype", dtype, env=no_torch)
    assert piped.returncode == 0, piped.stderr
    outputs = sorted((tmp_path / "torch").glob("*.pt"))
    assert len(outputs) == 2
    for path in outputs:
        a = torch.load(tmp_path / "numpy" / path.name, weights_only=True)
        b = torch.load(path, weights_only=True)
        assert a.dtype == b.dtype == getattr(torch, dtype) and a.shape == b.shape == (257, 384)
        tol = dict(rtol=1e-3, atol=2e-3) if dtype == "float16" else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(a.float(), b.float(), **tol)
    streamed = torch.load(io.BytesIO(piped.stdout), weights_only=True)
    assert torch.equal(streamed, torch.load(tmp_path / "numpy" / outputs[0].name, weights_only=True))


def test_cache_is_keyed_and_checked(tmp_path, monkeypatch, sample_paths):
    monkeypatch.setenv("VITEMBED_CACHE_DIR", str(tmp_path / "cache"))
    config = PRESETS["vit-ti16"]
    assert cached_random_layer(config, 0) is None
    for seed in (0, 1):
        _encode_seed(tmp_path, sample_paths[0], seed)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    params = cached_random_layer(config, 1)
    layer = build_layer(config, 1)
    assert params is not None and fingerprint(params.state_dict()) == fingerprint(layer.state_dict())
    assert cached_random_layer(PRESETS["vit-s16"], 1) is None
    # A damaged cache file is not trusted: the layer is drawn again and the output is unchanged.
    good = (tmp_path / "out-1.npy").read_bytes()
    for f in (tmp_path / "cache").glob("*.npz"):
        f.write_bytes(f.read_bytes()[:100])
    assert cached_random_layer(config, 1) is None
    _encode_seed(tmp_path, sample_paths[0], 1)
    assert (tmp_path / "out-1.npy").read_bytes() == good


@pytest.mark.slow
def test_unwritable_cache_only_costs_time(tmp_path, sample_paths):
    (tmp_path / "cache").write_text("a file, not a folder")
    env = {"VITEMBED_CACHE_DIR": str(tmp_path / "cache")}
    result = run_cli("encode", sample_paths[0], "-o", tmp_path / "a.npy", "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


def _encode_seed(tmp_path: Path, image: Path, seed: int) -> None:
    summary, _ = encode_with([image], tmp_path / f"out-{seed}.npy", random_layer_params(PRESETS["vit-ti16"], seed),
                             workers=0)
    assert summary.ok == 1


def test_grey_images_through_the_engine(tmp_path):
    make_image(tmp_path / "g.png", size=(50, 40), seed=4)
    result = run_cli("encode", tmp_path / "g.png", "-o", tmp_path / "g.npy", "--in-channels", "1", "--preset", "vit-ti16", "-q")
    assert result.returncode == 0, result.stderr
    layer = build_layer(LayerConfig(224, 16, 192, in_channels=1))
    prep = Preprocess(channels=1)
    expected = encode_images([tmp_path / "g.png"], layer, prep)[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), expected, rtol=1e-5, atol=5e-5)


HEAP_SCRIPT = """
import resource, sys, numpy as np
from vitembed.executors.processes import keep_heap
if sys.argv[1] == "keep":
    keep_heap()
rng = np.random.default_rng(0)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):  # a decoder's allocations for one small JPEG each
    pixels = np.ones(int(rng.integers(400, 641)) * int(rng.integers(400, 641)) * 3, np.uint8)
    patches = np.ones((256, 588), np.float32)
    z = np.ones((257, 384), np.float32)
    del pixels, patches, z
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_heap tunes glibc's allocator")
def test_decoders_keep_their_heap():
    """keep_heap (decoder processes) stops glibc returning the heap's top after every image, and
    the pages being faulted in again: measured as minor page faults (here about 4x fewer)."""
    faults = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", HEAP_SCRIPT, mode], capture_output=True, text=True, check=True, timeout=60)
        faults[mode] = int(r.stdout)
    assert faults["keep"] * 2 < faults["default"], faults
