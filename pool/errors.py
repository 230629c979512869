"""The exception hierarchy of `pool`.

Every failure a user can cause is one of these, with a message that names the file (and the pool
entry where there is one), what was expected, what was found and what to do about it.
"""

from __future__ import annotations

import copy
import errno
import os
import shlex
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .verify_report import EntryResult

__all__ = [
    "printable",
    "brief",
    "amended",
    "PoolError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "UnreadableCheckpointError",
    "ArchitectureMismatchError",
    "ConfigError",
    "DatasetError",
    "CheckpointNotFoundError",
    "FileChangedError",
    "NotACacheError",
    "DestinationExistsError",
    "TaskVectorError",
    "DistributedError",
    "UsageError",
    "LockMismatchError",
]


def printable(text: str) -> str:
    """``text`` with its control characters shown as escapes, safe to print.

    Control characters (terminal escape sequences, carriage returns, newlines, ...) are shown as
    ``\\x1b``-style escapes, so that text taken from a file can neither drive the terminal nor
    forge lines of a report. Every `PoolError` message goes through it.

    Args:
        text: any text, typically a name or key read from a file.

    Returns:
        ``text`` itself when it is printable, else a copy with each non-printable character
        escaped.

    Example:
        >>> print(printable("name\\x1b[2J\\rforged line\\n"))
        name\\x1b[2J\\rforged line\\n
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def brief(value: object, limit: int = 120) -> str:
    """A short, safe rendering of a value read from a file, for an error message.

    Integers too large to print (or to print quickly) are described, long renderings are cut,
    nested sequences are shown three levels and eight items deep, and any other object is named
    by its type only.

    Args:
        value: the value, as a file gave it (it may be hostile: a huge integer, a long string).
        limit: the longest rendering kept, in characters (default 120).

    Returns:
        The rendering, cut to ``limit`` characters (``...`` marks the cut) and made `printable`.

    Example:
        >>> brief(1 << 100), brief([1, "a", b"b", None]), brief(object())
        ('<a 101-bit integer>', "[1, 'a', b'b', None]", '<object>')
    """
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

_UNREADABLE_HINTS = {
    errno.ELOOP: "the path is a symbolic link loop (a link that leads, directly or through other links, back "
                 "to itself) or passes through too many links; point at the file itself, or fix the link "
                 "(`ls -l {name}` shows where it leads)",
    errno.EACCES: "permission denied; make the file (and every folder above it) readable by this user, or "
                  "copy it somewhere readable",
    errno.EPERM: "the operation is not permitted; make the file readable by this user, or copy it somewhere "
                 "readable",
    errno.ENAMETOOLONG: "the path, or one name in it, is too long for the file system; move or rename the "
                        "file to a shorter path",
    errno.ENOTDIR: "a part of the path that should be a folder is a file; check the path",
    errno.EIO: "the disk reported an I/O error; check the disk, or copy the file from its source again",
}


def _os_path_text(path: object) -> str:
    """A path given as str, bytes or os.PathLike, as text for a message."""
    try:
        return os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        return str(path)


def amended(exc: E, *, prefix: str = "", **attributes: object) -> E:
    """A copy of ``exc`` with ``prefix`` put before its message and ``attributes`` set.

    The copy keeps the type, message and attributes of ``exc``: context is added to an error by
    raising a new one ``from`` it, never by changing an exception that was already raised (a
    caller may hold it). ``exc`` itself is left as it was.

    Args:
        exc: the exception caught.
        prefix: text put before the message (before ``strerror`` for an ``OSError``; as the only
            argument when the message is not a string).
        **attributes: attributes to set on the copy, e.g. ``checkpoint_globals=[...]``.

    Returns:
        The new exception, not yet raised: ``raise amended(exc, prefix="models.cars: ") from exc``.

    Example:
        >>> from pool.errors import ConfigError, amended
        >>> original = ConfigError("unknown key 'modles'")
        >>> error = amended(original, prefix="pool.yaml: ")
        >>> type(error).__name__, str(error), str(original)
        ('ConfigError', "pool.yaml: unknown key 'modles'", "unknown key 'modles'")
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
    """Base of every error raised by `pool`; its message is always terminal-safe.

    String arguments go through `printable`: file names, keys and globals in a message come from
    files.

    Args:
        *args: the message (and any further arguments), as for `Exception`.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


class CheckpointError(PoolError):
    """A checkpoint file cannot be used: base of all checkpoint problems.

    ``checkpoint_globals`` lists the globals a pickle named before reading stopped (empty when
    the error came before any unpickling); ``python -m pool inspect`` reports them.

    Args:
        *args: the message, as for `PoolError`.
        checkpoint_globals: the globals named so far (`pool.unpickler.GlobalName`; default: none).
    """

    def __init__(self, *args: object, checkpoint_globals: list | None = None) -> None:
        super().__init__(*args)
        self.checkpoint_globals: list = list(checkpoint_globals or [])


class UnsafeCheckpointError(CheckpointError):
    """The file names a global that could run code or touch the system.

    `globals` lists each offending ``module.name``; nothing from the file was executed.

    Args:
        message: what was refused and what to do.
        globals: the offending ``module.name`` strings (default: none).
        checkpoint_globals: every global the file named, as for `CheckpointError`.
    """

    def __init__(self, message: str, globals: list[str] | None = None, *,
                 checkpoint_globals: list | None = None) -> None:
        super().__init__(message, checkpoint_globals=checkpoint_globals)
        self.globals = list(globals or [])


class CorruptCheckpointError(CheckpointError):
    """Truncated, wrong magic, unreadable container or inconsistent tensor data."""


class UnreadableCheckpointError(CheckpointError, OSError):
    """The checkpoint path cannot be opened or read: a symbolic link loop, no permission, a name
    too long, an I/O error. Not a damaged download: the file may be fine, its path or access is not.

    Also an `OSError` whose ``errno`` is the system's (``errno.ELOOP``, ...), so code that caught the
    bare OSError still does. `from_os_error` builds it with a message naming the file and the fix
    (its ``strerror``; ``str()`` adds ``[Errno N]`` in front, as for any OSError).
    """

    @classmethod
    def from_os_error(cls, path: object, exc: OSError) -> UnreadableCheckpointError:
        """The error for ``exc``, raised opening or examining ``path``.

        Args:
            path: the checkpoint path, as the caller gave it.
            exc: the system's error.

        Returns:
            The error (not raised), its ``errno`` that of ``exc``.

        Example:
            >>> import errno, os
            >>> error = UnreadableCheckpointError.from_os_error("x.pt", OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
            >>> error.errno == errno.ELOOP, "symbolic link loop" in str(error)
            (True, True)
        """
        code = exc.errno
        name = _os_path_text(path)
        hint = _UNREADABLE_HINTS.get(code or 0, "check the path, its permissions and the disk, then read it again")
        message = f"{name}: cannot be opened ({exc.strerror or exc}): {hint.format(name=shlex.quote(name))}."
        return cls(code, message) if code is not None else cls(message)


class ArchitectureMismatchError(CheckpointError):
    """The weights do not fit the architecture the configuration names."""


class ConfigError(PoolError, ValueError):
    """A pool configuration is malformed or names an unknown entry."""


class DatasetError(PoolError):
    """A dataset entry cannot be loaded (unknown name, offline hub, unreadable directory)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (both a CheckpointError and a FileNotFoundError)."""


class FileChangedError(CheckpointError):
    """The file ended early while being read: it was truncated or replaced meanwhile."""


class NotACacheError(ConfigError):
    """A folder that is no conversion cache of this user's (``cache clear`` refuses to touch it)."""


class DestinationExistsError(PoolError, FileExistsError):
    """The destination exists and ``force`` was not given.

    Also raised when a destination cannot be written as asked: it is a directory, it is the
    source itself, its folder does not exist, or (`plan_tree`) the tree's root is no folder.
    Both a `PoolError` and a ``FileExistsError``.
    """


class TaskVectorError(PoolError):
    """A fine-tuned model and _pretrained_ do not line up key for key."""


class DistributedError(PoolError):
    """The ranks could not start, or stopped talking to each other (a rank died or timed out)."""


class UsageError(PoolError):
    """The command cannot run as asked: exit status 2."""


class LockMismatchError(PoolError):
    """A pool entry differs from its lock file (``verify --locked``): its file or tensors changed,
    or it is in the config but not in the lock (or in the lock but not in the config)."""


# -- internal control flow: never escape the module that raises them ---------------------------------
class ScanRefusal(Exception):
    """The pickle scanner's refusal at byte ``at`` (`pool.pickle_scan` turns it into a
    CorruptCheckpointError naming the file)."""

    def __init__(self, why: str, at: int) -> None:
        super().__init__(why)
        self.why, self.at = why, at


class ZipRefusal(Exception):
    """The zip parser's refusal (`pool.containers.zipfmt` turns it into a CorruptCheckpointError)."""


class RoleMisuse(BaseException):
    """A global used against its allowlist role, raised out of the C unpickler (see
    `pool.unpickler.Reader.unpickle`, which turns it into an UnsafeCheckpointError)."""

    def __init__(self, why: str, record: Any) -> None:
        super().__init__(why)
        self.why = why
        self.name = str(record.record_global)


class CallbackBug(BaseException):
    """Carries an exception our own callbacks raised out of the C unpickler, past the handler
    that turns the unpickler's decoding errors into CheckpointErrors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class EntryFailed(Exception):
    """A pytest item's entry did not pass; carries its `EntryResult` (``error`` becomes the message).

    Args:
        result: the failed entry's result.
    """

    def __init__(self, result: EntryResult) -> None:
        super().__init__(result.error)
        self.result = result
