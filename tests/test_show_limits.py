"""`vitembed show positions` in bounded memory, and grids too large to draw refused with the limit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tests.conftest import run_cli
from vitembed.show.figures import position_similarity


def test_a_grid_too_large_to_draw_is_refused_with_the_limit(tmp_path):
    """8192 px at P = 8 is 1024 x 1024 patches: the whole similarity array would be 8 TiB."""
    r = run_cli("show", "positions", "--image-size", "8192", "--patch-size", "8", "--emb-dim", "16",
                "-o", tmp_path / "pos.png")
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert b"at most 64 patches a side" in r.stderr
    assert b"1024 x 1024" in r.stderr and not (tmp_path / "pos.png").exists()


def test_weights_of_a_grid_too_large_to_draw_are_refused(tmp_path):
    layer = tmp_path / "big.safetensors"
    assert run_cli("init", "--image-size", "520", "--patch-size", "8", "--emb-dim", "8", "-o", layer).returncode == 0
    r = run_cli("show", "positions", "--weights", layer, "-o", tmp_path / "pos.png")
    assert r.returncode == 2 and b"65 x 65 patches" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "pos.png").exists()


@pytest.mark.slow  # traced allocations over a 48 x 48 grid: seconds
def test_positions_memory_stays_near_the_pictures_size(tmp_path):
    """48 x 48 patches: the whole (N, N) similarity array in float64 is 42 MB and its colouring
    several times that; drawn row by row the peak stays near the picture's own 17 MB."""
    warm = run_cli("show", "positions", "--image-size", "32", "--patch-size", "8", "-o", tmp_path / "warm.png")
    assert warm.returncode == 0  # the imports, before the count
    tracemalloc.start()
    try:
        r = run_cli("show", "positions", "--image-size", "384", "--patch-size", "8", "--emb-dim", "16",
                    "-o", tmp_path / "pos.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.returncode == 0, r.stderr[-2000:]
    assert peak < 48 << 20, f"{peak / 2**20:.0f} MiB"


def test_similarity_rows_equal_the_whole_array_in_float32():
    from vitembed.show.figures import SimilarityRows

    positions = np.random.default_rng(0).normal(size=(5, 7, 24))
    rows = SimilarityRows(positions)
    whole = position_similarity(positions)
    assert rows.shape == whole.shape and len(rows) == 5
    for i in range(5):
        assert rows[i].dtype == np.float32 and rows[i].shape == (7, 5, 7)
        np.testing.assert_allclose(rows[i], whole[i], atol=1e-6)
    with pytest.raises(IndexError):
        rows[5]
