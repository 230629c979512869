"""The exception hierarchy of `pool`.

Every failure a user can cause is one of these, with a message that names the file (and the pool
entry where there is one), what was expected, what was found and what to do about it.
"""

from __future__ import annotations

import copy
from typing import TypeVar

__all__ = [
    "printable",
    "brief",
    "amended",
    "PoolError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "ArchitectureMismatchError",
    "ConfigError",
    "DatasetError",
]


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences, carriage returns, newlines,
    ...) shown as ``\\x1b``-style escapes, so that text taken from a file can neither drive the
    terminal nor forge lines of a report."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def brief(value: object, limit: int = 120) -> str:
    """A short, safe rendering of a value read from a file for a message: integers too large to
    print (or to print quickly) are described, long renderings are cut."""
    def render(item: object, depth: int) -> str:
        if isinstance(item, bool) or item is None:
            return repr(item)
        if isinstance(item, int):
            return repr(item) if item.bit_length() <= 64 else f"<a {item.bit_length()}-bit integer>"
        if isinstance(item, (tuple, list)) and depth < 3:
            inner = ", ".join(render(x, depth + 1) for x in list(item)[:8]) + (", ..." if len(item) > 8 else "")
            return f"({inner})" if isinstance(item, tuple) else f"[{inner}]"
        if isinstance(item, (str, bytes, float)):
            return repr(item[:limit] if not isinstance(item, float) else item)
        return f"<{type(item).__name__}>"
    text = render(value, 0)
    return printable(text if len(text) <= limit else text[:limit - 3] + "...")


E = TypeVar("E", bound=BaseException)


def amended(exc: E, *, prefix: str = "", **attributes: object) -> E:
    """A copy of ``exc`` (same type, message and attributes) with ``prefix`` put before its message
    and ``attributes`` set: context is added to an error by raising a new one ``from`` it, never by
    changing an exception that was already raised (a caller may hold it).

    Args:
        exc: the exception caught.
        prefix: text put before the message (before ``strerror`` for an ``OSError``).
        attributes: attributes to set on the copy, e.g. ``checkpoint_globals=[...]``.

    Returns:
        The new exception, not yet raised: ``raise amended(exc, prefix="models.cars: ") from exc``.
    """
    new = copy.copy(exc)
    if prefix:
        if isinstance(new, OSError) and new.strerror:
            new.strerror = prefix + new.strerror
        elif new.args and isinstance(new.args[0], str):
            new.args = (printable(prefix) + new.args[0], *new.args[1:])
        else:
            new.args = (printable(prefix.rstrip(": ")), *new.args)
    for name, value in attributes.items():
        setattr(new, name, value)
    return new


class PoolError(Exception):
    """Base of every error raised by `pool`. Its message is always terminal-safe (`printable`):
    file names, keys and globals in it come from files."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


class CheckpointError(PoolError):
    """A checkpoint file cannot be used: base of all checkpoint problems.

    ``checkpoint_globals`` lists the globals a pickle named before reading stopped (empty when
    the error came before any unpickling); ``python -m pool inspect`` reports them.
    """

    def __init__(self, *args: object, checkpoint_globals: list | None = None) -> None:
        super().__init__(*args)
        self.checkpoint_globals: list = list(checkpoint_globals or [])


class UnsafeCheckpointError(CheckpointError):
    """The file names a global that could run code or touch the system.

    `globals` lists each offending ``module.name``; nothing from the file was executed.
    """

    def __init__(self, message: str, globals: list[str] | None = None, *,
                 checkpoint_globals: list | None = None) -> None:
        super().__init__(message, checkpoint_globals=checkpoint_globals)
        self.globals = list(globals or [])


class CorruptCheckpointError(CheckpointError):
    """Truncated, wrong magic, unreadable container or inconsistent tensor data."""


class ArchitectureMismatchError(CheckpointError):
    """The weights do not fit the architecture the configuration names."""


class ConfigError(PoolError, ValueError):
    """A pool configuration is malformed or names an unknown entry."""


class DatasetError(PoolError):
    """A dataset entry cannot be loaded (unknown name, offline hub, unreadable directory)."""
