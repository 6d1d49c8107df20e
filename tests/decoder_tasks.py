"""A decoder task for tests/test_decoders.py, in a module of its own so that decoder processes
import it quickly: the file's name says what the task does with it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def name_of(path: Path, prep) -> str:
    """The file's name; a name with `die` kills the decoder process, `hang` never returns, `raise`
    raises."""
    if "die" in path.name:
        os._exit(1)
    if "hang" in path.name:
        time.sleep(3600)
    if "raise" in path.name:
        raise RuntimeError("broken on purpose")
    return path.name
