"""What differs between an output folder's run.json configuration and a run's, in the command
line's words: each option that differs, its value then and now, and the flags that would match the
folder again (`folder.py` refuses the run with this).

A configuration (`request.EncodeRequest.encoder`) is the layer's shape, the weights' source and
fingerprint, the preprocessing, the format, the dtype and the options that decide the bytes; an
older folder's record reaches here already upgraded to today's form (`folder._CONFIG_READERS`),
so both sides hold every key.
Each differing key is named by its flag (`--patch-size 14 then, 16 now`); what follows from
another (the preprocessing's copy of the image size, the weights' fingerprint when their source
differs too, the layer's steps in words) is left out, and a key that no flag sets is named as it is.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["config_differences"]

_FLAGS = {
    "dtype": "--dtype", "format": "--format", "tokens": "--tokens", "pos_resample": "--pos-resample",
    "shard_size": "--shard-size", "layer.patch_size": "--patch-size", "layer.emb_dim": "--emb-dim",
    "layer.in_channels": "--in-channels", "preprocess.resize": "--resize", "preprocess.crop_pct": "--crop-pct",
    "preprocess.interpolation": "--interpolation", "preprocess.max_patches": "--max-patches",
}
# Keys that follow from others, compared through them (and "steps.*", the layer's steps in words).
_DERIVED = {"weights.fingerprint", "preprocess.image_size", "preprocess.image_width", "preprocess.channels",
            "preprocess.patch_size", "preprocess.mean", "preprocess.std", "layer.image_width"}
_RANDOM = re.compile(r"random, seed (\d+)(?:, E_pos (\w+))?$")


def config_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(each difference as "FLAG OLD then, NEW now", the flags and values that would match `old`)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    told, match = [], []

    def differ(flag: str, then: Any, now: Any, matching: str | None = None) -> None:
        told.append(f"{flag} {_text(then)} then, {_text(now)} now")
        match.append(matching if matching is not None else f"{flag} {_text(then)}")

    for key in sorted(set(flat_old) | set(flat_new)):
        then, now = flat_old.get(key), flat_new.get(key)
        if then == now or key in _DERIVED or key.startswith("steps."):
            continue
        if key in _FLAGS:
            if then is None:
                differ(_FLAGS[key], "none", now, f"no {_FLAGS[key]}")
            else:
                differ(_FLAGS[key], then, now)
        elif key == "layer.image_size":
            differ("--image-size", _size(old), _size(new))
        elif key == "weights.source":
            _weights(then, now, differ)
        elif key == "preprocess.background":
            differ("--background", ",".join(map(str, then or ())), ",".join(map(str, now or ())))
        elif key == "preprocess.fast_decode":
            differ("--fast-decode", "on" if then else "off", "on" if now else "off",
                   "--fast-decode" if then else "no --fast-decode")
        else:
            told.append(f"{key}: {then!r} then, {now!r} now")
            match.append(f"the --preset or --weights of that run ({key} {then!r})")
    _layer_size_only(flat_old, flat_new, differ)
    _normalisation(flat_old, flat_new, differ)
    if not told and flat_old.get("weights.fingerprint") != flat_new.get("weights.fingerprint"):
        told.append(f"the weights' values (same source, {flat_new.get('weights.source')}: another file's contents)")
        match.append("the weights file that run used")
    if not told:  # what differs is recorded in no option's words (the layer's steps)
        told.append("the layer's steps (see run.json)")
        match.append("the --preset or --weights of that run")
    return told, match


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def _size(config: dict) -> str:
    layer = config.get("layer") or {}
    height = layer.get("image_size")
    width = layer.get("image_width") or height  # None (schema 3) or absent: square
    return str(height) if width == height else f"{height}x{width}"


def _layer_size_only(old: dict, new: dict, differ) -> None:
    """A width alone that changed (the height kept): --image-size, as `layer.image_size` would say."""
    if old.get("layer.image_size") == new.get("layer.image_size") and \
            old.get("layer.image_width") != new.get("layer.image_width"):
        differ("--image-size", _size(_nest(old)), _size(_nest(new)))


def _nest(flat: dict) -> dict:
    return {"layer": {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layer.")}}


def _weights(then: Any, now: Any, differ) -> None:
    """Two random layers differ by --seed or --pos-init; anything else by --weights."""
    old, new = _RANDOM.match(str(then)), _RANDOM.match(str(now))
    if old and new:
        if old.group(1) != new.group(1):
            differ("--seed", old.group(1), new.group(1))
        if old.group(2) != new.group(2):
            differ("--pos-init", old.group(2) or "normal", new.group(2) or "normal")
    elif old:
        differ("--weights", "none (a random layer)", now, f"no --weights, --seed {old.group(1)}")
    else:
        differ("--weights", then, now, f"the --weights of that run ({then})")


def _normalisation(old: dict, new: dict, differ) -> None:
    """Mean and std as the --normalize name they are (or their numbers, where none is)."""
    pairs = [(old.get(f"preprocess.{k}"), new.get(f"preprocess.{k}")) for k in ("mean", "std")]
    if all(a == b for a, b in pairs):
        return
    from ..choices import NORMALIZATION_STATS

    def name(mean, std) -> str:
        stats = (tuple(mean or ()), tuple(std or ()))
        found = [n for n, (m, s) in NORMALIZATION_STATS.items() if (tuple(m), tuple(s)) == stats]
        return found[0] if found else f"(mean {list(stats[0])}, std {list(stats[1])})"

    then, now = name(pairs[0][0], pairs[1][0]), name(pairs[0][1], pairs[1][1])
    differ("--normalize", then, now, None if not then.startswith("(") else f"the normalisation of that run {then}")
