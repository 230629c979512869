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
  recorded, and a file changed less than `RACY_SECONDS` before it was read is not cached yet (on
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

This module knows files, tensors and JSON; nothing of open_clip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shlex
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .containers import by_name
from .containers.base import Checkpoint, ReadOptions
from .errors import CheckpointError, ConfigError, NotACacheError
from .records import ModuleInfo
from .transfer import OpenFile
from .unpickler import GlobalName

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock; atomic renames still keep entries whole
    fcntl = None  # type: ignore[assignment]

__all__ = ["CACHE_ENV", "CACHEABLE", "RACY_SECONDS", "CacheEntry", "CheckpointCache", "NotACacheError",
           "resolve_cache_dir"]

log = logging.getLogger(__name__)

#: The environment variable that turns the cache on for every read that does not say otherwise.
CACHE_ENV = "OPENCLIP_POOL_CACHE_DIR"
#: Containers worth caching: the pickles whose whole stream is parsed on every read. A zip pickle is
#: memory-mapped and its pickle is short (ViT-B-32: 17 ms against 7 ms for a cache hit), so copying
#: it would double its disk for little; safetensors files and transformers folders are read as fast.
CACHEABLE = frozenset({"legacy", "pickle"})
#: A file changed less than this many seconds before it is cached is not cached yet: on file systems
#: with coarse timestamps a second write in the same tick would leave its identity unchanged.
RACY_SECONDS = 2.0
FORMAT = 1
_LAYOUT = f"v{FORMAT}"
_SAMPLES = 16
_BLOCK = 4096
_MAX_INDEX = 1 << 20
_META = "pool.cache."
_META_KEYS = frozenset(f"{_META}{k}" for k in ("container", "root_type", "wrapper", "keys", "modules", "globals"))
_OFF = frozenset({"", "0", "false", "off", "no", "none"})
_INDEX_NAME = re.compile(r"^([0-9a-f]{32})\.json$")
_ENTRY_NAME = re.compile(r"^([0-9a-f]{32})\.[0-9a-f]{16}\.safetensors$")
_TMP_NAME = re.compile(r"^\.([0-9a-f]{32})\..*\.tmp$")
_TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_TAG = (f"{_TAG_SIGNATURE}\n"
        "# This file is a cache directory tag created by pool (openclip-pool): its conversion cache.\n"
        "# For information about cache directory tags see https://bford.info/cachedir/\n")


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


# -- identity of a file ---------------------------------------------------------------------------
def _identity(info: os.stat_result) -> dict[str, int]:
    return {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns}


def _sampled_digest(fd: int, size: int) -> str:
    """CRC-32 of each of 16 blocks of 4 KiB spread evenly over the file (first and last included),
    with the size: a content check that costs 16 reads whatever the file's size. It detects change,
    not forgery (only its owner can write the cache). Read from ``fd``, the descriptor the bytes
    were (or are) read from, so that it describes those bytes and not whatever the path names now."""
    last = max(0, size - _BLOCK)
    crcs = [zlib.crc32(os.pread(fd, _BLOCK, last * i // (_SAMPLES - 1))) for i in range(_SAMPLES)]
    return f"{size:x}:" + "".join(f"{crc:08x}" for crc in crcs)


def _probe(path: Path, *, nofollow: bool = False) -> tuple[dict[str, int], str]:
    """Identity and sampled digest of a regular file, both from one descriptor (a link refused
    with ``nofollow``)."""
    with OpenFile(path, nofollow=nofollow) as file:
        return _identity(file.info), _sampled_digest(file.fd, file.info.st_size)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_small(path: Path, limit: int) -> bytes:
    """A small regular file of the cache's own, opened without following a link; ValueError when
    it is larger than ``limit``."""
    with OpenFile(path, nofollow=True) as file:
        if file.info.st_size > limit:
            raise ValueError("not a small regular file")
        return file.read_at(0, limit + 1)


# -- the cache's own folder -----------------------------------------------------------------------------
def _check_private(folder: Path, info: os.stat_result) -> None:
    """``v1`` (its ``lstat``): a directory, not a link; this user's; writable by no one else."""
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{folder} is a symbolic link; the cache never follows links in its own folder: "
                              f"remove the link (rm {shlex.quote(os.fspath(folder))}) or choose another cache_dir")
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{folder} is not a directory")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user (uid {info.st_uid}); a cache is only "
                              "used by its owner")
    if info.st_mode & 0o022:
        raise PermissionError(f"{folder} can be written by other users (mode {stat.filemode(info.st_mode)}); "
                              f"a cache must be private to its owner: chmod 700 {shlex.quote(os.fspath(folder))}")


def _check_above(folder: Path) -> None:
    """Every folder above ``folder``, as given and as resolved: this user's or root's, and writable by
    no other user unless sticky (whoever can write a folder on the way can swap what follows)."""
    if not hasattr(os, "getuid"):  # pragma: no cover - no owners to check (Windows)
        return
    parent = Path(os.path.abspath(folder)).parent
    seen: set[Path] = set()
    for chain in (parent, Path(os.path.realpath(parent))):
        for above in (chain, *chain.parents):
            if above in seen:
                continue
            seen.add(above)
            info = os.stat(above)
            if info.st_uid not in (os.getuid(), 0):
                raise PermissionError(f"{above}, a folder above the cache {folder}, belongs to another user "
                                      f"(uid {info.st_uid}), who could swap the cache's folder; choose a "
                                      "cache_dir in folders of your own")
            if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
                raise PermissionError(f"{above}, a folder above the cache {folder}, can be written by other users "
                                      f"(mode {stat.filemode(info.st_mode)}) and is not sticky, so they could swap "
                                      f"the cache's folder: chmod go-w {shlex.quote(os.fspath(above))}, or choose "
                                      "another cache_dir")


def _key(source: Path) -> str:
    return hashlib.sha256(os.fsencode(source)).hexdigest()[:32]


# -- what a Checkpoint carries besides tensors, as strings ------------------------------------------
# Module attributes are None, bools, ints, floats, strings and tuples of them (pool.records): a JSON
# array can only be a tuple, so tuples are written as arrays and every array read back is a tuple.
def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if type(value) is list else value


def _order(keys: list[str]) -> list[int]:
    """The key order as positions in the sorted keys (an entry stores its tensors sorted)."""
    rank = {key: i for i, key in enumerate(sorted(keys))}
    return [rank[key] for key in keys]


def _checkpoint_metadata(ckpt: Checkpoint) -> dict[str, str]:
    kinds: dict[str, int] = {}  # the distinct (class, attributes): a ViT's blocks repeat a few of them
    paths = {}
    for path, info in ckpt.modules.items():
        kind = json.dumps([info.type, info.attributes], separators=(",", ":"))
        paths[path] = kinds.setdefault(kind, len(kinds))
    modules = {"kinds": [json.loads(kind) for kind in kinds], "paths": paths}
    return {
        f"{_META}container": ckpt.container,
        f"{_META}root_type": ckpt.root_type,
        f"{_META}wrapper": ckpt.wrapper or "",
        f"{_META}keys": json.dumps(_order(list(ckpt.state_dict)), separators=(",", ":")),  # safetensors sorts them
        f"{_META}modules": json.dumps(modules, separators=(",", ":")),
        f"{_META}globals": json.dumps([[g.module, g.name, g.unsafe] for g in ckpt.globals], separators=(",", ":")),
    }


def _checkpoint_from(entry: Checkpoint, path: Path) -> Checkpoint:
    """The checkpoint an entry holds, labelled with the path the caller gave; ValueError (or any
    other exception: the entry is untrusted input) when it is not what `_checkpoint_metadata` wrote."""
    meta = entry.metadata
    if set(meta) != _META_KEYS or meta[f"{_META}container"] not in CACHEABLE:
        raise ValueError(f"its metadata is not a cache entry's ({sorted(meta)[:8]})")
    table = json.loads(meta[f"{_META}modules"])
    kinds = [(str(kind), {str(name): _tuples(value) for name, value in attributes.items()})
             for kind, attributes in table["kinds"]]
    modules = {}
    for name, i in table["paths"].items():
        kind, attributes = kinds[i]
        modules[str(name)] = ModuleInfo(kind, dict(attributes))
    found = [GlobalName(str(m), str(n), bool(u)) for m, n, u in json.loads(meta[f"{_META}globals"])]
    if any(g.unsafe for g in found):
        raise ValueError("it lists an unsafe global")
    tensors = entry.state_dict
    ranks = sorted(tensors)
    order = json.loads(meta[f"{_META}keys"])
    if not isinstance(order, list) or sorted(order) != list(range(len(ranks))):
        raise ValueError("its key order does not match its tensors")
    return Checkpoint(path, meta[f"{_META}container"], {ranks[i]: tensors[ranks[i]] for i in order},
                      meta[f"{_META}root_type"],
                      modules=modules, globals=found, wrapper=meta[f"{_META}wrapper"] or None,
                      cache_entry=entry.path)


# -- the cache ----------------------------------------------------------------------------------------
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


class CheckpointCache:
    """The conversion cache in one directory (see the module docstring for the layout).

    Args:
        root: the cache directory; ``root/v1`` is created (mode 0700) on the first write.

    Example:
        >>> from pool.cache import CheckpointCache
        >>> cache = CheckpointCache("~/.cache/openclip-pool")
        >>> [entry.status for entry in cache.entries()]  # doctest: +SKIP
        ['fresh', 'fresh', 'stale']
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root / _LAYOUT

    def __repr__(self) -> str:
        return f"CheckpointCache({str(self.root)!r})"

    # -- reading --------------------------------------------------------------------------------------
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
            key = _key(source)
            bound = _same_inode(os.stat(source), file.info)
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
        _check_private(self.folder, info)
        _check_above(self.folder)
        return True

    def _lookup(self, index: dict[str, Any], source: Path, file: OpenFile) -> Path | str | None:
        """The entry of ``source`` when its index matches the file opened (identity and sampled
        digest of ``file``'s descriptor); ``"uncacheable"`` when the index records that this very
        file could not be copied; else None."""
        info = file.info
        if index["source"] != os.fsdecode(source) or index["source_identity"] != _identity(info):
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
        if index["entry_identity"] != _identity(entry_info):  # any write to it changes its ctime
            log.warning("cache: the entry of %s is damaged (%s changed after it was written); rebuilding it",
                        source, entry)
            return None
        if index["source_sample"] != _sampled_digest(file.fd, info.st_size):
            log.info("cache: %s has other content than when it was cached; reading it again", source)
            return None
        return entry

    def _load_index(self, key: str, *, quiet: bool = False) -> dict[str, Any] | None:
        """The index's fields, checked; None when absent or damaged (a damaged one is logged)."""
        index = self.folder / f"{key}.json"
        try:
            data = json.loads(_read_small(index, _MAX_INDEX))  # a link is not followed: damage, rebuilt
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            for field_name, kind in (("source", str), ("source_sample", str), ("source_identity", dict)):
                if not isinstance(data.get(field_name), kind):
                    raise ValueError(f"{field_name} missing")
            entry = data.get("entry")
            if entry is None:
                if not isinstance(data.get("reason"), str):
                    raise ValueError("neither an entry nor a reason")
            else:
                match = _ENTRY_NAME.match(entry) if isinstance(entry, str) else None
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
                if identity is not None and _identity(file.info) != identity:
                    raise ValueError("the file opened is not the one its index records")
                # the cache's own entries are never rewritten in place (replaced by rename, removed by
                # unlink, which leaves a mapping intact): mapped unless the caller asked for copies
                mapped = options if options.mmap is not None else replace(options, mmap=True)
                return _checkpoint_from(by_name("safetensors").read(entry, mapped, file), path)
        except (OSError, CheckpointError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                RecursionError) as exc:  # JSONDecodeError is a ValueError
            (log.debug if quiet else log.warning)("cache: the entry of %s is damaged (%s: %s: %s)%s", source, entry,
                                                  type(exc).__name__, exc, "" if quiet else "; rebuilding it")
            return None

    # -- writing --------------------------------------------------------------------------------------
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
        if _identity(after) != _identity(file.info):
            log.info("cache: %s changed while it was read; not cached", path)
            return False
        if time.time() - max(after.st_mtime, after.st_ctime) < RACY_SECONDS:
            log.info("cache: %s changed less than %g s ago; cached at a later load", path, RACY_SECONDS)
            return False
        return True

    def _store(self, key: str, source: Path, file: OpenFile, ckpt: Checkpoint,
               rejected: Path | str | None = None) -> Path | None:
        """Write the entry and then its index, holding the file's lock; the entry another process
        wrote meanwhile when it is there (unless it is ``rejected``). What safetensors cannot hold
        (a dtype, metadata) is recorded as ``uncacheable``, so the file is then read directly until
        it changes; other failures (a full disk, a write interrupted) are retried at the next load."""
        from .saving import contiguous_unshared, safetensors_layout, write_checked

        info = file.info
        self._prepare()
        with self._locked(key):
            index = self._load_index(key, quiet=True)
            found = self._lookup(index, source, file) if index is not None else None
            if found is not None and found != rejected:
                return None if found == "uncacheable" else found  # type: ignore[return-value]
            sample = _sampled_digest(file.fd, info.st_size)  # of the descriptor the tensors came from
            entry = self.folder / f"{key}.{secrets.token_hex(8)}.safetensors"
            record = {"format": FORMAT, "source": os.fsdecode(source), "container": ckpt.container,
                      "source_identity": _identity(info), "source_sample": sample, "created": time.time()}
            try:
                if ckpt.metadata:  # pickled containers carry none; an entry could not keep it
                    raise ValueError(f"it carries metadata the cache does not keep ({sorted(ckpt.metadata)[:3]})")
                tensors, metadata = contiguous_unshared(ckpt.state_dict), _checkpoint_metadata(ckpt)
                safetensors_layout(tensors, metadata)
            except (KeyError, ValueError, TypeError) as exc:  # what the file holds: the same at every load
                self._commit(key, {**record, "entry": None, "reason": f"{type(exc).__name__}: {exc}"[:500]})
                raise
            write_checked(tensors, metadata, entry)
            log.info("cache: %s (%s) cached as %s", source, ckpt.container, entry.name)
            entry_identity, entry_sample = _probe(entry, nofollow=True)
            self._commit(key, {**record, "entry": entry.name, "entry_identity": entry_identity,
                               "entry_sample": entry_sample}, entry)
        return entry

    def _commit(self, key: str, record: dict[str, Any], entry: Path | None = None) -> None:
        """Replace the index in one rename, then remove what it no longer names (we hold the lock)."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / f"{key}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if entry is not None:
                with contextlib.suppress(OSError):
                    entry.unlink()
            raise
        for other in self._files_of(key):
            if other.suffix != ".json" and other.suffix != ".lock" and (entry is None or other.name != entry.name):
                with contextlib.suppress(OSError):
                    other.unlink()

    def _files_of(self, key: str) -> list[Path]:
        """Every file of the cache's own layout that belongs to ``key``."""
        return [p for p in self.folder.glob(f"*{key}*")
                if p.name in (f"{key}.json", f"{key}.lock")
                or ((m := _ENTRY_NAME.match(p.name) or _TMP_NAME.match(p.name)) is not None and m.group(1) == key)]

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
            f.write(_TAG)

    @contextlib.contextmanager
    def _locked(self, key: str, *, wait: bool = True) -> Iterator[bool]:
        """An exclusive lock on ``key`` (``flock`` of ``<key>.lock``; none where fcntl is missing).
        Yields whether it is held: with ``wait=False`` a lock another process holds is not waited for."""
        fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            yield True
        finally:
            os.close(fd)  # releases the lock

    # -- listing and clearing ---------------------------------------------------------------------------
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
            match = _INDEX_NAME.match(index_path.name)
            if match is None:
                continue
            try:
                yield self._describe(match.group(1), index_path, named)
            except Exception as exc:  # noqa: BLE001 - an index is untrusted input: listed as damaged
                log.debug("cache: %s: %s", index_path, exc)
                yield CacheEntry(index_path, None, "", None, _size(index_path), "damaged", 0.0)
        for orphan in sorted(self.folder.glob("*.safetensors")):
            if orphan.name not in named and _ENTRY_NAME.match(orphan.name):
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
            now = _probe(source)
        except (OSError, ValueError, CheckpointError):
            return CacheEntry(index_path, source, container, entry, nbytes, "missing", created)
        try:
            damaged = entry is not None and (
                (data["entry_identity"], data.get("entry_sample")) != _probe(entry, nofollow=True)
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
        tag = self.folder / "CACHEDIR.TAG"
        try:
            self._check_folder()
            ours = _read_small(tag, 4096).startswith(_TAG_SIGNATURE.encode())  # a link is no tag of ours
        except FileNotFoundError:
            ours = False
        except (OSError, ValueError, CheckpointError) as exc:
            raise NotACacheError(f"{self.folder}: {exc}; nothing was removed") from None
        if not ours:
            raise NotACacheError(f"{self.folder} is not a pool conversion cache (no CACHEDIR.TAG written by pool); "
                                 "nothing was removed")
        removed = freed = 0
        for item in list(self.entries()):
            if only_unusable and item.status == "fresh":
                continue
            if item.status == "orphan":  # an entry file no index names: that file alone
                freed += _unlink(item.index)
                removed += 1
                continue
            key = _INDEX_NAME.match(item.index.name).group(1)  # type: ignore[union-attr]
            with self._locked(key, wait=False) as held:
                if not held:  # being written by another process right now: left alone
                    log.info("cache: %s is being written; not removed", item.source)
                    continue
                for file in self._files_of(key):
                    freed += _unlink(file)
            removed += 1
        for leftover in self.folder.iterdir():  # interrupted writes of keys that have no index
            match = _TMP_NAME.match(leftover.name)
            if match and not os.path.lexists(self.folder / f"{match.group(1)}.json"):
                with self._locked(match.group(1), wait=False) as held:
                    if held:
                        freed += _unlink(leftover)
        return removed, freed


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
