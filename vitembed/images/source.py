"""`Source`: one input, as `inputs` finds it (a file, a URI, a dataset's sample or row)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

__all__ = ["Source"]


@dataclass(frozen=True)
class Source:
    """One input image.

    Attributes:
        path: where to read it (a `uris.Uri` for a file that pyarrow reads; a `reads.Held`, with its
            bytes, for a tar shard's sample or a Parquet table's row).
        rel: its place under an output folder: the path relative to the folder it was found in
            (just the file name for a file named directly).
        error: set when the input is known to be bad before reading it (a missing path).
        meta: text that came with the image and goes with its tokens into outputs that carry it
            (a dataset sample's `json` / `txt` members, by extension), or None.
        strain: set by the decoder that resized it, where the resize strained the image
            ("upscaled" more than 4x, "squashed" beyond 2:1: `resolution.resize_strain`), for a note.
    """

    path: Path
    rel: PurePath
    error: str | None = None
    meta: dict[str, str] | None = None
    strain: str | None = None
