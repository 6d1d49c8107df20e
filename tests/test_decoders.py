"""The decoder pool sends images in chunks, and a chunk that fails costs only its bad image."""

from __future__ import annotations

import threading
from pathlib import Path, PurePath

import pytest

from tests import decoder_tasks
from vitembed.decoders import _CHUNK_SECONDS, Decoder, Job
from vitembed.images import Preprocess
from vitembed.inputs import Source

DIED = "the decoder process died while reading this file"


@pytest.fixture
def tasks(monkeypatch):
    """Decoders run `decoder_tasks.name_of`; returns the list of chunks submitted (their sizes)."""
    submitted: list[int] = []
    submit = Decoder._submit

    def counting_submit(self, jobs):
        submitted.append(len(jobs))
        return submit(self, jobs)

    monkeypatch.setattr(Decoder, "_task", lambda self, job: (decoder_tasks.name_of, (job.source.path, self.prep)))
    monkeypatch.setattr(Decoder, "_submit", counting_submit)
    return submitted


def _items(names: list[str]) -> list[Job | str]:
    """Jobs for file names; a name starting with `pass` stays a plain item, which the decoder
    passes through in its place (as the pipeline's skipped inputs)."""
    return [name if name.startswith("pass") else Job(Source(Path(name), PurePath(name)), None, i)
            for i, name in enumerate(names)]


def _decode(names: list[str], chunk: int = 1, timeout: float | None = None, window: int = 24) -> tuple[list, Decoder]:
    decoder = Decoder(Preprocess(), 2, window=window, stop=threading.Event(), timeout=timeout)
    decoder.chunk = chunk
    decoder.start(_items(names))
    try:
        out = [(item if isinstance(item, str) else item.source.path.name, value) for item, value in decoder]
    finally:
        decoder.close()
    return out, decoder


def test_chunks_grow_and_keep_input_order(tasks):
    names = [f"img{i:03d}" for i in range(200)]
    names[7:7] = ["pass-a"]
    names[120:120] = ["pass-b", "pass-c"]
    out, decoder = _decode(names)
    assert out == [(n, None) if n.startswith("pass") else (n, n) for n in names]
    # The first window goes out an image at a time; once a chunk has been timed (these take
    # microseconds), chunks are as large as the window allows: 24 // (3 * 2 decoders).
    assert decoder.max_chunk == 4 and decoder.chunk == 4
    assert max(tasks) == 4 and len(tasks) < 24 + (200 - 24) // 3


def test_chunk_size_follows_the_time_per_image():
    decoder = Decoder(Preprocess(), 2, window=96, stop=threading.Event())
    assert decoder.chunk == 1 and decoder.max_chunk == 16
    decoder._learn(8 * _CHUNK_SECONDS / 4, 8)  # a quarter of the target per image
    assert decoder.chunk == 4
    decoder._learn(_CHUNK_SECONDS / 100, 1)  # a moving average: one fast image moves it a little
    assert decoder.chunk == 4
    for _ in range(20):
        decoder._learn(_CHUNK_SECONDS / 100, 1)
    assert decoder.chunk == 16  # capped by the window
    for _ in range(20):
        decoder._learn(3 * _CHUNK_SECONDS, 1)  # slow images: one per task
    assert decoder.chunk == 1


def test_a_decoder_dying_in_a_chunk_costs_only_its_image(tasks):
    names = [f"img{i:02d}" for i in range(12)]
    names[5] = "die05"
    out, _ = _decode(names, chunk=4)
    assert out == [(n, DIED if n == "die05" else n) for n in names]
    assert tasks[0] == 4  # it was sent in a chunk, and the chunk's images retried alone


def test_an_exception_fails_only_its_image(tasks):
    names = ["a", "b", "raise-c", "d", "e"]
    out, _ = _decode(names, chunk=4)
    assert out == [(n, "the decoder failed: RuntimeError: broken on purpose" if n == "raise-c" else n) for n in names]


def test_a_hang_in_a_chunk_times_out_alone(tasks):
    names = ["a", "b", "hang-c", "d", "e", "f"]
    out, _ = _decode(names, chunk=4, timeout=1.0)
    assert out == [(n, "decoding took longer than 1 s; the decoder was stopped" if n == "hang-c" else n) for n in names]
