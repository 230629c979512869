"""What every ``python -m pool`` command shares (`pool.cli`): the exit statuses, an error as one
paragraph on stderr, and paths shown relative to a common root. Light on purpose: `pool.cli`
imports it for ``--help``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import Style, paragraph

__all__ = ["PROG", "EXIT_OK", "EXIT_FOUND", "EXIT_USAGE", "EXIT_INTERRUPTED", "stderr_tty", "message", "error",
           "rel", "common_root"]

PROG = "openclip-pool"

EXIT_OK = 0  #: all good
EXIT_FOUND = 1  #: the command ran and found a problem (an entry failed, unsafe globals, a failed conversion)
EXIT_USAGE = 2  #: the command could not run as asked (usage, config, a missing input, an existing destination)
EXIT_INTERRUPTED = 130  #: Ctrl-C


def stderr_tty() -> bool:
    """Whether stderr is a terminal (a progress bar or a status line goes there only then).

    Returns:
        True for a terminal.
    """
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def message(exc: BaseException) -> str:
    """An error's message as the CLI prints it: an ``OSError``'s reason and file name.

    Args:
        exc: the error.

    Returns:
        One line of text.
    """
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
        return text
    return str(exc) or type(exc).__name__


def error(text: str, command: str | None, prog: str = PROG) -> None:
    """Print ``text`` as one error paragraph on stderr: ``<prog> <command>: error: <text>``.

    Args:
        text: the message.
        command: the command that failed (None before one was chosen).
        prog: the program name.
    """
    where = f"{prog} {command}: " if command else f"{prog}: "
    style = Style(sys.stderr)
    print(paragraph(text, prefix=where + style.bad("error: ") if style.enabled else where + "error: "),
          file=sys.stderr)


def rel(path: str | Path | None, root: Path | None) -> str:
    """``path`` relative to ``root`` where it lies under it, else as given.

    Args:
        path: a path, or None (shown as ``-``).
        root: the root (`common_root`), or None.

    Returns:
        The path as text.
    """
    if path is None:
        return "-"
    p = Path(path)
    if root is not None:
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return str(p)


def common_root(paths: Sequence[str]) -> Path | None:
    """The folder the paths share (a file's folder when they name one file).

    Args:
        paths: absolute paths.

    Returns:
        The folder, or None when there are none or they share none.
    """
    if not paths:
        return None
    try:
        common = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    except ValueError:
        return None
    if len(paths) == 1 or common.suffix in (".pt", ".safetensors") or (common.exists() and common.is_file()):
        common = common.parent
    return common

