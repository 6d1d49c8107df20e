"""Named weights (hf:, timm:) that are not cached, with the Hub unreachable: one line, at once
(within 3 s once the libraries are imported), never the libraries' half a minute of retries."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import run_cli


@pytest.fixture
def refused_endpoint() -> str:
    """An http address on this machine where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("spec", ["hf:google/vit-base-patch16-224", "timm:vit_base_patch16_224.augreg_in21k"])
def test_named_weights_fail_within_3_s_when_the_hub_is_unreachable(spec, refused_endpoint, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    from huggingface_hub import constants

    from vitembed.errors import WeightsError
    from vitembed.weights import pretrained

    monkeypatch.setattr(constants, "ENDPOINT", refused_endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_reached", {}, raising=False)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="is not in the Hugging Face cache and the Hub.*cannot be reached"):
        pretrained.load_pretrained(spec)
    assert time.perf_counter() - start < 3


def test_info_with_unreachable_named_weights_prints_one_line(refused_endpoint, tmp_path):
    pytest.importorskip("huggingface_hub")
    result = run_cli("info", "--weights", "hf:google/vit-base-patch16-224", timeout=120,
                     env={"HF_ENDPOINT": refused_endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": ""})
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf:google/vit-base-patch16-224: "), lines
    assert "cannot be reached" in lines[0]
