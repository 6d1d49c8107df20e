"""Shape reports: JSON lines on stdout, a manifest beside the outputs, a table and progress on stderr."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .pipeline import Result, Summary
from .writers import relative_to_target

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Reporter", "display_path", "format_bytes", "result_record", "silence_stream"]

TABLE_ROWS = 20  # rows of the final table; the rest are counted


def display_path(path: Path | str | None) -> str | None:
    """A path as text that any terminal or JSON reader can take: undecodable bytes as \\xNN."""
    if path is None:
        return None
    raw = os.fsencode(os.fspath(path))
    return raw.decode("utf-8", "backslashreplace")


def silence_stream(stream: IO) -> None:
    """Point a stream whose reader went away at /dev/null: later writes, and the interpreter's
    own flush at exit, must not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)


def result_record(result: Result, output: str | None = None) -> dict[str, Any]:
    record = {
        "input": display_path(result.input),
        "output": output if output is not None else display_path(result.output),
        "shape": list(result.shape) if result.shape else None,
        "dtype": result.dtype,
        "status": result.status,
        "error": result.error,
    }
    if result.row is not None:  # --shard-size: the input's row in the shard `output`
        record["row"] = result.row
    return record


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


class Reporter:
    """Takes each Result as it finishes and tells the user, the pipeline and the manifest.

    Args:
        json_lines: write one JSON object per input to `stdout`.
        quiet: no table, summary or progress bar (errors are still printed).
        manifest: a manifest.jsonl to append one line per input to, or None.
        target: the -o folder, to record outputs relative to it.
        stop: set when stdout's reader goes away, so that the run ends.
    """

    def __init__(
        self,
        *,
        json_lines: bool = False,
        quiet: bool = False,
        manifest: Path | None = None,
        target: Path | None = None,
        stop: threading.Event | None = None,
        stdout: IO[str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self.target = target
        self.stop = stop
        self.stdout = stdout or sys.stdout
        self._console = console  # made on first use: a quiet run without errors imports no rich
        self.rows: list[Result] = []
        self.pipe_closed = False
        self._manifest_path = manifest
        self._manifest = None  # opened with the first result: the folder is checked before that
        self._progress = None
        self._task = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
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
        progress = self._progress
        if progress is not None:
            progress.update(self._task, total=total, visible=total > 1)

    def __call__(self, result: Result) -> None:
        if result.status == "error":
            self.console.print(f"[red]error[/]: {display_path(result.input)}: {result.error}", markup=True,
                               highlight=False, soft_wrap=True)
        if len(self.rows) < TABLE_ROWS:
            self.rows.append(result)
        if self._manifest_path is not None:
            if self._manifest is None:
                self._manifest = _open_manifest(self._manifest_path)
            record = result_record(result, relative_to_target(result.output, self.target))
            try:
                self._manifest.write(json.dumps(record) + "\n")
                self._manifest.flush()
            except OSError as exc:
                from .errors import OutputError
                from .writers import describe_os_error

                raise OutputError(f"{display_path(self._manifest.name)}: {describe_os_error(exc)}") from None
        if self.json_lines and not self.pipe_closed:
            try:
                self.stdout.write(json.dumps(result_record(result)) + "\n")
                self.stdout.flush()
            except BrokenPipeError:
                self._on_pipe_closed()
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
        if self._manifest is not None:
            try:
                self._manifest.close()
            except OSError:  # a full disk: the lines that fit are whole, see _open_manifest
                pass
            self._manifest = None
        self._manifest_path = None

    def finish(self, summary: Summary) -> None:
        """Print the table and the summary (unless quiet)."""
        self.close()
        if self.quiet or self.pipe_closed or summary.pipe_closed or summary.total == 0:
            return
        if self.rows:
            from rich.table import Table

            table = Table(box=None, header_style="bold", pad_edge=False)
            for column in ("input", "output", "shape", "dtype", "status"):
                table.add_column(column, overflow="fold")
            for r in self.rows:
                shape = " x ".join(map(str, r.shape)) if r.shape else "-"
                table.add_row(display_path(r.input), display_path(r.output) or "-", shape, r.dtype or "-", r.status)
            self.console.print(table)
            if summary.total > len(self.rows):
                self.console.print(f"... and {summary.total - len(self.rows)} more")
        rate = summary.ok / summary.elapsed if summary.elapsed > 0 else 0.0
        shape = " x ".join(map(str, summary.token_shape)) if summary.token_shape else "-"
        parts = [f"{summary.ok} encoded"]
        if summary.skipped:
            parts.append(f"{summary.skipped} skipped")
        if summary.errors:
            parts.append(f"{summary.errors} failed")
        self.console.print(
            f"{', '.join(parts)}; tokens {shape}; {format_bytes(summary.bytes_written)} written; "
            f"{summary.elapsed:.2f} s, {rate:.1f} images/s on {summary.device}",
            highlight=False,
        )


def _open_manifest(path: Path) -> IO[str]:
    """Open manifest.jsonl for appending, first dropping a last line torn by a killed run."""
    from .errors import OutputError
    from .writers import describe_os_error

    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - 65536))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    f.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"{display_path(path)}: {describe_os_error(exc)}") from None
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{display_path(path)}: {describe_os_error(exc)}") from None


