"""The progress bar of `vitembed encode` on a terminal shows the rate, in images per second."""

from __future__ import annotations

import io
import time
from pathlib import Path, PurePath

from rich.console import Console


def test_progress_bar_shows_images_per_second():
    from vitembed.images.inputs import Source
    from vitembed.pipeline.outcomes import Written
    from vitembed.pipeline.report import Reporter

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    reporter = Reporter(console=console)
    try:
        assert reporter.shows_progress
        reporter.set_total(10)
        for i in range(4):
            reporter(Written(Source(Path(f"{i}.png"), PurePath(f"{i}.png")), Path(f"{i}.npy"), (5, 4), "float32"))
            time.sleep(0.05)
        task = reporter._progress.tasks[0]
        shown = [str(column.render(task)) for column in reporter._progress.columns if hasattr(column, "render")]
    finally:
        reporter.close()
    rates = [text for text in shown if text.endswith(" images/s")]
    assert len(rates) == 1 and float(rates[0].split()[0]) > 0, shown
