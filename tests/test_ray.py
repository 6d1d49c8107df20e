"""`vitembed encode --ray` and `vitembed.ray` on a local Ray (2 CPUs): the same bytes as a local run,
faults (a bad image, a killed actor, an input that kills its actor, Ctrl-C then --skip-existing),
a real two-node cluster, and the Python API's Parquet round trip.

One Ray instance serves the whole session (`ray_session`, in conftest.py); the CLI runs in this process with it, or
joins it from a subprocess with --ray-address. Actors take half a CPU each, so that two of them
and Ray's own tasks never wait on each other on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import json_lines, make_image, read_manifest, run_cli

pytestmark = pytest.mark.slow  # a Ray cluster, actors that start in seconds

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]
ACTORS = ["--ray-cpus", "0.5", "--ray-actors", "2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Small images of several formats and modes, in a tree, and one file that is not an image."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    for i in range(24):
        suffix, mode = [(".png", "RGB"), (".jpg", "RGB"), (".png", "L"), (".png", "RGBA")][i % 4]
        make_image(folder / ("sub" if i % 5 == 0 else "") / f"img{i:02d}{suffix}", size=(40 + i, 30 + 2 * i),
                   mode=mode, seed=i)
    (folder / "bad.jpg").write_bytes(b"<html>not an image</html>")
    return folder


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """600 photo-sized JPEGs: a run of the default layer long enough to be stopped half-way."""
    folder = tmp_path_factory.mktemp("ray-many") / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for i in range(600):
        Image.fromarray(np.roll(tile, 7 * i, axis=1)).save(folder / f"m{i:04d}.jpg", quality=85)
    return folder


def assert_same_folder(local: Path, ray: Path, inputs: str = "") -> None:
    """Every output byte for byte, the same manifest lines, the same run.json configuration.
    `inputs`: the URI of the folder whose local path the local run's manifest names."""
    skip = {".vitembed.lock", "run.json", "manifest.jsonl"}
    names = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file() and p.name not in skip)
    assert names == sorted(p.relative_to(ray) for p in ray.rglob("*") if p.is_file() and p.name not in skip)
    for name in names:
        assert (local / name).read_bytes() == (ray / name).read_bytes(), name
    manifest = lambda folder: sorted(map(json.dumps, read_manifest(folder)))  # noqa: E731
    prefix = inputs.removeprefix("file://")
    local_lines = [line.replace(prefix, inputs) for line in manifest(local)] if inputs else manifest(local)
    assert sorted(local_lines) == manifest(ray)
    config = lambda folder: json.loads((folder / "run.json").read_text())["config"]  # noqa: E731
    assert config(local) == config(ray)


@pytest.mark.parametrize("options", [[], ["--format", "pt"], ["--shard-size", "5"], ["--format", "pt", "--dtype", "bf16"],
                                     ["--preset", "vit-ti16", "--dtype", "fp16"], ["--tokens", "patches"],
                                     ["--preset", "clip-b32", "--tokens", "z0-before-norm"]],
                         ids=["npy", "pt", "shards", "pt-bf16", "preset-fp16", "tokens-patches", "clip-before-norm"])
def test_same_bytes_as_a_local_run(ray_session, photos, tmp_path, options):
    layer = [] if "--preset" in options else SMALL
    local = run_cli("encode", photos, "-o", tmp_path / "local", *layer, *options, "-q")
    ray = run_cli("encode", photos, "-o", tmp_path / "ray", *layer, *options, "-q", "--ray", *ACTORS)
    assert (local.returncode, ray.returncode) == (1, 1), ray.stderr  # bad.jpg
    assert_same_folder(tmp_path / "local", tmp_path / "ray")


