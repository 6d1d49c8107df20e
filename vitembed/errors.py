"""The exceptions a user of vitembed may see. Only `main.py` turns them into messages and exit codes."""

from __future__ import annotations


def one_line(exc: BaseException | None) -> str:
    """An exception's message on one line of at most 200 characters, for a user-facing reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\x1b`, `\\n`): a file name holding a
    terminal escape sequence or a newline can neither drive the terminal nor split a line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class VitembedError(Exception):
    """Base class: an expected failure, reported in one line without a traceback."""


class ConfigError(VitembedError, ValueError):
    """A layer or preprocessing option that cannot work (a usage error, exit code 2)."""


class WeightsError(VitembedError):
    """A weights file that cannot be read, is not recognised, or would run code."""


class InputError(VitembedError):
    """One input image that cannot be read or decoded; the other inputs go on."""


class OutputError(VitembedError):
    """An output that cannot be written (full disk, read-only folder): the run stops."""


class StdoutClosed(OutputError):
    """The reader of stdout went away (`vitembed encode x.png -o - | head -c 10`): end quietly."""
