"""Pause Python's cyclic garbage collector around allocation-heavy, cycle-free work.

Reading a pickled encoder creates tens of thousands of small objects (records, dicts, tuples);
each allocation burst can trigger a full collection that walks every object in the process (torch
and open_clip included), which made single loads 5-10x slower at random. The work wrapped here
creates no reference cycles that need collecting before it ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["paused_gc"]

_lock = threading.Lock()
_depth = 0  # blocks open, across threads
_was_enabled = False  # the collector's state when the first block opened


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; the last block to close restores it.

    Blocks nest and may overlap across threads: the last block to close (in any thread)
    restores the state the first one found. Reference counting still frees objects meanwhile.

    Yields:
        None: the body runs with the collector disabled.

    Example:
        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