@pytest.mark.parametrize("options", [[], ["--shard-size", "5"], ["--format", "pt"]], ids=["npy", "shards", "pt"])
def test_file_uris_in_and_out_give_a_local_run_s_bytes(ray_session, photos, tmp_path, options):
    """Inputs listed and read, outputs written, through pyarrow's filesystem of file:// URIs."""
    local = run_cli("encode", photos, "-o", tmp_path / "local", *SMALL, *options, "-q")
    uri = [f"file://{photos}", "-o", f"file://{tmp_path}/uri", *SMALL, *options, "--ray", *ACTORS]
    ray = run_cli("encode", *uri, "--json")
    assert (local.returncode, ray.returncode) == (1, 1), ray.stderr  # bad.jpg
    bad = [line for line in json_lines(ray.stdout) if line["status"] == "error"]
    assert [line["input"] for line in bad] == [f"file://{photos}/bad.jpg"] and "not an image" in bad[0]["error"]
    assert_same_folder(tmp_path / "local", tmp_path / "uri", inputs=f"file://{photos}")
    # Resumed: run.json, the manifest and the outputs read back; skipped as locally (with shards,
    # the shard of the bad image is made again).
    resumed = run_cli("encode", *uri, "--json", "--skip-existing")
    local = run_cli("encode", photos, "-o", tmp_path / "local", *SMALL, *options, "--json", "--skip-existing")
    statuses = lambda result: sorted(line["status"] for line in json_lines(result.stdout))  # noqa: E731
    assert "skipped" in statuses(resumed) and statuses(resumed) == statuses(local), resumed.stderr
    assert not list((tmp_path / "uri").rglob(".*.tmp"))


def test_a_uri_input_needs_an_output_folder(photos, tmp_path):
    pytest.importorskip("ray.data")
    result = run_cli("encode", f"file://{photos}", "--ray", cwd=tmp_path)
    assert result.returncode == 2 and b"the tokens of a URI input are not written beside it" in result.stderr


def test_bad_image_is_a_row_of_the_manifest_and_stdout_carries_only_json(ray_session, photos, tmp_path):
    result = run_cli("encode", photos, "-o", tmp_path / "out", *SMALL, "--json", "--ray", *ACTORS)
    assert result.returncode == 1
    lines = json_lines(result.stdout)  # every line of stdout is a JSON object: nothing of Ray's
    assert len(lines) == 25 and len(result.stdout.splitlines()) == 25
    bad = [line for line in lines if line["status"] == "error"]
    assert [b["input"] for b in bad] == [str(photos / "bad.jpg")] and "not an image" in bad[0]["error"]
    assert b"bad.jpg: not an image" in result.stderr
    assert b"on Ray: 1 node, 2 actors, cpu" in result.stderr
    record = {r["input"]: r for r in read_manifest(tmp_path / "out")}[str(photos / "bad.jpg")]
    assert record["status"] == "error" and record["output"] is None


@pytest.mark.parametrize("args, reason", [
    (["-o", "-"], "-o - writes one tensor"),
    (["-o", "one.npy"], "-o FILE is one input's file"),
    (["-o", "out/", "--workers", "2"], "--workers sets this machine's decoder processes"),
    (["-o", "out/", "--decode-timeout", "5"], "--decode-timeout is not enforced on Ray"),
    (["-o", "out/", "--decode", "gpu"], "--decode gpu has not run on Ray"),
    (["-o", "out/", "--device", "cpu"], "the actors' device follows --ray-gpus"),
    (["-o", "out/", "--engine", "numpy", "--ray-gpus", "1"], "--engine numpy runs on the CPU"),
])
def test_what_a_cluster_cannot_do_is_refused(photos, tmp_path, args, reason):
    pytest.importorskip("ray.data")
    result = run_cli("encode", photos, *args, "--ray", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert reason in " ".join(result.stderr.decode().split())
    assert not (tmp_path / "out").exists()


def test_ray_options_without_ray_are_refused(photos, tmp_path):
    result = run_cli("encode", photos, "-o", tmp_path / "out", "--ray-gpus", "1")
    assert result.returncode == 2 and b"--ray-gpus applies to a run on Ray: add --ray" in result.stderr


def test_without_ray_installed_one_line_says_what_to_install(photos, tmp_path):
    fake = tmp_path / "fake-ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    result = run_cli("encode", photos, "-o", tmp_path / "out", "--ray",
                     env={"PYTHONPATH": os.pathsep.join([str(fake), *sys.path])})
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "error: --ray needs Ray Data: pip install 'vitembed[ray]' (or pip install 'ray[data]')"]


