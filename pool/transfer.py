"""Bulk transfer of tensor bytes from a checkpoint file to a device.

Copying storage by storage from a memory map costs a page fault per 4 KiB and a pageable copy per
tensor. Here the byte ranges that hold tensor data are read with parallel ``preadv`` calls into a
small ring of pinned staging buffers and copied to one device buffer asynchronously, so file
reads overlap the host-to-device copies; the tensors are then views into that buffer. On a CPU
target the ranges are read straight into the destination.

This module knows file offsets and bytes, nothing of pickles, containers or models.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, FileChangedError, UnreadableCheckpointError, printable

__all__ = ["Span", "read_spans", "OpenFile", "pread_into", "host_buffer"]

log = logging.getLogger(__name__)

_CHUNK = 8 << 20  # bytes per pinned staging buffer
_RING = 8  # staging buffers: chunks being read or copied at once (64 MiB pinned per device)
_PIECE = 32 << 20  # bytes per read call
_STREAMS = 4  # concurrent sequential streams per region read onto the CPU
_HUGE_BUFFER = 8 << 20  # host buffers at least this large ask for transparent huge pages
_MERGE_GAP = 1 << 20  # read across gaps smaller than this rather than splitting the region
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_staging: dict[int, list[tuple[torch.Tensor, torch.cuda.Event]]] = {}


@dataclass(frozen=True)
class Span:
    """``nbytes`` bytes at file ``offset``.

    Attributes:
        offset: where the bytes start in the file.
        nbytes: how many bytes.
    """

    offset: int
    nbytes: int


def _forget_after_fork() -> None:
    """A forked child inherits the executor's state but none of its threads: start afresh."""
    global _executor, _lock
    _executor = None
    _lock = threading.Lock()
    _staging.clear()
    _device_locks.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4),
                                           thread_name_prefix="pool-read")
        return _executor


