"""The conversion cache's writing (`pool.cache`): the source read, its entry written through
`pool.writer` (atomic, read back bit for bit) and then its index, in one rename, under the
file's lock."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cache_layout as layout
from .cache_format import checkpoint_metadata
from .cache_index import CacheIndex
from .containers.base import Checkpoint, ReadOptions
from .transfer import OpenFile
from .writer import contiguous_unshared, safetensors_layout, write_bytes_atomic, write_checked

__all__ = ["CacheStore"]

log = logging.getLogger("pool.cache")  # one logger for the whole cache, as --debug shows it and users filter it


class CacheStore(CacheIndex):
    """`CacheIndex` plus the writing of entries (a cache miss: `_fill`)."""

    def _fill(self, file: OpenFile, source: Path, key: str, options: ReadOptions,
              read_source: Callable[[Path, ReadOptions, OpenFile], Checkpoint],
              rejected: Path | str | None = None) -> Checkpoint:
        """Read the source from ``file`` (errors propagate, nothing is written), then cache what was
        read; ``rejected`` is an entry that failed to read, which is replaced even if its index matches."""
        path = file.path
        start = time.perf_counter()
        ckpt = read_source(path, ReadOptions(refuse_unsafe=True), file)  # on the CPU: the entry is a file
        entry = None
        try:
            if self._cacheable_now(file):
                entry = self._store(key, source, file, ckpt, rejected)
        except Exception as exc:  # noqa: BLE001 - a load never fails because of the cache
            log.warning("cache %s: could not cache %s (%s: %s); it was read directly", self.root, path,
                        type(exc).__name__, exc)
        if entry is not None:
            log.debug("cache: %s (%s) read and its entry ready in %.2f s", path, ckpt.container,
                      time.perf_counter() - start)
            served = self._read_entry(entry, options, path, source)
            if served is not None:
                return served
        on_cpu = options.device is None or options.device.type == "cpu"
        return ckpt if on_cpu and options.mmap is not False else read_source(path, options, file)

    def _cacheable_now(self, file: OpenFile) -> bool:
        """Whether the file just read (its descriptor) is as it was when opened, and settled."""
        path, after = file.path, os.fstat(file.fd)
        if layout.identity(after) != layout.identity(file.info):
            log.info("cache: %s changed while it was read; not cached", path)
            return False
        if time.time() - max(after.st_mtime, after.st_ctime) < layout.RACY_SECONDS:
            log.info("cache: %s changed less than %g s ago; cached at a later load", path, layout.RACY_SECONDS)
            return False
        return True

    def _store(self, key: str, source: Path, file: OpenFile, ckpt: Checkpoint,
               rejected: Path | str | None = None) -> Path | None:
        """Write the entry and then its index, holding the file's lock; the entry another process
        wrote meanwhile when it is there (unless it is ``rejected``). What safetensors cannot hold
        (a dtype, metadata) is recorded as ``uncacheable``, so the file is then read directly until
        it changes; other failures (a full disk, a write interrupted) are retried at the next load."""
        info = file.info
        self._prepare()
        with self._locked(key):
            index = self._load_index(key, quiet=True)
            found = self._lookup(index, source, file) if index is not None else None
            if found is not None and found != rejected:
                return None if found == "uncacheable" else found  # type: ignore[return-value]
            sample = layout.sampled_digest(file.fd, info.st_size)  # of the descriptor the tensors came from
            entry = self.folder / f"{key}.{secrets.token_hex(8)}.safetensors"
            record = {"format": layout.FORMAT, "source": os.fsdecode(source), "container": ckpt.container,
                      "source_identity": layout.identity(info), "source_sample": sample, "created": time.time()}
            try:
                if ckpt.metadata:  # pickled containers carry none; an entry could not keep it
                    raise ValueError(f"it carries metadata the cache does not keep ({sorted(ckpt.metadata)[:3]})")
                tensors, metadata = contiguous_unshared(ckpt.state_dict), checkpoint_metadata(ckpt)
                safetensors_layout(tensors, metadata)
            except (KeyError, ValueError, TypeError) as exc:  # what the file holds: the same at every load
                self._commit(key, {**record, "entry": None, "reason": f"{type(exc).__name__}: {exc}"[:500]})
                raise
            write_checked(tensors, metadata, entry, mode=0o600)  # a per-user cache: its entries stay private
            log.info("cache: %s (%s) cached as %s", source, ckpt.container, entry.name)
            entry_identity, entry_sample = layout.probe(entry, nofollow=True)
            self._commit(key, {**record, "entry": entry.name, "entry_identity": entry_identity,
                               "entry_sample": entry_sample}, entry)
        return entry

    def _commit(self, key: str, record: dict[str, Any], entry: Path | None = None) -> None:
        """Replace the index in one rename, then remove what it no longer names (we hold the lock)."""
        try:  # a per-user cache: its index stays private too
            write_bytes_atomic(self.folder / f"{key}.json", json.dumps(record, indent=1).encode("utf-8"), mode=0o600)
        except BaseException:
            if entry is not None:
                with contextlib.suppress(OSError):
                    entry.unlink()
            raise
        for other in self._files_of(key):
            if other.suffix != ".json" and other.suffix != ".lock" and (entry is None or other.name != entry.name):
                with contextlib.suppress(OSError):
                    other.unlink()

    def _prepare(self) -> None:
        """Create ``v1`` (0700, with its CACHEDIR.TAG) and refuse one that is a link, is not this
        user's alone or sits where others could swap it (`_check_folder`)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self._check_folder():
            raise FileNotFoundError(f"{self.folder} vanished as it was created")
        try:  # created exclusively, never through a link left in its place
            fd = os.open(self.folder / "CACHEDIR.TAG", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(layout.TAG)
