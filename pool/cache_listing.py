"""The conversion cache's listing and clearing (`pool.cache`): what ``python -m pool cache info``
shows (each entry's status, read without writing) and what ``cache clear`` removes (only files of
the cache's own layout, from a folder that is pool's and this user's alone)."""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cache_layout as layout
from .cache_index import CacheIndex
from .containers.base import ReadOptions
from .errors import CheckpointError, NotACacheError

__all__ = ["CacheEntry", "CacheListing"]

log = logging.getLogger("pool.cache")  # one logger for the whole cache, as --debug shows it and users filter it


@dataclass(frozen=True)
class CacheEntry:
    """One cached file, as ``python -m pool cache info`` lists it.

    Attributes:
        index: the entry's JSON index (for an orphan: the entry file itself).
        source: the checkpoint file it was made from (None when the index is unreadable).
        container: the source's container (``legacy``, ``pickle``), "" when unknown.
        entry: the safetensors copy (None when the index names none).
        nbytes: bytes the pair takes on disk (index and entry).
        status: ``fresh`` (would be served), ``stale`` (the source changed), ``missing`` (the source
            is gone), ``damaged`` (the index or entry is unreadable or changed; rebuilt on the next
            load), ``uncacheable`` (the source could not be copied, ``reason`` says why; read
            directly until it changes or the record is cleared) or ``orphan`` (an entry file no index names, left by an interrupted
            process).
        created: when the entry was written (seconds since the epoch; 0 when unknown).
        reason: why an ``uncacheable`` source was not copied ("" otherwise).
    """

    index: Path
    source: Path | None
    container: str
    entry: Path | None
    nbytes: int
    status: str
    created: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, as ``cache info --json`` prints it.

        Returns:
            ``{"source", "container", "entry", "index", "bytes", "status", "created", "reason"}``,
            paths as strings (None where unknown).
        """
        return {"source": os.fsdecode(self.source) if self.source else None, "container": self.container,
                "entry": str(self.entry) if self.entry else None, "index": str(self.index),
                "bytes": self.nbytes, "status": self.status, "created": self.created, "reason": self.reason}


class CacheListing(CacheIndex):
    """`CacheIndex` plus listing (`entries`) and clearing (`clear`)."""

    def entries(self) -> Iterator[CacheEntry]:
        """Every entry of the cache, with its status; reads indexes and samples entries, writes nothing.

        Returns:
            An iterator of `CacheEntry`, indexes first (by name), then orphaned entry files.
        """
        try:
            if not stat.S_ISDIR(os.lstat(self.folder).st_mode):  # a link, even to a folder, is not followed
                log.warning("cache %s: %s is no folder (a symbolic link?); nothing listed", self.root, self.folder)
                return
        except OSError:
            return
        named: set[str] = set()
        for index_path in sorted(self.folder.glob("*.json")):
            match = layout.INDEX_NAME.match(index_path.name)
            if match is None:
                continue
            try:
                yield self._describe(match.group(1), index_path, named)
            except Exception as exc:  # noqa: BLE001 - an index is untrusted input: listed as damaged
                log.debug("cache: %s: %s", index_path, exc)
                yield CacheEntry(index_path, None, "", None, _size(index_path), "damaged", 0.0)
        for orphan in sorted(self.folder.glob("*.safetensors")):
            if orphan.name not in named and layout.ENTRY_NAME.match(orphan.name):
                yield CacheEntry(orphan, None, "", orphan, _size(orphan), "orphan", 0.0)

    def _describe(self, key: str, index_path: Path, named: set[str]) -> CacheEntry:
        data = self._load_index(key, quiet=True)
        if data is None:
            return CacheEntry(index_path, None, "", None, _size(index_path), "damaged", 0.0)
        source = Path(data["source"])
        created = data.get("created")
        created = float(created) if type(created) in (int, float) and math.isfinite(created) else 0.0
        container = str(data.get("container", ""))[:20]
        entry = self.folder / data["entry"] if data["entry"] is not None else None
        if entry is not None:
            named.add(entry.name)
        nbytes = _size(index_path) + (_size(entry) if entry is not None else 0)
        try:
            now = layout.probe(source)
        except (OSError, ValueError, CheckpointError):
            return CacheEntry(index_path, source, container, entry, nbytes, "missing", created)
        try:
            damaged = entry is not None and (
                (data["entry_identity"], data.get("entry_sample")) != layout.probe(entry, nofollow=True)
                or self._read_entry(entry, ReadOptions(torch.device("meta")), source, source,
                                    identity=data["entry_identity"], quiet=True) is None)
        except (OSError, CheckpointError):
            damaged = True
        if damaged:
            status = "damaged"
        elif (data["source_identity"], data["source_sample"]) != now:
            status = "stale"
        else:
            status = "fresh" if entry is not None else "uncacheable"
        return CacheEntry(index_path, source, container, entry, nbytes, status, created,
                          str(data.get("reason", ""))[:500] if entry is None else "")

    def clear(self, *, only_unusable: bool = False) -> tuple[int, int]:
        """Remove entries: all of them, or (``only_unusable``) all but the fresh ones. Only files of
        the cache's own layout are removed, and only from a ``v1`` that holds pool's CACHEDIR.TAG
        and belongs to this user alone.

        Args:
            only_unusable: keep the fresh entries.

        Returns:
            ``(entries removed, bytes freed)``.

        Raises:
            NotACacheError: the folder exists but is no conversion cache of this user's.
        """
        if not self.folder.is_dir():
            return 0, 0
        self._refuse_unless_ours()
        removed = freed = 0
        for item in list(self.entries()):
            if only_unusable and item.status == "fresh":
                continue
            if item.status == "orphan":  # an entry file no index names: that file alone
                freed += _unlink(item.index)
                removed += 1
                continue
            key = layout.INDEX_NAME.match(item.index.name).group(1)  # type: ignore[union-attr]
            with self._locked(key, wait=False) as held:
                if not held:  # being written by another process right now: left alone
                    log.info("cache: %s is being written; not removed", item.source)
                    continue
                for file in self._files_of(key):
                    freed += _unlink(file)
            removed += 1
        return removed, freed + self._clear_leftovers()

    def _refuse_unless_ours(self) -> None:
        """NotACacheError unless ``v1`` passes the folder checks and holds pool's CACHEDIR.TAG."""
        tag = self.folder / "CACHEDIR.TAG"
        try:
            self._check_folder()
            ours = layout.read_small(tag, 4096).startswith(layout.TAG_SIGNATURE.encode())  # a link is no tag of ours
        except FileNotFoundError:
            ours = False
        except (OSError, ValueError, CheckpointError) as exc:
            raise NotACacheError(f"{self.folder}: {exc}; nothing was removed") from None
        if not ours:
            raise NotACacheError(f"{self.folder} is not a pool conversion cache (no CACHEDIR.TAG written by pool); "
                                 "nothing was removed")

    def _clear_leftovers(self) -> int:
        """Remove the temporary files of interrupted writes of keys that have no index (unless one
        is being written now); the bytes freed."""
        freed = 0
        for leftover in self.folder.iterdir():
            match = layout.TMP_NAME.match(leftover.name)
            if match and not os.path.lexists(self.folder / f"{match.group(1)}.json"):
                with self._locked(match.group(1), wait=False) as held:
                    if held:
                        freed += _unlink(leftover)
        return freed


def _unlink(path: Path) -> int:
    """Remove ``path`` if it is there; the bytes freed."""
    size = _size(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
