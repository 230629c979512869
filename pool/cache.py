"""An opt-in conversion cache: a pickled checkpoint is parsed once, then served as safetensors.

The published forms (plain pickles, legacy files, zip pickles) are parsed on every load; merging
runs load the same 8-20 files for every experiment. With a cache directory (the environment
variable ``OPENCLIP_POOL_CACHE_DIR``, a pool's ``cache_dir:`` key, or ``cache_dir=`` of
`pool.checkpoint.read_checkpoint`), the first read of a pickled file writes a safetensors copy of
its tensors beside a small JSON index; later reads of the unchanged file memory-map that copy.

Layout of ``<cache_dir>/v1/``, one pair per source file (keyed by its resolved path):

- ``<key>.json``: the index, the commit record. It names the source, the source's identity when it
  was read (device, inode, size, mtime and ctime in ns, and a digest of 16 sampled 4 KiB blocks)
  and the entry file with its own identity and sampled digest.
- ``<key>.<token>.safetensors``: the entry: the tensors, plus string metadata carrying what the
  read of the source gave besides tensors (container, root type, module records, globals).

Nothing but tensors and string metadata is ever stored, and an entry is read by our own
safetensors parser. A source whose identity or sampled content changed is never served from the
cache: it is read again and its entry replaced. An index that is unreadable, or an entry that is
missing, unreadable or changed since it was written (its identity; ``cache info`` also checks its
sampled digest), is reported as damaged and rebuilt. Entries are written atomically (temporary
file, read back bit for bit, fsync, rename) and never modified; the index is replaced in one
rename. One process at a time fills a given file's entry (``flock`` on ``<key>.lock``): the others
wait, then map what it wrote. A cache that cannot be written is logged and bypassed.

This module knows files, tensors and JSON; nothing of open_clip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .containers import by_name
from .containers.base import Checkpoint, ReadOptions
from .errors import CheckpointError, ConfigError
from .records import ModuleInfo
from .unpickler import GlobalName

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock; atomic renames still keep entries whole
    fcntl = None  # type: ignore[assignment]

__all__ = ["CACHE_ENV", "CACHEABLE", "CacheEntry", "CheckpointCache", "resolve_cache_dir"]

log = logging.getLogger(__name__)

#: The environment variable that turns the cache on for every read that does not say otherwise.
CACHE_ENV = "OPENCLIP_POOL_CACHE_DIR"
#: Containers worth caching: the pickled ones (safetensors and transformers folders are read as fast).
CACHEABLE = frozenset({"zip", "legacy", "pickle"})
FORMAT = 1
_LAYOUT = f"v{FORMAT}"
_SAMPLES = 16
_BLOCK = 4096
_MAX_INDEX = 1 << 20
_META = "pool.cache."
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}\.[0-9a-f]{16}\.safetensors$")
_INDEX_NAME = re.compile(r"^[0-9a-f]{32}\.json$")
_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
        "# This file is a cache directory tag created by pool (openclip-pool).\n"
        "# For information about cache directory tags see https://bford.info/cachedir/\n")


def resolve_cache_dir(value: Any = None) -> Path | None:
    """The cache directory a read uses: ``value`` when given, else ``$OPENCLIP_POOL_CACHE_DIR``.

    Args:
        value: a directory (str or path; ``~`` is expanded); None (the default) defers to the
            environment variable; False or ``""`` turns the cache off whatever the environment says.

    Returns:
        The directory, or None when no cache is used.

    Raises:
        ConfigError: ``value`` is neither a path, None nor False.
    """
    if value is None:
        value = os.environ.get(CACHE_ENV) or None
        if value is None:
            return None
    if value is False or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"cache_dir {value!r} is not a directory path; give a path, or false to turn the "
                          f"cache off (unset: ${CACHE_ENV} decides)")
    return Path(value).expanduser()


# -- identity of a file ---------------------------------------------------------------------------
def _identity(info: os.stat_result) -> dict[str, int]:
    return {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns}


def _sampled_digest(path: Path, size: int) -> str:
    """blake2b of the size and 16 blocks of 4 KiB spread evenly over the file (first and last
    included): a content check that costs 16 reads whatever the file's size."""
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        last = max(0, size - _BLOCK)
        for i in range(_SAMPLES):
            digest.update(os.pread(fd, _BLOCK, last * i // (_SAMPLES - 1)))
    finally:
        os.close(fd)
    return digest.hexdigest()


def _key(source: Path) -> str:
    return hashlib.sha256(os.fsencode(source)).hexdigest()[:32]


# -- what a Checkpoint carries besides tensors, as strings ------------------------------------------
# Module attributes are None, bools, ints, floats, strings and tuples of them (pool.records): a JSON
# array can only be a tuple, so tuples are written as arrays and every array read back is a tuple.
def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if type(value) is list else value


def _checkpoint_metadata(ckpt: Checkpoint) -> dict[str, str]:
    kinds: dict[str, int] = {}  # the distinct (class, attributes): a ViT's blocks repeat a few of them
    paths = {}
    for path, info in ckpt.modules.items():
        kind = json.dumps([info.type, info.attributes], separators=(",", ":"))
        paths[path] = kinds.setdefault(kind, len(kinds))
    modules = {"kinds": [json.loads(kind) for kind in kinds], "paths": paths}
    return {
        **{f"{_META}source.{k}": v for k, v in ckpt.metadata.items()},
        f"{_META}container": ckpt.container,
        f"{_META}root_type": ckpt.root_type,
        f"{_META}wrapper": ckpt.wrapper or "",
        f"{_META}keys": json.dumps(list(ckpt.state_dict), separators=(",", ":")),  # safetensors sorts them
        f"{_META}modules": json.dumps(modules, separators=(",", ":")),
        f"{_META}globals": json.dumps([[g.module, g.name, g.unsafe] for g in ckpt.globals], separators=(",", ":")),
    }


def _checkpoint_from(entry: Checkpoint, source: Path) -> Checkpoint:
    meta = entry.metadata
    table = json.loads(meta[f"{_META}modules"])
    kinds = [(kind, {name: _tuples(value) for name, value in attributes.items()})
             for kind, attributes in table["kinds"]]
    modules = {}
    for path, i in table["paths"].items():
        kind, attributes = kinds[i]
        modules[path] = ModuleInfo(kind, dict(attributes))
    found = [GlobalName(m, n, bool(u)) for m, n, u in json.loads(meta[f"{_META}globals"])]
    prefix = f"{_META}source."
    tensors = entry.state_dict
    order = json.loads(meta[f"{_META}keys"])
    if sorted(order) != sorted(tensors):
        raise ValueError("its key list does not match its tensors")
    return Checkpoint(source, meta[f"{_META}container"], {k: tensors[k] for k in order}, meta[f"{_META}root_type"],
                      modules=modules, globals=found,
                      metadata={k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)},
                      wrapper=meta[f"{_META}wrapper"] or None, cache_entry=entry.path)


# -- the cache ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheEntry:
    """One cached file, as ``python -m pool cache info`` lists it.

    Attributes:
        index: the entry's JSON index.
        source: the checkpoint file it was made from (None when the index is unreadable).
        container: the source's container (``zip``, ``legacy``, ``pickle``), "" when unknown.
        entry: the safetensors copy (None when the index names none).
        nbytes: bytes the pair takes on disk (index and entry).
        status: ``fresh`` (would be served), ``stale`` (the source changed), ``missing`` (the source
            is gone), ``damaged`` (the index or entry is unreadable or changed; rebuilt on the next
            load) or ``orphan`` (an entry file no index names, left by an interrupted process).
        created: when the entry was written (seconds since the epoch; 0 when unknown).
    """

    index: Path
    source: Path | None
    container: str
    entry: Path | None
    nbytes: int
    status: str
    created: float

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, as ``cache info --json`` prints it.

        Returns:
            ``{"source", "container", "entry", "index", "bytes", "status", "created"}``, paths as
            strings (None where unknown).
        """
        return {"source": str(self.source) if self.source else None, "container": self.container,
                "entry": str(self.entry) if self.entry else None, "index": str(self.index),
                "bytes": self.nbytes, "status": self.status, "created": self.created}


class CheckpointCache:
    """The conversion cache in one directory (see the module docstring for the layout).

    Args:
        root: the cache directory; created (mode 0700) on the first write.

    Example:
        >>> from pool.cache import CheckpointCache
        >>> cache = CheckpointCache("~/.cache/openclip-pool")  # doctest: +SKIP
        >>> ckpt = cache.read(Path("Cars/finetuned.pt"), ReadOptions(), read_source)  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root / _LAYOUT

    def __repr__(self) -> str:
        return f"CheckpointCache({str(self.root)!r})"

    # -- reading --------------------------------------------------------------------------------------
    def read(self, path: Path, options: ReadOptions, read_source: Callable[[Path, ReadOptions], Checkpoint]) -> Checkpoint:
        """The checkpoint at ``path``: from its entry when fresh, else read and cached.

        A read that needs what the cache does not keep (``refuse_unsafe=False``, a dict
        ``map_location``) and a container not worth caching go straight to ``read_source``. A
        cache that cannot be written (permissions, a full disk) is logged and bypassed: a load
        never fails because of the cache.

        Args:
            path: the checkpoint file (an existing regular file).
            options: where the tensors go, as for `pool.checkpoint.read_checkpoint`.
            read_source: reads a checkpoint file (the uncached read).

        Returns:
            The `pool.checkpoint.Checkpoint`; ``path`` is the source and ``cache_entry`` the
            entry it came from (None when it came from the source itself).

        Raises:
            CheckpointError: the source cannot be read (as ``read_source`` raises).
        """
        if not options.refuse_unsafe or options.locations is not None:
            return read_source(path, options)
        source = Path(os.path.realpath(path))
        key = _key(source)
        try:
            info = source.stat()
            hit = self._lookup(key, source, info)
        except OSError as exc:
            log.warning("cache %s: cannot use it (%s); reading %s directly", self.root, exc, path)
            return read_source(path, options)
        if hit is not None:
            entry = self._read_entry(hit, options, source)
            if entry is not None:
                log.debug("cache hit: %s <- %s", path, hit)
                return entry
        return self._fill(path, source, key, info, options, read_source)

    def _lookup(self, key: str, source: Path, info: os.stat_result) -> Path | None:
        """The entry of ``source`` when its index matches the file as it is now, else None."""
        index = self._load_index(self.folder / f"{key}.json")
        if index is None:
            return None
        if index["source"] != str(source) or index["source_identity"] != _identity(info):
            log.info("cache: %s changed since it was cached; reading it again", source)
            return None
        entry = self.folder / index["entry"]
        try:
            entry_info = entry.stat()
        except FileNotFoundError:
            log.warning("cache: the entry of %s is missing (%s); rebuilding it", source, entry)
            return None
        if index["entry_identity"] != _identity(entry_info):  # any write to it changes its ctime
            log.warning("cache: the entry of %s is damaged (%s changed after it was written); rebuilding it",
                        source, entry)
            return None
        if index["source_sample"] != _sampled_digest(source, info.st_size):
            log.info("cache: %s has other content than when it was cached; reading it again", source)
            return None
        return entry

    def _load_index(self, index: Path) -> dict[str, Any] | None:
        """The index's fields, checked; None when absent or damaged (a damaged one is logged)."""
        try:
            info = index.lstat()
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_INDEX:
                raise ValueError("not a small regular file")
            data = json.loads(index.read_bytes())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            for field_name, kind in (("source", str), ("entry", str), ("source_sample", str),
                                     ("entry_sample", str), ("source_identity", dict), ("entry_identity", dict)):
                if not isinstance(data.get(field_name), kind):
                    raise ValueError(f"{field_name} missing")
            if not _ENTRY_NAME.match(data["entry"]):
                raise ValueError(f"entry {data['entry'][:80]!r} is no entry name")
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            log.warning("cache: index %s is damaged (%s); rebuilding the entry", index, exc)
            return None
        return data

    def _read_entry(self, entry: Path, options: ReadOptions, source: Path) -> Checkpoint | None:
        try:
            read = by_name("safetensors").read(entry, options)
            return _checkpoint_from(read, source)
        except (CheckpointError, KeyError, ValueError, TypeError) as exc:
            log.warning("cache: the entry of %s is damaged (%s: %s); rebuilding it", source, entry, exc)
            return None

    # -- writing --------------------------------------------------------------------------------------
    def _fill(self, path: Path, source: Path, key: str, info: os.stat_result, options: ReadOptions,
              read_source: Callable[[Path, ReadOptions], Checkpoint]) -> Checkpoint:
        """Read the source and cache it, one process at a time per file: a process that waited
        for the lock finds the entry another one wrote and maps it."""
        from .containers import sniff  # the container decides whether caching pays

        with open(source, "rb") as f:
            container = sniff(f.read(512), info.st_size)
        if container is None or container.name not in CACHEABLE:
            return read_source(path, options)
        try:
            self._prepare()
            lock = self._locked(key)
        except OSError as exc:
            log.warning("cache %s: cannot use it (%s); reading %s directly", self.root, exc, path)
            return read_source(path, options)
        with lock:
            info = source.stat()
            hit = self._lookup(key, source, info)
            served = self._read_entry(hit, options, source) if hit is not None else None
            if served is not None:
                return served
            start = time.perf_counter()
            ckpt = read_source(path, ReadOptions(refuse_unsafe=True))  # on the CPU: the entry is a file
            try:
                entry = self._store(key, source, info, ckpt)
            except (OSError, CheckpointError, ValueError, TypeError) as exc:
                log.warning("cache %s: could not cache %s (%s); it was read directly", self.root, path, exc)
                entry = None
            if entry is None:  # not cached: what was read serves when it is where the caller wants it
                on_cpu = options.device is None or options.device.type == "cpu"
                return ckpt if on_cpu and options.mmap is not False else read_source(path, options)
            log.info("cache: %s (%s) cached as %s in %.2f s", path, ckpt.container, entry.name,
                     time.perf_counter() - start)
            served = self._read_entry(entry, options, source)
        return served if served is not None else read_source(path, options)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive lock on ``key`` (``flock`` of ``<key>.lock``; none where fcntl is missing)."""
        fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _store(self, key: str, source: Path, before: os.stat_result, ckpt: Checkpoint) -> Path | None:
        """Write the entry and then its index; None when the source changed while it was read."""
        from .saving import contiguous_unshared, write_checked

        after = source.stat()
        if _identity(after) != _identity(before):
            log.info("cache: %s changed while it was read; not cached", source)
            return None
        source_sample = _sampled_digest(source, after.st_size)
        self._prepare()
        entry = self.folder / f"{key}.{secrets.token_hex(8)}.safetensors"
        write_checked(contiguous_unshared(ckpt.state_dict), _checkpoint_metadata(ckpt), entry)
        entry_info = entry.stat()
        index = {"format": FORMAT, "source": str(source), "container": ckpt.container,
                 "source_identity": _identity(after), "source_sample": source_sample,
                 "entry": entry.name, "entry_identity": _identity(entry_info),
                 "entry_sample": _sampled_digest(entry, entry_info.st_size), "created": time.time()}
        index_path = self.folder / f"{key}.json"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, index_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                entry.unlink()
            raise
        for other in [*self.folder.glob(f"{key}.*.safetensors"), *self.folder.glob(f".{key}.*.tmp")]:
            if other.name != entry.name:  # what this entry replaces, or an interrupted write (we hold the lock)
                with contextlib.suppress(OSError):
                    other.unlink()
        return entry

    def _prepare(self) -> None:
        """Create the folder (0700, with a CACHEDIR.TAG) and refuse one another user owns."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            with contextlib.suppress(OSError):
                tag.write_text(_TAG, encoding="utf-8")
        owner = self.folder.stat().st_uid
        if hasattr(os, "getuid") and owner != os.getuid():
            raise PermissionError(f"{self.folder} belongs to another user (uid {owner}); a cache is only "
                                  "used by its owner")

    # -- listing and clearing ---------------------------------------------------------------------------
    def entries(self) -> Iterator[CacheEntry]:
        """Every entry of the cache, with its status; reads indexes and samples entries, writes nothing.

        Returns:
            An iterator of `CacheEntry`, indexes first (by name), then orphaned entry files.
        """
        if not self.folder.is_dir():
            return
        named: set[str] = set()
        for index_path in sorted(self.folder.glob("*.json")):
            if not _INDEX_NAME.match(index_path.name):
                continue
            yield self._describe(index_path, named)
        for orphan in sorted(self.folder.glob("*.safetensors")):
            if orphan.name not in named and _ENTRY_NAME.match(orphan.name):
                yield CacheEntry(orphan, None, "", orphan, _size(orphan), "orphan", 0.0)

    def _describe(self, index_path: Path, named: set[str]) -> CacheEntry:
        data = self._load_index(index_path)
        if data is None:
            return CacheEntry(index_path, None, "", None, _size(index_path), "damaged", 0.0)
        named.add(data["entry"])
        source, entry = Path(data["source"]), self.folder / data["entry"]
        nbytes = _size(index_path) + _size(entry)
        created = float(data.get("created") or 0.0)
        container = str(data.get("container", ""))
        try:
            info = source.stat()
        except OSError:
            return CacheEntry(index_path, source, container, entry, nbytes, "missing", created)
        try:
            entry_info = entry.stat()
            damaged = (data["entry_identity"] != _identity(entry_info)
                       or data["entry_sample"] != _sampled_digest(entry, entry_info.st_size))
        except OSError:
            damaged = True
        if damaged:
            status = "damaged"
        elif data["source_identity"] != _identity(info) or data["source_sample"] != _sampled_digest(source, info.st_size):
            status = "stale"
        else:
            status = "fresh"
        return CacheEntry(index_path, source, container, entry, nbytes, status, created)

    def clear(self, *, only_unusable: bool = False) -> tuple[int, int]:
        """Remove entries: all of them, or (``only_unusable``) all but the fresh ones.

        Args:
            only_unusable: keep the fresh entries.

        Returns:
            ``(entries removed, bytes freed)``.
        """
        removed = freed = 0
        for item in list(self.entries()):
            if only_unusable and item.status == "fresh":
                continue
            for file in (item.index, item.entry):
                if file is not None:
                    with contextlib.suppress(FileNotFoundError):
                        file.unlink()
            removed += 1
            freed += item.nbytes
        if self.folder.is_dir():
            for leftover in [*self.folder.glob(".*.tmp"), *self.folder.glob("*.lock")]:  # interrupted writes, locks
                with contextlib.suppress(OSError):
                    freed += _size(leftover)
                    leftover.unlink()
        return removed, freed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
