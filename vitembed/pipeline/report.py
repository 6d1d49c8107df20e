"""What a run tells the user: JSON lines on stdout (`--json`); errors, progress, a table and a
summary on stderr. It only prints: the manifest is the output folder's (`folder.py`).

Text that comes from a user, a file system or another library (file names, error messages) is
printed without markup, so that a `[` in a file name is shown as it is.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Container, Iterable, Sequence
from typing import IO, TYPE_CHECKING

from ..errors import OutputError, printable
from ..files.writes import describe_os_error, silence_stream
from .outcomes import Outcome, Summary, display_path

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Reporter", "format_bytes", "print_table", "silence_stream"]

TABLE_ROWS = 20  # rows of the final table; the rest are counted


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_table(console: Console, header: Sequence[str], rows: Iterable[Sequence[str]], paths: Container[int] = ()) -> None:
    """Columns of text, one line per row, printed as they are (no markup).

    A file name is never wrapped: on a terminal, the columns numbered in `paths` are shortened
    from the left to fit its width (`…/photos/cat.png`); elsewhere (a log, a pipe) each line is
    as long as it needs to be, whole names for grep.
    """
    from rich.cells import cell_len
    from rich.text import Text

    rows = [list(header), *([printable(cell) for cell in row] for row in rows)]
    widths = [max(cell_len(cell) for cell in column) for column in zip(*rows)]
    if console.is_terminal:
        room = console.width - 2 * (len(widths) - 1)
        shortened = [i for i in range(len(widths)) if i in paths]
        while shortened and sum(widths) > room:
            widest = max(shortened, key=lambda i: widths[i])
            if widths[widest] <= _SHORTEST:
                break
            widths[widest] -= 1
    for n, row in enumerate(rows):
        cells = [_fit(cell, width) for cell, width in zip(row, widths)]
        console.print(Text("  ".join(cells).rstrip(), style="bold" if n == 0 else ""), soft_wrap=True)


_SHORTEST = 16  # a path column is not shortened below this many cells


def _fit(text: str, width: int) -> str:
    """`text` padded to `width` cells, or its end after an ellipsis if it is wider."""
    from rich.cells import cell_len

    if cell_len(text) > width:
        tail, used = [], 1
        for char in reversed(text):
            used += cell_len(char)
            if used > width:
                break
            tail.append(char)
        text = "…" + "".join(reversed(tail))
    return text + " " * (width - cell_len(text))


def _rate_column():
    """A progress column: images per second, as rich measures the bar's speed."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} images/s" if speed else "- images/s", style="progress.data.speed")

    return RateColumn()


class Reporter:
    """Takes each outcome as it finishes and tells the user.

    Args:
        json_lines: write one JSON object per input to `stdout`.
        quiet: no table, summary or progress bar (errors are still printed).
        stop: set when stdout's reader goes away, so that the run ends.
    """

    def __init__(self, *, json_lines: bool = False, quiet: bool = False, stop: threading.Event | None = None,
                 stdout: IO[str] | None = None, console: Console | None = None) -> None:
        self.json_lines, self.quiet, self.stop = json_lines, quiet, stop
        self.stdout = stdout or sys.stdout
        self._console = console  # made on first use: a quiet run without errors imports no rich
        self.rows: list[Outcome] = []
        self.pipe_closed = False
        self._progress = self._task = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), _rate_column(),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._task = self._progress.add_task("encode", total=None)
            self._progress.start()

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    @property
    def shows_progress(self) -> bool:
        return self._progress is not None

    def set_total(self, total: int) -> None:
        """The number of inputs, once known; the bar shows only while more than one is in flight."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, visible=total > 1)

    def error(self, message: str) -> None:
        """One red `error:` line on stderr; `message` is printed as it is (no markup)."""
        from rich.text import Text

        self.console.print(Text.assemble(("error", "red"), ": ", printable(message)), soft_wrap=True)

    def __call__(self, outcome: Outcome) -> None:
        if outcome.status == "error":
            self.error(f"{display_path(outcome.input)}: {outcome.error}")
        if len(self.rows) < TABLE_ROWS:
            self.rows.append(outcome)
        if self.json_lines and not self.pipe_closed:
            try:
                self.stdout.write(json.dumps(outcome.record()) + "\n")
                self.stdout.flush()
            except BrokenPipeError:
                self._on_pipe_closed()
            except OSError as exc:  # a full disk behind a redirection, say: the run stops
                silence_stream(self.stdout)
                raise OutputError(f"stdout: {describe_os_error(exc)}") from None
        if self._progress is not None:
            self._progress.advance(self._task)

    def _on_pipe_closed(self) -> None:
        self.pipe_closed = True
        silence_stream(self.stdout)
        if self.stop is not None:
            self.stop.set()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def finish(self, summary: Summary) -> None:
        """Print the table and the summary (unless quiet)."""
        self.close()
        if self.quiet or self.pipe_closed or summary.pipe_closed or summary.total == 0:
            return
        if summary.errors == summary.total:  # each failure had its error line: no table, no rate
            self.console.print(f"0 encoded, {summary.errors} failed", markup=False, soft_wrap=True)
            return
        if self.rows:
            print_table(self.console, ("input", "output", "shape", "dtype", "status"), map(self._row, self.rows),
                        paths=(0, 1))
            if summary.total > len(self.rows):
                self.console.print(f"... and {summary.total - len(self.rows)} more", markup=False, soft_wrap=True)
        rate = summary.ok / summary.elapsed if summary.elapsed > 0 else 0.0
        shape = " x ".join(map(str, summary.token_shape)) if summary.token_shape else "-"
        if summary.token_rows and summary.token_rows[0] != summary.token_rows[1]:  # --resize native
            shape = f"{summary.token_rows[0]}-{summary.token_rows[1]} x {summary.token_shape[-1]}"
        parts = [f"{summary.ok} encoded"]
        if summary.skipped:
            parts.append(f"{summary.skipped} skipped")
        if summary.errors:
            parts.append(f"{summary.errors} failed")
        layer = f"; layer {summary.layer}" if summary.layer else ""
        self.console.print(f"{', '.join(parts)}; tokens {shape}{layer}; {format_bytes(summary.bytes_written)} written; "
                           f"{summary.elapsed:.2f} s, {rate:.1f} images/s on {summary.device}", markup=False, soft_wrap=True)

    @staticmethod
    def _row(r: Outcome) -> tuple[str, ...]:
        shape = " x ".join("N" if v is None else str(v) for v in r.shape) if r.shape else "-"  # N: native rows
        return display_path(r.input), display_path(r.output) or "-", shape, r.dtype or "-", r.status
