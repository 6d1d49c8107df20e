"""A URL given as an input is echoed as it was typed (two slashes), in the error line and in --json."""

from __future__ import annotations

from tests.conftest import json_lines, make_image, run_cli

URL = "https://upload.wikimedia.org/cat.jpg"


def test_url_input_is_echoed_as_given(tmp_path):
    image = make_image(tmp_path / "a.png")
    result = run_cli("encode", URL, image, "-o", tmp_path / "out", "--json", cwd=tmp_path)
    assert result.returncode == 1
    records = json_lines(result.stdout)
    assert records[0]["input"] == URL and records[0]["status"] == "error"
    assert records[1]["status"] == "ok"
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith(f"error: {URL}: a URL;"), errors
    assert "https:/upload" not in result.stderr.decode()
