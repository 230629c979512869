"""The conversion cache's files (`pool.cache`): their names, a file's identity and sampled digest,
the checks on the cache's own folder, small reads that never follow a link, and the per-file lock.
Everything here works on paths and descriptors; nothing reads a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

from .transfer import OpenFile

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock; atomic renames still keep entries whole
    fcntl = None  # type: ignore[assignment]

__all__ = ["CACHEABLE", "RACY_SECONDS", "FORMAT", "LAYOUT", "identity", "sampled_digest", "probe", "same_inode",
           "read_small", "check_private", "check_above", "key_of", "locked", "files_of"]

#: Containers worth caching: the pickles whose whole stream is parsed on every read. A zip pickle is
#: memory-mapped and its pickle is short (ViT-B-32: 17 ms against 7 ms for a cache hit), so copying
#: it would double its disk for little; safetensors files and transformers folders are read as fast.
CACHEABLE = frozenset({"legacy", "pickle"})
#: A file changed less than this many seconds before it is cached is not cached yet: on file systems
#: with coarse timestamps a second write in the same tick would leave its identity unchanged.
RACY_SECONDS = 2.0
#: The index's ``format``; entries live in ``<cache_dir>/v<FORMAT>/``.
FORMAT = 1
LAYOUT = f"v{FORMAT}"
#: An index larger than this is damage, not read.
MAX_INDEX = 1 << 20
INDEX_NAME = re.compile(r"^([0-9a-f]{32})\.json$")
ENTRY_NAME = re.compile(r"^([0-9a-f]{32})\.[0-9a-f]{16}\.safetensors$")
TMP_NAME = re.compile(r"^\.([0-9a-f]{32})\..*\.tmp$")
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
TAG = (f"{TAG_SIGNATURE}\n"
       "# This file is a cache directory tag created by pool (openclip-pool): its conversion cache.\n"
       "# For information about cache directory tags see https://bford.info/cachedir/\n")
_SAMPLES = 16
_BLOCK = 4096


# -- identity of a file ---------------------------------------------------------------------------
def identity(info: os.stat_result) -> dict[str, int]:
    """A file's identity as the index records it.

    Args:
        info: the file's ``stat`` (``fstat`` of the descriptor read, or ``lstat`` of an entry).

    Returns:
        Device, inode, size, and mtime and ctime in nanoseconds.
    """
    return {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns}


def sampled_digest(fd: int, size: int) -> str:
    """CRC-32 of each of 16 blocks of 4 KiB spread evenly over the file (first and last included),
    with the size: a content check that costs 16 reads whatever the file's size. It detects change,
    not forgery (only its owner can write the cache). Read from ``fd``, the descriptor the bytes
    were (or are) read from, so that it describes those bytes and not whatever the path names now.

    Args:
        fd: the open file's descriptor.
        size: the file's size in bytes.

    Returns:
        ``"<size in hex>:<16 CRC-32s in hex>"``.
    """
    last = max(0, size - _BLOCK)
    crcs = [zlib.crc32(os.pread(fd, _BLOCK, last * i // (_SAMPLES - 1))) for i in range(_SAMPLES)]
    return f"{size:x}:" + "".join(f"{crc:08x}" for crc in crcs)


def probe(path: Path, *, nofollow: bool = False) -> tuple[dict[str, int], str]:
    """Identity and sampled digest of a regular file, both from one descriptor.

    Args:
        path: the file.
        nofollow: refuse a symbolic link (the cache's own files).

    Returns:
        ``(identity, sampled digest)``.
    """
    with OpenFile(path, nofollow=nofollow) as file:
        return identity(file.info), sampled_digest(file.fd, file.info.st_size)


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two ``stat`` results describe the same file.

    Args:
        a: one ``stat``.
        b: the other.

    Returns:
        True when device and inode match.
    """
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_small(path: Path, limit: int) -> bytes:
    """A small regular file of the cache's own (an index, the tag), opened without following a link.

    Args:
        path: the file.
        limit: the most bytes it may hold.

    Returns:
        Its bytes.

    Raises:
        ValueError: it is larger than ``limit``.
    """
    with OpenFile(path, nofollow=True) as file:
        if file.info.st_size > limit:
            raise ValueError("not a small regular file")
        return file.read_at(0, limit + 1)


# -- the cache's own folder -----------------------------------------------------------------------------
def check_private(folder: Path, info: os.stat_result) -> None:
    """Check ``v1`` (its ``lstat``): a directory, not a link; this user's; writable by no one else.

    Args:
        folder: the cache's ``v1`` folder.
        info: its ``lstat``.

    Raises:
        PermissionError: it is a link, another user's, or writable by others.
        NotADirectoryError: it is no directory.
    """
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


def check_above(folder: Path) -> None:
    """Check every folder above ``folder``, as given and as resolved: this user's or root's, and
    writable by no other user unless sticky (whoever can write a folder on the way can swap what
    follows).

    Args:
        folder: the cache's ``v1`` folder.

    Raises:
        PermissionError: a folder above it fails the check.
    """
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


def key_of(source: Path) -> str:
    """The key of ``source``'s files in the cache: a digest of its path.

    Args:
        source: the checkpoint's resolved path.

    Returns:
        32 hex digits.
    """
    return hashlib.sha256(os.fsencode(source)).hexdigest()[:32]


@contextlib.contextmanager
def locked(folder: Path, key: str, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``key``: ``flock`` of ``<key>.lock`` in ``folder`` (none where fcntl is
    missing).

    Args:
        folder: the cache's ``v1`` folder.
        key: the file's key (`key_of`).
        wait: wait for a lock another process holds; False: do not.

    Yields:
        Whether the lock is held.
    """
    fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
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


def files_of(folder: Path, key: str) -> list[Path]:
    """Every file of the cache's own layout that belongs to ``key``.

    Args:
        folder: the cache's ``v1`` folder.
        key: the file's key (`key_of`).

    Returns:
        Its index, lock, entries and temporary files.
    """
    return [p for p in folder.glob(f"*{key}*")
            if p.name in (f"{key}.json", f"{key}.lock")
            or ((m := ENTRY_NAME.match(p.name) or TMP_NAME.match(p.name)) is not None and m.group(1) == key)]
