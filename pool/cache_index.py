"""The conversion cache's lookup (`pool.cache`): its folder checked, an index read and matched
against the file opened, an entry read back as untrusted input."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import cache_layout as layout
from .cache_format import checkpoint_from
from .containers import by_name
from .containers.base import Checkpoint, ReadOptions
from .errors import CheckpointError
from .transfer import OpenFile

__all__ = ["CacheIndex"]

log = logging.getLogger("pool.cache")  # one logger for the whole cache, as --debug shows it and users filter it


class CacheIndex:
    """The cache in ``root/v1``, as lookups see it; `pool.cache.CheckpointCache` adds writing
    (`pool.cache_store`), listing and clearing (`pool.cache_listing`).

    Args:
        root: the cache directory; ``root/v1`` is created (mode 0700) on the first write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root / layout.LAYOUT

    def _usable(self) -> bool:
        """Whether ``v1`` exists and is safe to serve from (see `_check_folder`)."""
        return self._check_folder()

    def _check_folder(self) -> bool:
        """Whether ``v1`` exists; OSError (logged by the caller) when it exists but is a link, no
        directory, not this user's alone, or sits in a folder others could swap it in."""
        try:
            info = os.lstat(self.folder)
        except FileNotFoundError:
            return False
        layout.check_private(self.folder, info)
        layout.check_above(self.folder)
        return True

    def _lookup(self, index: dict[str, Any], source: Path, file: OpenFile) -> Path | str | None:
        """The entry of ``source`` when its index matches the file opened (identity and sampled
        digest of ``file``'s descriptor); ``"uncacheable"`` when the index records that this very
        file could not be copied; else None."""
        info = file.info
        if index["source"] != os.fsdecode(source) or index["source_identity"] != layout.identity(info):
            log.info("cache: %s changed since it was cached; reading it again", source)
            return None
        if index["entry"] is None:
            return "uncacheable"
        entry = self.folder / index["entry"]
        try:
            entry_info = entry.lstat()
        except FileNotFoundError:
            log.warning("cache: the entry of %s is missing (%s); rebuilding it", source, entry)
            return None
        if index["entry_identity"] != layout.identity(entry_info):  # any write to it changes its ctime
            log.warning("cache: the entry of %s is damaged (%s changed after it was written); rebuilding it",
                        source, entry)
            return None
        if index["source_sample"] != layout.sampled_digest(file.fd, info.st_size):
            log.info("cache: %s has other content than when it was cached; reading it again", source)
            return None
        return entry

    def _load_index(self, key: str, *, quiet: bool = False) -> dict[str, Any] | None:
        """The index's fields, checked; None when absent or damaged (a damaged one is logged)."""
        index = self.folder / f"{key}.json"
        try:
            data = json.loads(layout.read_small(index, layout.MAX_INDEX))  # a link is not followed: damage, rebuilt
            if not isinstance(data, dict) or data.get("format") != layout.FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            for field_name, kind in (("source", str), ("source_sample", str), ("source_identity", dict)):
                if not isinstance(data.get(field_name), kind):
                    raise ValueError(f"{field_name} missing")
            entry = data.get("entry")
            if entry is None:
                if not isinstance(data.get("reason"), str):
                    raise ValueError("neither an entry nor a reason")
            else:
                match = layout.ENTRY_NAME.match(entry) if isinstance(entry, str) else None
                if match is None or match.group(1) != key or not isinstance(data.get("entry_identity"), dict):
                    raise ValueError(f"entry {str(entry)[:80]!r} is no entry of this index")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError, CheckpointError) as exc:  # JSONDecodeError is a ValueError
            (log.debug if quiet else log.warning)("cache: index %s is damaged (%s)%s", index, exc,
                                                  "" if quiet else "; rebuilding the entry")
            return None
        return data

    def _read_entry(self, entry: Path, options: ReadOptions, path: Path, source: Path, *,
                    identity: dict[str, Any] | None = None, quiet: bool = False) -> Checkpoint | None:
        """The entry's checkpoint, or None when it is damaged (logged). An entry is untrusted input:
        anything wrong with its file or contents means a rebuild; a failure to place its tensors
        (out of device memory) is not the entry's and propagates, as it would without the cache.
        It is opened once, without following a link, and read only when that descriptor has
        ``identity`` (the one its index records; None: the entry was just written)."""
        try:
            with OpenFile(entry, nofollow=True) as file:
                if identity is not None and layout.identity(file.info) != identity:
                    raise ValueError("the file opened is not the one its index records")
                # the cache's own entries are never rewritten in place (replaced by rename, removed by
                # unlink, which leaves a mapping intact): mapped unless the caller asked for copies
                mapped = options if options.mmap is not None else replace(options, mmap=True)
                return checkpoint_from(by_name("safetensors").read(entry, mapped, file), path)
        except (OSError, CheckpointError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                RecursionError) as exc:  # JSONDecodeError is a ValueError
            (log.debug if quiet else log.warning)("cache: the entry of %s is damaged (%s: %s: %s)%s", source, entry,
                                                  type(exc).__name__, exc, "" if quiet else "; rebuilding it")
            return None

    def _files_of(self, key: str) -> list[Path]:
        """Every file of the cache's own layout that belongs to ``key``."""
        return layout.files_of(self.folder, key)

    def _locked(self, key: str, *, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
        """An exclusive lock on ``key`` (`pool.cache_layout.locked`): whether it is held."""
        return layout.locked(self.folder, key, wait=wait)