def open_regular(path: str | os.PathLike[str], *, nofollow: bool = False) -> int:
    """A read-only descriptor of a regular file; a pipe or device swapped in for it is refused.

    The file is opened with ``O_NONBLOCK`` (and ``O_NOCTTY``), so that a pipe or device swapped
    in for it cannot block.

    Args:
        path: the file.
        nofollow: refuse a path whose last name is a symbolic link (``O_NOFOLLOW``): for files in
            the cache's own folder, which never follows links.

    Returns:
        The open file descriptor; the caller closes it.

    Raises:
        FileNotFoundError: nothing is there (`pool.checkpoint` says where to look).
        UnreadableCheckpointError: the path cannot be opened (a symbolic link loop, or a link
            where ``nofollow`` refuses one; no permission; a name too long).
        CheckpointError: the path is not a regular file (any more).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableCheckpointError.from_os_error(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{printable(os.fspath(path))}: is no longer a regular file; it changed while "
                              "being read.")
    return fd


class OpenFile:
    """One open regular file: the descriptor every byte of one read comes from.

    A read that opens its path twice (once to map it, once to read ranges, once more to sample
    it for the cache) can see two files when the path is re-pointed between the opens; here the
    mapping, the preads, the identity (``info``, the ``fstat`` at open) and the cache's sampled
    digest all come from this one descriptor. A context manager: leaving it closes the file
    (mappings made from it stay valid).

    Args:
        path: the file; it names the file in messages (and labels the checkpoint read).
        nofollow: refuse a symbolic link as the last name (see `open_regular`).

    Attributes:
        path: the path it was opened by.
        fd: the descriptor.
        info: ``os.fstat`` of the descriptor when it was opened.

    Raises:
        FileNotFoundError: nothing is there.
        UnreadableCheckpointError: the path cannot be opened.
        CheckpointError: the path is no regular file.
    """

    def __init__(self, path: str | os.PathLike[str], *, nofollow: bool = False) -> None:
        self.path = Path(path)
        self.fd = open_regular(path, nofollow=nofollow)
        self.info = os.fstat(self.fd)

    def __repr__(self) -> str:
        return f"OpenFile({os.fspath(self.path)!r}, fd={self.fd})"

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def size(self) -> int:
        """The file's size now (``fstat`` of the descriptor).

        Returns:
            The size in bytes.
        """
        return os.fstat(self.fd).st_size

    def read_at(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset`` (fewer only at the end of the file).

        Args:
            offset: where to start.
            nbytes: how many bytes at most.

        Returns:
            The bytes read.
        """
        parts = []
        while nbytes > 0:
            part = os.pread(self.fd, min(nbytes, 1 << 30), offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
            nbytes -= len(part)
        return b"".join(parts)


def pread_into(fd: int, buffer: memoryview, offset: int, path: str | os.PathLike[str] = "the file") -> None:
    """Fill ``buffer`` with the file's bytes from ``offset`` (all of them, or FileChangedError).

    Args:
        fd: an open file descriptor.
        buffer: a writable buffer, filled completely.
        offset: where in the file to start.
        path: how the error message names the file.

    Raises:
        FileChangedError: the file ends before the buffer is full (it was truncated or replaced).
    """
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise FileChangedError(
                f"{printable(os.fspath(path))}: ended {len(buffer) - done} bytes early at byte {offset + done} "
                "while being read: it was truncated or replaced meanwhile. Read it again once it is complete.")
        done += n



def host_buffer(nbytes: int) -> torch.Tensor:
    """A fresh, private CPU buffer of ``nbytes`` bytes for a file's bytes (a uint8 tensor).

    Large buffers are an anonymous mapping that asks for transparent huge pages: filling fresh
    memory costs a page fault per page, and with 2 MiB pages instead of 4 KiB ones reading a
    warm 454 MB file into it takes half the time (docs/design.md §3.6). The memory is the
    process's own (never backed by the file): the tensors built on it outlive any change to the
    file. Small buffers, and systems without ``madvise``, get ``torch.empty``.

    Args:
        nbytes: the size in bytes.

    Returns:
        A uint8 CPU tensor of ``nbytes`` elements, page-aligned when large.
    """
    if nbytes < _HUGE_BUFFER or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # transparent huge pages off: ordinary pages, same result
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _parallel_read(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from file ``offset`` with a few concurrent streams, each reading its own
    contiguous part front to back in `_PIECE` calls: sequential streams keep the kernel's readahead
    working on a cold file, and several of them fill fresh memory faster on a warm one."""
    streams = max(1, min(_STREAMS, os.cpu_count() or 1, len(buffer) // _PIECE))
    if streams == 1:
        _read_stream(fd, buffer, offset)
        return
    share = -(-len(buffer) // streams)
    share += -share % 4096  # streams start on page boundaries of the buffer
    parts = [(a, min(len(buffer), a + share)) for a in range(0, len(buffer), share)]
    _wait_all([_pool().submit(_read_stream, fd, buffer[a:b], offset + a) for a, b in parts])


def _read_stream(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``offset``, front to back, `_PIECE` bytes a call."""
    for start in range(0, len(buffer), _PIECE):
        pread_into(fd, buffer[start:start + _PIECE], offset + start)


def _wait_all(futures: Sequence[Future[None]]) -> None:
    """Wait for every read (none may still write once the caller closes the file), then raise the
    first failure."""
    wait(futures)
    for future in futures:
        future.result()


def _regions(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """Merge spans into (start, stop) file regions, bridging small gaps."""
    regions: list[list[int]] = []
    for span in sorted((s for s in spans if s.nbytes > 0), key=lambda s: s.offset):
        end = span.offset + span.nbytes
        if regions and span.offset - regions[-1][1] <= _MERGE_GAP:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([span.offset, end])
    return [(a, b) for a, b in regions]


_device_locks: dict[int, threading.Lock] = {}


def _device_lock(device: torch.device) -> threading.Lock:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        return _device_locks.setdefault(index, threading.Lock())


def _staging_ring(device: torch.device) -> list[tuple[torch.Tensor, torch.cuda.Event]]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _staging:
            _staging[index] = [(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
                               for _ in range(_RING)]
        return _staging[index]


def _fill_cuda(fd: int, regions: list[tuple[int, int]], target: torch.Tensor) -> None:
    """Read ``regions`` into ``target`` through the pinned ring: up to _RING chunks are being read
    by the thread pool while earlier chunks are copied to the device on a side stream."""
    ring = _staging_ring(target.device)
    chunks: list[tuple[int, int, int]] = []  # (file offset, target offset, size)
    position = 0
    for start, stop in regions:
        for chunk in range(start, stop, _CHUNK):
            size = min(_CHUNK, stop - chunk)
            chunks.append((chunk, position, size))
            position += size
    stream = torch.cuda.Stream(device=target.device)
    in_flight: deque[tuple[int, list]] = deque()

    def submit(i: int) -> None:
        staging, copied = ring[i % _RING]
        copied.synchronize()  # the last copy out of this buffer has finished
        offset, _, size = chunks[i]
        view = memoryview(staging.numpy())
        futures = [_pool().submit(pread_into, fd, view[a:min(size, a + _PIECE)], offset + a)
                   for a in range(0, size, _PIECE)]
        in_flight.append((i, futures))

    for i in range(min(_RING, len(chunks))):
        submit(i)
    following = len(in_flight)
    try:
        _drain(in_flight, ring, chunks, target, stream, submit, following)
    finally:
        for _, futures in in_flight:  # on failure: no read may still write into a staging buffer
            wait(futures)
    stream.synchronize()


def _drain(in_flight: deque, ring: list, chunks: list, target: torch.Tensor, stream: torch.cuda.Stream,
           submit: Callable[[int], None], following: int) -> None:
    while in_flight:
        i, futures = in_flight.popleft()
        _wait_all(futures)
        staging, copied = ring[i % _RING]
        _, position, size = chunks[i]
        with torch.cuda.stream(stream):
            target[position:position + size].copy_(staging[:size], non_blocking=True)
            copied.record(stream)
        if following < len(chunks):
            submit(following)
            following += 1


def read_spans(path: str | os.PathLike[str] | OpenFile, spans: Sequence[Span],
               device: torch.device | str) -> list[torch.UntypedStorage]:
    """Read each span of ``path`` onto ``device``; returns one storage per span, in order.

    The storages are slices of one device buffer holding the merged regions. Onto CUDA the reads
    go through a ring of pinned staging buffers and overlap the host-to-device copies; on the CPU
    the ranges are read straight into the buffer, in parallel.

    Args:
        path: the file, or an `OpenFile` whose descriptor is read (and left open).
        spans: the byte ranges to read (they may overlap or leave gaps).
        device: where the bytes go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Returns:
        One ``torch.UntypedStorage`` per span, in the order of ``spans`` (an empty one for an
        empty span).

    Raises:
        CheckpointError: the path is not a regular file.
        FileChangedError: the file ended early while it was read.
    """
    device = torch.device(device)
    regions = _regions(spans)
    total = sum(b - a for a, b in regions)
    buffer = torch.empty(total, dtype=torch.uint8, device=device) if device.type != "cpu" else host_buffer(total)
    owned = not isinstance(path, OpenFile)
    fd = open_regular(Path(path)) if owned else path.fd  # type: ignore[arg-type,union-attr]
    try:
        if device.type == "cuda":
            with _device_lock(buffer.device):  # one staging ring per device: one reader at a time
                _fill_cuda(fd, regions, buffer)
        else:
            view = memoryview(buffer.numpy())
            position = 0
            for start, stop in regions:
                _parallel_read(fd, view[position:position + stop - start], start)
                position += stop - start
    finally:
        if owned:
            os.close(fd)
    base: dict[int, int] = {}
    position = 0
    for start, stop in regions:
        base[start] = position
        position += stop - start
    starts = sorted(base)
    storage = buffer.untyped_storage()
    out = []
    for span in spans:
        if span.nbytes == 0:
            out.append(torch.UntypedStorage(0, device=device))
            continue
        region = starts[bisect.bisect_right(starts, span.offset) - 1]
        first = base[region] + span.offset - region
        out.append(storage[first:first + span.nbytes])
    log.debug("read %d bytes in %d regions from %s to %s", total, len(regions), path, device)
    return out