def _actor_pids() -> list[int]:
    """Processes of JobActors (their title is Ray's `ray::JobActor...`)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"JobActor" in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _when_outputs(folder: Path, count: int, action, timeout: float = 120) -> threading.Thread:
    """A thread that calls `action()` once `folder` holds `count` .npy files."""
    def wait() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and sum(1 for _ in folder.glob("*.npy")) < count:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_an_actor_killed_mid_run_is_replaced_and_the_run_completes(ray_session, many, tmp_path):
    killed: list[int] = []

    def kill_one() -> None:
        pids = _actor_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = _when_outputs(tmp_path / "ray", 20, kill_one)
    ray = run_cli("encode", many, "-o", tmp_path / "ray", "-q", "--ray", *ACTORS)
    killer.join()
    assert killed and ray.returncode == 0, ray.stderr
    assert len(list((tmp_path / "ray").glob("*.npy"))) == 600
    assert not list((tmp_path / "ray").glob(".*.tmp"))  # the killed actor's temporary, removed
    assert run_cli("encode", many, "-o", tmp_path / "local", "-q").returncode == 0
    assert_same_folder(tmp_path / "local", tmp_path / "ray")


def test_ctrl_c_leaves_whole_files_and_skip_existing_finishes(ray_session, address, many, tmp_path):
    out = tmp_path / "ray"
    driver = subprocess.Popen([sys.executable, "-m", "vitembed", "encode", str(many), "-o", str(out), "-q", "--ray",
                               "--ray-address", address, *ACTORS], stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _when_outputs(out, 20, lambda: driver.send_signal(signal.SIGINT)).join()
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    assert b"--skip-existing to resume" in stderr
    written = list(out.glob("*.npy"))
    assert 20 <= len(written) < 600
    for path in written:  # whole files only
        assert np.load(path).shape == (257, 384)
    resumed = run_cli("encode", many, "-o", out, "-q", "--skip-existing", "--json", "--ray", *ACTORS)
    assert resumed.returncode == 0, resumed.stderr
    assert {line["status"] for line in json_lines(resumed.stdout)} == {"ok", "skipped"}
    run_cli("encode", many, "-o", tmp_path / "local", "-q")
    assert not list(out.glob(".*.tmp"))
    written = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    assert written == {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.npy")}




def test_joining_a_cluster_keeps_the_process_s_sigterm_handler(ray_session, address):
    """ray.init gives a driver Ray's SIGTERM handler (sys.exit(15) wherever the run is); the
    CLI's own (stop cleanly, exit 143, whole files only) must stay. A process of its own: this
    one holds the test session's Ray."""
    check = ("import signal\n"
             "from vitembed.pipeline.skeleton import RayOptions\n"
             "from vitembed.executors.raydriver import _connected\n"
             "mine = lambda signum, frame: None\n"
             "signal.signal(signal.SIGTERM, mine)\n"
             f"with _connected(RayOptions(address={address!r})):\n"
             "    assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

POISON = """\
import os
from PIL import Image, ImageFile


class _Poison(ImageFile.ImageFile):  # a "decoder" that kills its process, as a crashing codec would
    format = "POISON"

    def _open(self):
        os._exit(9)


Image.register_open("POISON", _Poison, lambda prefix: prefix[:6] == b"POISON")
"""


def test_an_input_that_kills_its_actor_is_reported_alone(photos, tmp_path):
    """Its own local cluster, whose workers load a Pillow plugin that dies on b"POISON" files."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(POISON)
    corpus = tmp_path / "photos"
    corpus.mkdir()
    for path in sorted(photos.glob("*.png"))[:5]:
        (corpus / path.name).write_bytes(path.read_bytes())
    (corpus / "img99.png").write_bytes(b"POISON, as a crashing decoder would be")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), *sys.path])
    result = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(corpus), "-o", str(tmp_path / "out"),
                             *SMALL, "--json", "--ray", "--batch-size", "4", *ACTORS],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = {Path(line["input"]).name: line for line in json_lines(result.stdout)}
    assert sorted(name for name, line in lines.items() if line["status"] == "ok") == [
        p.name for p in sorted(corpus.glob("img0*.png"))]
    assert "its Ray actor died each time it was given this input" in lines["img99.png"]["error"]


def test_a_two_node_cluster_runs_tasks_on_both_nodes(ray_session, photos, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 256 * 2**20,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=256 * 2**20)
        # Two 1-CPU nodes, two 1-CPU actors: one on each. Wait for both before the first task.
        env = {**os.environ, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, "-m", "vitembed", "encode", str(photos), "-o", str(tmp_path / "ray"),
                                 *SMALL, "--batch-size", "2", "--ray", "--ray-address", cluster.address,
                                 "--ray-actors", "2"], capture_output=True, env=env, timeout=300)
    finally:
        cluster.shutdown()
    assert result.returncode == 1, result.stderr  # bad.jpg
    assert b"on Ray: 2 nodes, 2 actors, cpu" in result.stderr
    run_cli("encode", photos, "-o", tmp_path / "local", *SMALL, "-q")
    assert_same_folder(tmp_path / "local", tmp_path / "ray")


def test_python_api_tokens_column_round_trips_through_parquet(ray_session, photos, tmp_path):
    import pyarrow.parquet as pq

    import vitembed.ray
    from vitembed.files.ptformat import bfloat16_bits

    run_cli("encode", photos, "-o", tmp_path / "local", *SMALL, "-q")
    small = dict(image_size=32, patch_size=8, emb_dim=16)
    ds = ray_session.data.read_binary_files(str(photos), include_paths=True)
    vitembed.ray.encode(ds, **small, actors=2, num_cpus=0.5).write_parquet(str(tmp_path / "parquet"))
    table = pq.read_table(tmp_path / "parquet")  # plain pyarrow: a canonical fixed-shape tensor column
    assert table.column_names == ["path", "tokens", "error"]
    tokens = table["tokens"].combine_chunks().to_numpy_ndarray()
    assert tokens.shape == (25, 17, 16) and tokens.dtype == np.float32
    for path, z, error in zip(table["path"].to_pylist(), tokens, table["error"].to_pylist()):
        if path.endswith("bad.jpg"):
            assert "not an image" in error and np.isnan(z).all()
            continue
        local = tmp_path / "local" / Path(path).relative_to(photos).with_suffix(".npy")
        assert error is None and z.tobytes() == np.load(local).tobytes()

    # The same class straight in map_batches, over paths, in bfloat16: the tokens' bits as uint16.
    paths = ray_session.data.from_items([{"path": str(p)} for p in sorted(photos.rglob("img0*"))])
    rows = paths.map_batches(vitembed.ray.TokenEncoder, fn_constructor_kwargs=vitembed.ray.encoder_args(
        **small, dtype="bf16"), batch_format="pyarrow", batch_size=4,
        compute=ray_session.data.ActorPoolStrategy(size=1), num_cpus=0.5).take_all()
    for row in rows:
        local = tmp_path / "local" / Path(row["path"]).relative_to(photos).with_suffix(".npy")
        assert row["tokens"].dtype == np.uint16 and np.array_equal(row["tokens"], bfloat16_bits(np.load(local)))
