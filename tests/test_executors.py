"""The one run skeleton (`pipeline.run`) over each executor: this process (`--workers 0`), decoder
processes (`pool.OrderedPool`), Ray actors (`rayexec.RayExecutor`): the same outcomes and bytes,
an input that kills its worker isolated and reported alone, and the Ray driver's bounded windows.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import json_lines, make_image, run_cli
from vitembed.images.inputs import Source
from vitembed.pipeline.outcomes import Job, Written
from vitembed.pipeline.skeleton import Executor, outcomes, run
from vitembed.executors.pool import OrderedPool
from vitembed.executors.poolworker import DIED, TaskFailed
from vitembed.pipeline.sinks import Sink

SMALL = ["--image-size", "32", "--patch-size", "8", "--emb-dim", "16"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("executors") / "photos"
    for i in range(14):
        make_image(folder / f"img{i:02d}{'.png' if i % 2 else '.jpg'}", size=(40 + i, 30 + i), seed=i)
    (folder / "bad.png").write_bytes(b"not an image")
    return folder


def _encode(photos: Path, out: Path, *options: str) -> tuple[list, dict]:
    """(the --json lines, outputs folder-relative, sorted; every output's bytes)."""
    result = run_cli("encode", photos, "-o", out, *SMALL, "--json", "-q", "--batch-size", "4", *options)
    assert result.returncode == 1, result.stderr  # bad.png
    lines = sorted(json.dumps({**line, "output": line["output"] and os.path.relpath(line["output"], out)})
                   for line in json_lines(result.stdout))
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
             and p.name not in (".vitembed.lock", "run.json")}
    return lines, files


