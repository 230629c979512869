"""The message for a checkpoint path that does not exist: short, and pointed at the likely fix.

Relative paths in a pool config resolve against the working directory (as the published configs
expect), so a config run from another folder names files that are not there. The message says
what was tried, which part of the path is missing and, when the path exists relative to the folder
of a pool config file read in this process, says so and how to fix it. It lists a folder's
contents only when that folder is where the file was expected (a misspelt file name), never the
unrelated contents of the working directory or of the file system's root.

`note_config_file` is called by the config reader for every pool config file it reads; the
folders it records serve hints only, never the resolution of a path. `note_explained` records the
message for a path that stands for something absent (a hub id missing from the local Hugging Face
cache: `pool.entries.Entry.path`), so that every reader of the entry fails with that message.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["note_config_file", "note_explained", "missing_message"]

#: How many config files are remembered for hints (the newest first).
_REMEMBERED = 8
_CONFIG_FILES: list[Path] = []
#: How many names of the folder where the file was expected are listed.
_LISTED = 10
#: Messages of paths that stand for something absent, by absolute path (`note_explained`).
_EXPLAINED: dict[Path, str] = {}


def note_config_file(path: str | os.PathLike[str]) -> None:
    """Remember a pool config file, so that a relative path missing from the working directory
    but present beside the config is reported as such (a hint; paths still resolve against the
    working directory).

    Args:
        path: the pool config file that was read.
    """
    config = Path(os.path.abspath(Path(path).expanduser()))  # '..' folded: the hint names a plain folder
    if config in _CONFIG_FILES:
        _CONFIG_FILES.remove(config)
    _CONFIG_FILES.insert(0, config)
    del _CONFIG_FILES[_REMEMBERED:]


def note_explained(path: str | os.PathLike[str], message: str) -> None:
    """Remember why ``path`` is not there: `missing_message` returns ``message`` for it.

    Args:
        path: the path a reader will be given (a hub entry's placeholder in the cache).
        message: the whole not-found message (what is missing, where it was looked for, the fix).
    """
    _EXPLAINED[Path(os.path.abspath(Path(path)))] = message


def _nearest_existing(absolute: Path) -> Path:
    """The deepest folder of ``absolute`` that exists."""
    parent = absolute.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    return parent


def _config_hint(p: Path) -> str:
    """For a relative ``p``: where it exists beside a remembered config file, and the fix."""
    if p.is_absolute():
        return ""
    for config in _CONFIG_FILES:
        candidate = config.parent / p
        if candidate.exists():
            return (f" It exists relative to the folder of the pool config {config.name}, {config.parent}; "
                    "relative paths resolve against the working directory, not the config's folder: run "
                    "from that folder, or make the path absolute.")
    return ""


def _listing(parent: Path, absolute: Path) -> str:
    """What ``parent`` holds, when it is the folder the file was expected in or below (not the
    working directory or one of its ancestors, whose contents are unrelated to the path)."""
    unrelated = parent == Path.cwd() or parent in Path.cwd().parents
    if unrelated and parent != absolute.parent:
        return ""
    try:
        names = sorted(x.name + ("/" if x.is_dir() else "") for x in parent.iterdir())
    except OSError:
        return ""
    shown = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    return f" It holds: {shown or 'nothing'}."


def missing_message(path: str | os.PathLike[str]) -> str:
    """The message for a checkpoint path that does not exist.

    Args:
        path: the path as given (relative paths resolve against the working directory).

    Returns:
        ``checkpoint not found: ABSOLUTE.``, the deepest existing folder and the first missing
        name, that folder's contents when the file was expected there or below (a misspelt name),
        and, for a relative path that exists beside a pool config file read in this process, that
        place and the fix; for a path noted by `note_explained`, the message noted.

    Example:
        >>> missing_message("/nonexistent-root/zeroshot.pt")
        'checkpoint not found: /nonexistent-root/zeroshot.pt. / has no nonexistent-root.'
    """
    p = Path(path)
    absolute = p.absolute()
    explained = _EXPLAINED.get(Path(os.path.abspath(absolute)))
    if explained is not None:
        return explained
    parent = _nearest_existing(absolute)
    missing = absolute.relative_to(parent).parts[0]
    text = f"checkpoint not found: {absolute}. {parent} has no {missing}."
    hint = _config_hint(p)
    if hint:
        return text + hint
    text += _listing(parent, absolute)
    if not p.is_absolute():
        text += f" Relative paths resolve against the working directory, {Path.cwd()}."
    return text
