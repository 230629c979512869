"""An opt-in conversion cache: a pickled checkpoint is parsed once, then served as safetensors.

Plain pickles and legacy files are parsed in full on every load; merging runs load the same 8-20
files for every experiment. With a cache directory (the environment variable
``OPENCLIP_POOL_CACHE_DIR``, a pool's ``cache_dir:`` key, or ``cache_dir=`` of
`pool.checkpoint.read_checkpoint`), the first read of such a file writes a safetensors copy of its
tensors beside a small JSON index; later reads of the unchanged file memory-map that copy.

Layout of ``<cache_dir>/v1/`` (mode 0700, with a CACHEDIR.TAG), one set per source file, keyed by
its resolved path:

- ``<key>.json``: the index, the commit record. It names the source, the source's identity when it
  was read (device, inode, size, mtime and ctime in ns, and a digest of 16 sampled 4 KiB blocks)
  and the entry file with its own identity and sampled digest; or, for a file that could not be
  copied (a dtype safetensors lacks, a full disk), the reason, so that it is read directly until
  it changes instead of failing to copy at every load.
- ``<key>.<token>.safetensors``: the entry: the tensors, plus string metadata carrying what the
  read of the source gave besides tensors (container, root type, key order, module records,
  globals).
- ``<key>.lock``: held (``flock``) while the entry is written.

Nothing but tensors and string metadata is ever stored, an entry is read by our own safetensors
parser, and everything read from the cache is checked as untrusted input. Guarantees:

- Bound to the bytes read: the source is opened once (`pool.transfer.OpenFile`, by
  `pool.checkpoint.read_checkpoint`) and its mapping, its reads, the identity the index records
  (``fstat`` of that descriptor) and the sampled digest all come from that descriptor, never from
  the path reopened; a path re-pointed between the open and the lookup (its resolved path no
  longer names the inode opened) is read directly and not cached. An entry is opened once too,
  without following a link, and served only when that descriptor has the identity its index
  records.
- Its own folder is never followed: ``v1`` is looked at with ``lstat`` and refused when it is a
  symbolic link, is no directory, belongs to another user or can be written by other users (group
  or world); every folder above it (as given and as resolved) must belong to this user or to root
  and be writable by no other user unless it is sticky (``/tmp``), since whoever can write the
  folder holding ``v1`` could swap it after it was checked. Files in ``v1`` (index, entry,
  lock, tag) are opened with ``O_NOFOLLOW``; temporary files are created exclusively. A folder
  that fails these checks is neither written nor served from: the reason is logged and the
  checkpoint is read from its source.

- Never stale: an entry is served only while the source has the identity and sampled digest
  recorded, and a file changed less than `pool.cache_layout.RACY_SECONDS` before it was read is not cached yet (on
  file systems with coarse timestamps a second write in the same tick keeps the identity).
- Damage is rebuilt: an unreadable index, or an entry that is missing, unreadable, not what the
  cache writes, or changed since it was written (its identity; ``cache info`` also checks its
  sampled digest), is logged and rebuilt from the source.
- Never in the way: the source is read first, so a file that cannot be read fails exactly as it
  does without the cache and leaves nothing behind; a cache that cannot be used (not a directory,
  owned by another user or writable by others, read-only, full) is logged and bypassed.
- Shared safely: entries are written atomically (temporary file, read back bit for bit, fsync,
  rename) and never modified; the index is replaced in one rename, under the file's lock, so
  processes filling the same file write it once and never see half an entry.

This module is the cache's face (`CheckpointCache.read`, `resolve_cache_dir`); its parts: the files
and their checks (`pool.cache_layout`), an entry's metadata (`pool.cache_format`), lookups
(`pool.cache_index`), writing (`pool.cache_store`), listing and clearing (`pool.cache_listing`).
They know files, tensors and JSON; nothing of open_clip.
"""


from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cache_layout as layout
from .cache_layout import CACHEABLE
from .cache_listing import CacheEntry, CacheListing
from .cache_store import CacheStore
from .containers.base import Checkpoint, ReadOptions
from .errors import CheckpointError, ConfigError, NotACacheError
from .transfer import OpenFile

__all__ = ["CACHE_ENV", "CACHEABLE", "CacheEntry", "CheckpointCache", "NotACacheError",
           "resolve_cache_dir"]

log = logging.getLogger(__name__)