@pytest.mark.parametrize("shards", [[], ["--shard-size", "3"]], ids=["files", "shards"])
def test_in_process_and_decoder_processes_give_the_same_outcomes_and_bytes(photos, tmp_path, shards):
    here = _encode(photos, tmp_path / "here", "--workers", "0", *shards)
    pool = _encode(photos, tmp_path / "pool", "--workers", "2", *shards)
    assert here == pool
    assert sum('"status": "error"' in line for line in here[0]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("shards", [[], ["--shard-size", "3"]], ids=["files", "shards"])
def test_ray_actors_give_the_outcomes_and_bytes_of_a_local_run(ray_session, photos, tmp_path, shards):
    here = _encode(photos, tmp_path / "here", "--workers", "0", *shards)
    ray = _encode(photos, tmp_path / "ray", "--ray", "--ray-cpus", "0.5", "--ray-actors", "2", *shards)
    assert here == ray


def _jobs(tmp_path: Path, names: list[str]) -> list[Job]:
    return [Job(Source(tmp_path / name, Path(name)), tmp_path / "out" / f"{name}.npy", i) for i, name in enumerate(names)]


def die_on_poison(job: Job) -> str:
    """A decoder's task that kills its process on an input named "poison"."""
    if job.source.path.name == "poison":
        os._exit(9)
    return job.source.path.name


class PoisonActor:
    """A JobActor's stand-in: each window's jobs back as they came; a poison job kills the actor."""

    def run(self, arguments: list, rows: list[list]) -> tuple[str, list]:
        items = [item for row in rows for item in row]
        for item in items:
            die_on_poison(item)
        return "node", items


def test_an_input_that_kills_its_decoder_is_reported_alone(tmp_path):
    jobs = _jobs(tmp_path, ["a", "b", "poison", "c", "d"])
    with OrderedPool(die_on_poison, 2, window=8) as pool:
        pool.start(jobs)
        results = dict((job.source.path.name, value) for job, value in pool)
    assert results == {"a": "a", "b": "b", "poison": TaskFailed(DIED), "c": "c", "d": "d"}


@pytest.mark.slow
def test_an_input_that_kills_its_ray_actor_is_reported_alone(ray_session, tmp_path):
    from vitembed.pipeline.skeleton import RayOptions
    from vitembed.executors.rayexec import DIED as RAY_DIED
    from vitembed.executors.rayexec import RayExecutor

    jobs = _jobs(tmp_path, ["a", "b", "poison", "c", "d", "e", "f"])
    executor = RayExecutor({}, RayOptions(cpus=0.5, actors=2), 3, False, threading.Event(), actor_class=PoisonActor)
    try:
        executor.start(jobs)
        results = {job.source.path.name: value for job, value in executor}
    finally:
        executor.close()
    assert results == {**{job.source.path.name: job for job in jobs}, "poison": TaskFailed(RAY_DIED)}


@pytest.mark.slow
def test_the_ray_executor_reads_the_plan_a_few_windows_ahead(ray_session, tmp_path):
    from vitembed.pipeline.skeleton import RayOptions
    from vitembed.executors.rayexec import IN_FLIGHT, RayExecutor

    read = itertools.count()
    names = (f"i{next(read)}" for _ in range(100_000))
    jobs = (Job(Source(tmp_path / name, Path(name)), tmp_path / f"{name}.npy", i) for i, name in enumerate(names))
    executor = RayExecutor({}, RayOptions(cpus=0.5, actors=2), 4, False, threading.Event(), actor_class=PoisonActor)
    try:
        executor.start(jobs)
        first = list(itertools.islice(iter(executor), 8))
        held = next(read)
    finally:
        executor.close()
    assert [job.index for job, _ in first] == list(range(8))
    # windows out (IN_FLIGHT per actor), as many again done and not yet given back, one read ahead
    assert held <= 4 * (2 * IN_FLIGHT * 2 + 1) + 8


class _Scripted:
    """An executor that gives back what it is told: the skeleton's contract, without processes."""

    def __init__(self, results, killed):
        self.results, self.killed, self.closed = results, killed, False

    def start(self, items, is_task):
        self.items = list(items)

    def __iter__(self):
        return iter(self.results(self.items))

    def drain(self):
        return iter(())

    def close(self):
        self.closed = True
        return self.killed


def test_the_skeleton_counts_reports_and_cleans_up_after_any_executor(tmp_path):
    """Outcomes in any order are counted and reported once each; the temporaries in the folders
    of the jobs `close()` returns are removed, whatever the executor."""
    from vitembed.encoder import Encoder
    from vitembed.images.decode import Preprocess
    from vitembed.layer.reference import PRESETS, build_layer
    from vitembed.pipeline.plan import OutputPlan

    for i in range(3):
        make_image(tmp_path / "in" / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".vitembed-4194399-0123456789abcdef.tmp"  # a writer that is gone (above any pid)
    stale.write_bytes(b"half")
    encoder = Encoder(build_layer(PRESETS["vitbook-s14"], seed=0), Preprocess(), engine="numpy")
    backwards = lambda items: [(job, Written(job.source, job.output, (1,), "float32")) for job in reversed(items)]  # noqa: E731
    scripted: list[_Scripted] = []

    def executor(encoder, plan, options, stdout, stop) -> tuple[Executor, Sink]:
        scripted.append(_Scripted(backwards, [Job(Source(tmp_path / "in" / "p0.png", Path("p0.png")), stale, 0)]))
        return scripted[0], Sink()

    from vitembed.images.inputs import iter_sources

    seen = []
    summary = run(iter_sources([str(tmp_path / "in")]), encoder, OutputPlan.from_option(str(out), None),
                  on_result=seen.append, executor=executor)
    assert scripted[0].closed and summary.stopped is None
    assert sorted(o.source.path.name for o in seen) == ["p0.png", "p1.png", "p2.png"]
    assert summary.ok == 3
    assert not stale.exists()


def test_a_pass_through_item_is_its_own_outcome(tmp_path):
    """(item, None): an item that needed no task (a skip, a known failure) is final as it is."""
    from vitembed.pipeline.outcomes import Skipped

    skipped = Skipped(Source(tmp_path / "x.png", Path("x.png")))
    got = list(outcomes([(skipped, None)], None, Sink(), 4, threading.Event()))
    assert got == [skipped]


def test_a_ray_run_starts_no_local_decoder_server():
    """`--ray`: the actors decode; the CLI does not start the forkserver of local decoders."""
    from vitembed.cli.startup import wants_decoders

    assert wants_decoders(["photos", "-o", "out"])
    assert not wants_decoders(["photos", "-o", "out", "--ray", "--ray-actors", "2"])
