"""URIs through pyarrow (`vitembed.uris`), without Ray: the walk of a file:// folder in the local
walk's order, bounded reads of regular files only, the refusals of a local run, and `-o URI`'s
store and folder on pyarrow's in-memory filesystem, for the kinds that file:// does not exercise
(a temporary then a move; one put). Runs on Ray: tests/test_ray.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image, run_cli
from vitembed.errors import ConfigError, InputError
from vitembed.pipeline.folder import MANIFEST_FILE, RUN_FILE, UriFolder
from vitembed.files.formats import write_tensor
from vitembed.images.decode import Preprocess, load_image
from vitembed.images.inputs import iter_sources
from vitembed.pipeline.outcomes import Failed, Job, Written
from vitembed.pipeline.plan import OutputPlan, Resume, plan_jobs
from vitembed.files.uris import Store, Uri

fs = pytest.importorskip("pyarrow.fs")


@pytest.fixture
def tree(tmp_path) -> Path:
    """Images in nested folders, a text file, a FIFO among them and a link that loops."""
    root = tmp_path / "photos"
    for i, rel in enumerate(["b.png", "a.jpg", "sub/c.png", "sub/z/d.png", "a2/e.png"]):
        make_image(root / rel, seed=i)
    (root / "notes.txt").write_text("not an image")
    os.mkfifo(root / "f.jpg")
    os.symlink(root, root / "sub" / "loop")
    return root


def test_a_file_uri_folder_is_walked_as_the_local_folder(tree):
    local = [(s.rel, s.error) for s in iter_sources([str(tree)])]
    uris = list(iter_sources([f"file://{tree}"], uris=True))
    assert [(s.rel, s.error) for s in uris] == local
    assert [str(s.path) for s in uris[:2]] == [f"file://{tree}/a.jpg", f"file://{tree}/b.png"]
    assert all(isinstance(s.path, Uri) for s in uris)
    one = list(iter_sources([f"file://{tree}/sub/c.png", f"file://{tree}/missing.png"], uris=True))
    assert [(str(s.rel), s.error) for s in one] == [("c.png", None), ("missing.png", "no such file or folder")]


def test_without_ray_a_uri_is_refused_with_a_hint(tree, tmp_path):
    (source,) = iter_sources([f"file://{tree}/a.jpg"])
    assert "add --ray to read it through pyarrow" in source.error
    (source,) = iter_sources(["https://example.com/cat.jpg"], uris=True)  # no filesystem of pyarrow's
    assert "download it first (curl -O https://example.com/cat.jpg)" in source.error
    result = run_cli("encode", tree, "-o", f"file://{tmp_path}/out")
    assert result.returncode == 2 and b"a URI output is written through pyarrow on a run with --ray" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_uri_is_read_whole_within_the_byte_limit_and_only_if_regular(tree):
    prep = Preprocess(image_size=32)
    uri = Uri(f"file://{tree}/sub/c.png")
    assert np.array_equal(load_image(uri, prep), load_image(tree / "sub" / "c.png", prep))
    size = (tree / "sub" / "c.png").stat().st_size
    with pytest.raises(InputError, match=f"too large: {size} bytes, over the {size - 1}"):
        uri.fetch(size - 1)
    with pytest.raises(InputError, match="not a regular file"):
        Uri(f"file://{tree}/f.jpg").fetch(1 << 20)  # a FIFO: never opened, so never blocks
    with pytest.raises(InputError, match="no such file"):
        Uri(f"file://{tree}/gone.png").fetch(1 << 20)


def _npy(shape=(5, 4)) -> bytes:
    import io

    buffer = io.BytesIO()
    write_tensor(buffer, np.ones(shape, np.float32), "npy")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["rename", "put"])
def test_a_store_writes_whole_files_and_lists_them(kind):
    mock = fs._MockFileSystem()
    mock.create_dir("bucket/out/sub", recursive=True)  # an object store needs no folders; the mock does
    store = Store("mock://bucket/out", mock, "bucket/out", kind)
    assert store.write("bucket/out/sub/a.npy", lambda f: f.write(_npy())) == len(_npy())
    store.write("bucket/out/sub/a.npy", _npy((2, 3)))  # replaced whole
    assert store.read("bucket/out/sub/a.npy", 1 << 20) == _npy((2, 3))
    assert store.header("bucket/out/sub/a.npy") == ((2, 3), "float32")
    assert store.read("bucket/out/none.npy", 10) is None
    assert sorted(store.files()) == ["bucket/out/sub/a.npy"]  # no temporary left
    plan = OutputPlan("dir", "npy", Path("bucket/out"), store)
    assert plan.exists(Path("bucket/out/sub/a.npy")) and not plan.exists(Path("bucket/out/b.npy"))
    with mock.open_output_stream("bucket/out/sub/.vitembed-1-00ff.tmp") as f:  # a killed writer's
        f.write(b"torn")
    assert store.clean("bucket/out/sub") == (1 if kind == "rename" else 0)


def test_a_uri_folder_keeps_run_json_and_the_manifest(tmp_path):
    mock = fs._MockFileSystem()
    mock.create_dir("bucket/out", recursive=True)
    store = Store("mock://bucket/out", mock, "bucket/out", "put")
    plan = OutputPlan("dir", "npy", Path("bucket/out"), store)
    source = next(iter_sources([str(make_image(tmp_path / "cat.png"))]))
    job = Job(source, plan.assign(source))

    def run(config: dict, overwrite: bool = False) -> UriFolder:
        folder = UriFolder(store, config, {"config": config}, plan.relative, overwrite=overwrite)
        store.write(job.output, _npy())
        folder.record(Written(source, job.output, (5, 4), "float32", 0))
        folder.close()
        return folder

    run({"dtype": "float32"})
    assert json.loads(store.read(f"bucket/out/{RUN_FILE}", 1 << 20))["config"] == {"dtype": "float32"}
    again = run({"dtype": "float32"})
    assert again.made_from == {"cat.npy": str(source.path)}
    lines = store.read(f"bucket/out/{MANIFEST_FILE}", 1 << 20).decode().splitlines()
    assert [json.loads(line)["output"] for line in lines] == ["cat.npy", "cat.npy"]  # earlier lines kept
    resume = Resume(skip_existing=True, shape=(5, 4), dtype="float32", made_from=again.made_from)
    fresh = OutputPlan("dir", "npy", Path("bucket/out"), store)
    assert [type(item).__name__ for item in plan_jobs([source], fresh, resume)] == ["Skipped"]
    with pytest.raises(ConfigError, match="holds outputs made with another configuration .*dtype"):
        UriFolder(store, {"dtype": "float16"}, {}, plan.relative)
    replaced = UriFolder(store, {"dtype": "float16"}, {"config": {"dtype": "float16"}}, plan.relative, overwrite=True)
    assert replaced.made_from == {} and store.read("bucket/out/cat.npy", 1 << 20) is None  # the old output, removed
    replaced.record(Failed(source, "bad"))
    replaced.close()  # no output yet: run.json stays the old one until the first, and no manifest is written
    assert json.loads(store.read(f"bucket/out/{RUN_FILE}", 1 << 20))["config"] == {"dtype": "float32"}


def test_a_uri_output_needs_pyarrow_to_know_it():
    with pytest.raises(ConfigError, match="-o nosuch://x/y: pyarrow cannot open it"):
        OutputPlan.from_option("nosuch://x/y", None)
