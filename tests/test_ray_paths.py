"""Paths on Ray: the driver sends its actors absolute paths, made from its own folder, and gives
reports and the manifest the planned (relative) paths back; an actor never changes its folder."""

import os

from vitembed.executors.actors import JobActor
from vitembed.executors.rayexec import _as_planned, absolute
from vitembed.images.inputs import iter_sources
from vitembed.pipeline.outcomes import Failed, Job, Written
from vitembed.pipeline.plan import OutputPlan
from vitembed.executors.raydriver import actor_arguments
from vitembed.pipeline.request import EncodeRequest

from tests.conftest import make_image


def _jobs(names: list[str]) -> list[Job]:
    """Jobs as the driver plans them, from its folder: inputs in/NAME, -o out."""
    plan = OutputPlan.from_option("out", None)
    return [Job(source, plan.assign(source), i) for i, source in enumerate(iter_sources([f"in/{n}" for n in names]))]


def test_planned_items_go_absolute_and_outcomes_come_back_as_planned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        make_image(tmp_path / "in" / name, size=(20, 20))
    jobs = _jobs(["a.png", "b.png"])
    sent = [absolute(job, str(tmp_path)) for job in jobs]
    assert [j.source.path for j in sent] == [tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"]
    assert [j.output for j in sent] == [tmp_path / "out" / "a.npy", tmp_path / "out" / "b.npy"]
    back = _as_planned([Written(sent[1].source, sent[1].output, (5, 16), "float32"),
                        Failed(sent[0].source, "not an image", sent[0])], jobs, str(tmp_path))
    assert (back[0].source, back[0].output) == (jobs[1].source, jobs[1].output)
    assert (back[1].source, back[1].job) == (jobs[0].source, jobs[0])
    assert str(back[0].output) == os.path.join("out", "b.npy")


def test_an_actor_works_from_absolute_paths_without_changing_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    make_image(tmp_path / "in" / "a.png", size=(40, 40))
    request = EncodeRequest.from_options(output="out", image_size=32, patch_size=8, emb_dim=16, ray=True)
    encoder, _, _ = request.build_encoder("numpy", "cpu")
    plan = request.output.plan()
    arguments = actor_arguments(encoder, plan, request.run)
    assert arguments["plan"].target == tmp_path / "out"
    jobs = [absolute(job, str(tmp_path)) for job in _jobs(["a.png"])]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the actor's process starts in a folder of its own
    monkeypatch.setattr("vitembed.files.writes._cleaning", [True])  # the actor's process-wide settings,
    monkeypatch.setattr("vitembed.executors.decoder.tune_process", lambda *args: None)  # undone after
    actor = JobActor()
    actor._start(**arguments)
    outcomes = list(actor._outcomes(jobs))
    assert os.getcwd() == str(elsewhere)
    assert [type(o) for o in outcomes] == [Written] and (tmp_path / "out" / "a.npy").is_file()
    assert not (elsewhere / "out").exists()


def test_outputs_in_a_store_keep_the_store_s_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    make_image(tmp_path / "in" / "a.png", size=(20, 20))
    job = _jobs(["a.png"])[0]
    sent = absolute(job, str(tmp_path), local_outputs=False)
    assert sent.source.path == tmp_path / "in" / "a.png" and sent.output == job.output
    back = _as_planned([Written(sent.source, sent.output, (5, 16), "float32")], [job], str(tmp_path), False)
    assert back[0].source == job.source
