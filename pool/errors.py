"""The exception hierarchy of `pool`.

Every failure a user can cause is one of these, with a message that names the file (and the pool
entry where there is one), what was expected, what was found and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "printable",
    "brief",
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

    checkpoint_globals: list = []


class UnsafeCheckpointError(CheckpointError):
    """The file names a global that could run code or touch the system.

    `globals` lists each offending ``module.name``; nothing from the file was executed.
    """

    def __init__(self, message: str, globals: list[str] | None = None) -> None:
        super().__init__(message)
        self.globals = list(globals or [])


class CorruptCheckpointError(CheckpointError):
    """Truncated, wrong magic, unreadable container or inconsistent tensor data."""


class ArchitectureMismatchError(CheckpointError):
    """The weights do not fit the architecture the configuration names."""


class ConfigError(PoolError, ValueError):
    """A pool configuration is malformed or names an unknown entry."""


class DatasetError(PoolError):
    """A dataset entry cannot be loaded (unknown name, offline hub, unreadable directory)."""