def read_manifest(path: Path) -> dict[str, str]:
    """Output (relative to -o DIR) -> the input it was last made from, from a manifest.jsonl.

    Unreadable lines (a torn last line) are passed over.
    """
    made: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if record.get("status") in ("ok", "skipped") and record.get("output"):
                        made[record["output"]] = record["input"]
                except (ValueError, AttributeError, TypeError):
                    continue
    except OSError:
        pass
    return made


# --- the run record of an output folder ----------------------------------------------------

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.jsonl"


def run_config(layer, loaded, prep, options, fmt: str, seed: int) -> dict[str, Any]:
    """What decides the bytes of the outputs; two runs into one folder must agree on it."""
    from .kernel import fingerprint

    prep_dict = prep.to_dict()
    prep_dict.pop("max_pixels")  # refuses files, never changes an output
    return {
        "layer": layer.config.to_dict(),
        "weights": {
            "source": loaded.source if loaded else f"random, seed {seed}",
            "fingerprint": fingerprint(layer.state_dict()),
        },
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in prep_dict.items()},
        "format": fmt,
        "dtype": options.dtype,
        # Only when set, so that folders written before shards existed still match.
        **({"shard_size": options.shard_size} if getattr(options, "shard_size", None) else {}),
    }


def prepare_output_folder(plan, layer, loaded, prep, options, seed: int, overwrite: bool = False) -> Path:
    """Check -o DIR against the configuration it was made with, record this run's; the manifest path.

    Raises:
        ConfigError: DIR holds outputs of another configuration and `overwrite` is not set.
    """
    import platform

    from . import __version__
    from .errors import ConfigError, OutputError
    from .kernel import torch_version
    from .writers import atomic_write, describe_os_error

    folder: Path = plan.target
    config = run_config(layer, loaded, prep, options, plan.fmt, seed)
    run_file = folder / RUN_FILE
    if run_file.exists() and not overwrite:
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8")).get("config", {})
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != config:
            differ = _differences(previous or {}, config)
            raise ConfigError(
                f"{folder} holds outputs made with another configuration ({'; '.join(differ) or 'unreadable run.json'}); "
                "use another -o folder, or --overwrite to re-encode into it"
            )
    record = {
        "config": config,
        "vitembed": __version__,
        "versions": {"python": platform.python_version(), "torch": torch_version()},
        "device": options.device,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            if run_file.exists():
                _remove_outputs_of_other_config(folder, run_file, config)
            (folder / MANIFEST_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{display_path(folder)}: {describe_os_error(exc)}") from None
    atomic_write(run_file, (json.dumps(record, indent=2) + "\n").encode())
    return folder / MANIFEST_FILE


def _remove_outputs_of_other_config(folder: Path, run_file: Path, config: dict) -> None:
    """--overwrite into a folder of another configuration: remove the outputs its manifest lists.

    Done before run.json changes, so that a run stopped half-way leaves the old configuration
    with fewer files (which --skip-existing completes), never old outputs under the new run.json.
    Only files the manifest names, inside the folder, with an output suffix, are removed.
    """
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == config:
        return
    root = folder.resolve()
    for rel in read_manifest(folder / MANIFEST_FILE):
        path = (folder / rel).resolve()
        if path.suffix.lower() not in (".npy", ".pt") or root not in path.parents:
            continue
        path.unlink(missing_ok=True)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out