#: The environment variable that turns the cache on for every read that does not say otherwise.
CACHE_ENV = "OPENCLIP_POOL_CACHE_DIR"
_OFF = frozenset({"", "0", "false", "off", "no", "none"})


def resolve_cache_dir(value: Any = None) -> Path | None:
    """The cache directory a read uses: ``value`` when given, else ``$OPENCLIP_POOL_CACHE_DIR``.

    Args:
        value: a directory (str or path; ``~`` is expanded); None (the default) defers to the
            environment variable; False, or a string such as ``""``, ``"0"``, ``"false"``,
            ``"off"``, ``"no"`` or ``"none"``, turns the cache off whatever the environment says.

    Returns:
        The directory, or None when no cache is used.

    Raises:
        ConfigError: ``value`` is neither a path, None nor False.
    """
    where = "cache_dir"
    if value is None:
        value, where = os.environ.get(CACHE_ENV), f"${CACHE_ENV}"
        if value is None:
            return None
    if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where} {value!r} is not a directory path; give a path, or false to turn the "
                          f"cache off (unset: ${CACHE_ENV} decides)")
    return Path(value).expanduser()


class CheckpointCache(CacheStore, CacheListing):
    """The conversion cache in one directory (see the module docstring for the layout).

    Args:
        root: the cache directory; ``root/v1`` is created (mode 0700) on the first write.

    Example:
        >>> from pool.cache import CheckpointCache
        >>> cache = CheckpointCache("~/.cache/openclip-pool")
        >>> [entry.status for entry in cache.entries()]  # doctest: +SKIP
        ['fresh', 'fresh', 'stale']
    """

    def __repr__(self) -> str:
        return f"CheckpointCache({str(self.root)!r})"

    def read(self, file: OpenFile, options: ReadOptions,
             read_source: Callable[[Path, ReadOptions, OpenFile], Checkpoint]) -> Checkpoint:
        """The checkpoint in ``file``: from its entry when fresh, else read and cached.

        A read that needs what the cache does not keep (``refuse_unsafe=False``, a dict
        ``map_location``) and a read onto the meta device go straight to ``read_source``. A cache
        that cannot be used (another user's, a link, not writable, a full disk) is logged and
        bypassed: a load never fails because of the cache, and a source that cannot be read fails
        exactly as it does without it, leaving nothing behind.

        Args:
            file: the checkpoint file, opened once (`pool.transfer.OpenFile`): a regular file of a
                `CACHEABLE` container (`pool.checkpoint.read_checkpoint` opens and sniffs it before it
                asks the cache). Its identity and sampled digest, and every byte cached, come from
                this descriptor; ``file.path`` labels the checkpoint and keys the entry.
            options: where the tensors go, as for `pool.checkpoint.read_checkpoint`.
            read_source: reads ``(path, options, file)`` from ``file`` (the uncached read: a
                container's ``read``); it must read nothing through ``path``.

        Returns:
            The `pool.checkpoint.Checkpoint`, labelled with ``file.path``; ``cache_entry`` is the
            entry it came from (None when it came from the source itself).

        Raises:
            CheckpointError: the source cannot be read (as ``read_source`` raises).
        """
        path = file.path
        device = options.device
        if not options.refuse_unsafe or options.locations is not None or (device is not None and device.type == "meta"):
            return read_source(path, options, file)
        try:
            source = Path(os.path.realpath(path))
            key = layout.key_of(source)
            bound = layout.same_inode(os.stat(source), file.info)
            index = self._load_index(key) if bound and self._usable() else None
            found = self._lookup(index, source, file) if index is not None else None
        except (OSError, ValueError, CheckpointError) as exc:  # ValueError: a path the OS refuses (a NUL byte)
            log.warning("cache %s: cannot use it (%s); reading %s directly", self.root, exc, path)
            return read_source(path, options, file)
        if not bound:
            log.info("cache: %s names another file than the one opened (re-pointed meanwhile); read directly",
                     path)
            return read_source(path, options, file)
        if found == "uncacheable":
            return read_source(path, options, file)
        if found is not None:
            served = self._read_entry(found, options, path, source, identity=index["entry_identity"])  # type: ignore[index]
            if served is not None:
                log.debug("cache hit: %s <- %s", path, found)
                return served
        return self._fill(file, source, key, options, read_source, rejected=found)
