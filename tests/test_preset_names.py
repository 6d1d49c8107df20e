"""The default preset has a name of its own (the ViT book's worked example), and "seed" means only
the --seed option in help, messages and the preset list; the old name still works."""

from __future__ import annotations

import json
import re

from tests.conftest import run_cli


def test_default_preset_is_vitbook_s14_and_the_list_has_no_seed():
    from vitembed.layer.config import DEFAULT_PRESET, PRESETS

    assert DEFAULT_PRESET == "vitbook-s14" and "seed" not in PRESETS
    listed = run_cli("info", "--presets").stdout.decode().splitlines()
    assert listed[0].split()[:3] == ["vitbook-s14", "image", "224"]
    assert not any(line.split()[0] == "seed" for line in listed)
    starts = {line.index(" image ") for line in listed}
    assert len(starts) == 1  # the columns line up under the longest name


def test_old_preset_name_seed_still_gives_the_same_layer():
    old = json.loads(run_cli("info", "--preset", "seed", "--json").stdout)
    new = json.loads(run_cli("info", "--preset", "vitbook-s14", "--json").stdout)
    default = json.loads(run_cli("info", "--json").stdout)
    assert old == new == default


def test_help_uses_seed_only_for_the_seed_option():
    for command in (["encode"], ["init"], ["info"], ["show", "patches"]):
        text = run_cli(*command, "--help", env={"COLUMNS": "200"}).stdout.decode()
        for line in text.splitlines():
            words = re.findall(r"\S*seed\S*", line, re.I)
            assert not words or "--seed" in line, (command, line)


def test_run_json_that_named_the_seed_layout_still_matches():
    from vitembed.pipeline.folder import _run_config

    record = {"schema": 2, "config": {"weights": {"source": "seed VitInputLayer state dict", "fingerprint": "ab"}}}
    config = _run_config(json.dumps(record).encode())
    assert config["weights"] == {"source": "ViT book VitInputLayer state dict", "fingerprint": "ab"}
