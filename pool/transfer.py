"""Bulk transfer of tensor bytes from a checkpoint file to a device, in the background.

Copying storage by storage from a memory map costs a page fault per 4 KiB and a pageable copy per
tensor. Here the byte ranges that hold tensor data are merged into regions and cut into chunks,
which a few worker threads read with one ``preadv`` each:

* onto the CPU, straight into one destination buffer;
* onto CUDA, into a ring of pinned staging buffers (each worker owns some of them; 16 of 4 MiB per
  device by default, kept for later reads, one read at a time per device); each chunk is copied to
  one device buffer on a side stream as soon as it is read, so the reads of some chunks overlap
  the host-to-device copies of others.

The tensors are then views into that one buffer. `start_read` returns at once with a
`PendingRead`, so the caller can work meanwhile (`pool.containers.torchzip` parses the pickle while
the records' bytes travel), then either takes the storages (`PendingRead.result`, which may name
the spans still wanted: chunks of the others not yet read are skipped, and a buffer left mostly
unwanted is compacted) or drops them (`PendingRead.cancel`: when it returns, no read runs any more
and the buffer is released). While such a read runs beside the caller's work, the interpreter's
thread switch interval is lowered (`TransferSettings.switch_interval`): each worker needs the GIL
for a moment per chunk, and a caller busy in pure Python would otherwise hand it over only every
5 ms. Each read gives its share back when it is taken, cancelled or done, whichever comes first,
and the last one restores the interval it found. `read_spans` is a read waited for at once, the
calling thread reading too.

This module knows file offsets and bytes, nothing of pickles, containers or models.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, printable

__all__ = ["Span", "TransferSettings", "PendingRead", "start_read", "read_spans", "configure", "settings",
           "active_reads", "open_regular", "pread_into", "FileChangedError"]

log = logging.getLogger(__name__)

_MERGE_GAP = 1 << 20  # read across gaps smaller than this rather than splitting the region
_ALIGN = 64  # a region starts in the buffer at the same address modulo this as in the file
_WASTE = 8  # compact a buffer whose unwanted bytes exceed 1/_WASTE of it
_MAX_WORKERS = 64  # threads of the shared pool

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_rings: dict[tuple[str, int], list[tuple[torch.Tensor, memoryview, Any]]] = {}
_device_locks: dict[tuple[str, int], threading.Lock] = {}
_active: set[PendingRead] = set()
_switch_users = 0  # background reads holding the switch interval lowered
_switch_saved = 0.005  # the interval the first of them found


def _default_threads() -> int:
    return min(16, os.cpu_count() or 4)


@dataclass(frozen=True)
class TransferSettings:
    """How reads are cut and run; `configure` changes the settings in use, `settings` returns them.

    Attributes:
        chunk: bytes per read call, and per staging buffer onto CUDA.
        ring: pinned staging buffers per CUDA device (``ring * chunk`` bytes, kept for later reads).
        threads: worker threads per read (at most one per chunk, and at most ``ring`` onto CUDA).
        switch_interval: the interpreter's thread switch interval, in seconds, while a read runs
            beside the caller's work (never raised above what it was); None leaves it alone.
        stage_cpu: read CPU targets through a (pageable) staging ring too, as CUDA targets are:
            runs that pipeline without a GPU (tests, benchmark smoke runs).
    """

    chunk: int = 4 << 20
    ring: int = 16
    threads: int = field(default_factory=_default_threads)
    switch_interval: float | None = 2e-4
    stage_cpu: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk", "ring", "threads"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"TransferSettings.{name} must be a positive integer, not {value!r}")
        if self.switch_interval is not None and not self.switch_interval > 0:
            raise ValueError(f"TransferSettings.switch_interval must be positive or None, not {self.switch_interval!r}")


_settings = TransferSettings()


def settings() -> TransferSettings:
    """The settings reads use now.

    Returns:
        The current `TransferSettings`.
    """
    return _settings


def configure(**changes: Any) -> TransferSettings:
    """Change the settings later reads use (process-wide); reads already running keep theirs.

    Args:
        **changes: `TransferSettings` fields and their new values (``chunk=8 << 20``, ...).

    Returns:
        The settings in use before the change (``configure(**vars(old))`` restores them).

    Raises:
        TypeError: a name that is no `TransferSettings` field.
        ValueError: a value out of range.

    Example:
        >>> from pool import transfer
        >>> old = transfer.configure(chunk=8 << 20)
        >>> transfer.settings().chunk
        8388608
        >>> _ = transfer.configure(**vars(old))
    """
    global _settings
    old = _settings
    _settings = replace(old, **changes)
    return old


def active_reads() -> int:
    """How many reads have workers still running (in this process).

    Returns:
        The count; 0 once every read has finished, was taken or was cancelled.
    """
    with _lock:
        return len(_active)


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
    """A forked child inherits the module's state but none of its threads: start afresh."""
    global _executor, _lock, _switch_users
    _executor = None
    _lock = threading.Lock()
    _rings.clear()
    _device_locks.clear()
    _active.clear()
    if _switch_users:
        sys.setswitchinterval(_switch_saved)
    _switch_users = 0


os.register_at_fork(after_in_child=_forget_after_fork)


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="pool-read")
        return _executor


class FileChangedError(CheckpointError):
    """The file ended early while being read: it was truncated or replaced meanwhile."""


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of a regular file; a pipe or device swapped in for it is refused.

    The file is opened with ``O_NONBLOCK`` (and ``O_NOCTTY``), so that a pipe or device swapped
    in for it cannot block.

    Args:
        path: the file.

    Returns:
        The open file descriptor; the caller closes it.

    Raises:
        CheckpointError: the path is not a regular file (any more).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{printable(os.fspath(path))}: is no longer a regular file; it changed while "
                              "being read.")
    return fd


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


def _regions(spans: Sequence[Span], gap: int | None = None) -> list[tuple[int, int]]:
    """Merge spans into (start, stop) file regions, bridging gaps up to ``gap`` (_MERGE_GAP)."""
    gap = _MERGE_GAP if gap is None else gap
    regions: list[list[int]] = []
    for span in sorted((s for s in spans if s.nbytes > 0), key=lambda s: s.offset):
        end = span.offset + span.nbytes
        if regions and span.offset - regions[-1][1] <= gap:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([span.offset, end])
    return [(a, b) for a, b in regions]


def _layout(regions: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], int]:
    """(start, stop, buffer position) per region, each placed at its file address modulo _ALIGN
    (a storage aligned in the file stays aligned in the buffer), and the buffer's size."""
    out, position = [], 0
    for start, stop in regions:
        position += (start - position) % _ALIGN
        out.append((start, stop, position))
        position += stop - start
    return out, position


def _device_key(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return (device.type, device.index or 0)


def _device_lock(key: tuple[str, int]) -> threading.Lock:
    with _lock:
        return _device_locks.setdefault(key, threading.Lock())


class _HostEvent:
    """An event of a CPU 'copy', which is done when it returns."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass


def _staging_ring(key: tuple[str, int], chunk: int, ring: int) -> list[tuple[torch.Tensor, memoryview, Any]]:
    """The device's staging buffers (pinned onto CUDA), made anew when the settings changed; the
    caller holds the device's lock, so no other read uses them meanwhile."""
    with _lock:
        slots = _rings.get(key)
    if slots is None or len(slots) != ring or slots[0][0].numel() != chunk:
        cuda = key[0] == "cuda"
        slots = []
        for _ in range(ring):
            staging = torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda)
            slots.append((staging, memoryview(staging.numpy()), torch.cuda.Event() if cuda else _HostEvent()))
        with _lock:
            _rings[key] = slots
    return slots


def _lower_switching(interval: float) -> None:
    global _switch_users, _switch_saved
    with _lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _switch_saved))
        _switch_users += 1


def _restore_switching() -> None:
    global _switch_users
    with _lock:
        if _switch_users > 0:  # (0 in a forked child, whose reads were forgotten)
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class PendingRead:
    """A read of byte ranges of a file onto a device, running in the background (`start_read`).

    Exactly one of `result` or `cancel` should follow; either waits for the workers. Should
    neither be called, the workers still end on their own, closing the file and releasing what
    they held; the buffer goes when this object does.

    Args:
        path: the file (a regular file, opened at once).
        spans: the byte ranges to read (they may overlap or leave gaps).
        device: where the bytes go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        settings: how to cut and run the read; None: `settings()`.
        concurrent: whether the caller works while the read runs (the switch interval is lowered
            until `result` or `cancel`); False: the calling thread reads too and the read is
            finished when the object is made.

    Raises:
        CheckpointError: the path is not a regular file.
    """

    def __init__(self, path: str | os.PathLike[str], spans: Sequence[Span], device: torch.device | str,
                 settings: TransferSettings | None = None, *, concurrent: bool = True) -> None:
        s = settings if settings is not None else _settings
        self.path = Path(path)
        self.device = torch.device(device)
        self._spans = list(spans)
        self._layout, total = _layout(_regions(self._spans))
        self._starts = [start for start, _, _ in self._layout]
        self._chunks = [(offset, position + offset - start, min(s.chunk, stop - offset))
                        for start, stop, position in self._layout for offset in range(start, stop, s.chunk)]
        self._next = 0
        self._take = threading.Lock()  # hands out chunks
        self._state = threading.Lock()  # guards _error, _running, _switching
        self._error: BaseException | None = None
        self._cancelled = False
        self._wanted: tuple[list[int], list[int]] | None = None
        self._done = threading.Event()
        self._switching = False
        self._held: threading.Lock | None = None
        self._stream: Any = None
        self._fd = open_regular(self.path)
        try:
            self._buffer: torch.Tensor | None = torch.empty(total, dtype=torch.uint8, device=self.device)
            staged = self.device.type == "cuda" or (s.stage_cpu and self.device.type == "cpu")
            workers = min(s.threads, len(self._chunks), s.ring if staged else len(self._chunks))
            groups: list[Any] = [None] * workers
            if staged and workers:
                key = _device_key(self._buffer.device)
                self._held = _device_lock(key)
                self._held.acquire()  # one staging ring per device: one staged read at a time
                ring = _staging_ring(key, s.chunk, s.ring)
                groups = [ring[w::workers] for w in range(workers)]
                if key[0] == "cuda":
                    self._stream = torch.cuda.Stream(device=self._buffer.device)
                    # the buffer may reuse memory the caller's stream still reads: the copies wait for it
                    self._stream.wait_stream(torch.cuda.current_stream(self._buffer.device))
            else:
                self._view = memoryview(self._buffer.numpy()) if workers else memoryview(b"")
        except BaseException:
            self._release()
            raise
        self._running = workers
        if not workers:
            self._finish()
            return
        with _lock:
            _active.add(self)
        if concurrent and s.switch_interval is not None:
            self._switching = True
            _lower_switching(s.switch_interval)
        inline = None if concurrent else groups.pop()
        for slots in groups:
            try:
                _pool().submit(self._work, slots)
            except RuntimeError as exc:  # the pool is shut down (interpreter exit): this worker never runs
                self._fail(exc)
                self._ended()
        if not concurrent:
            self._work(inline)
        log.debug("reading %d bytes in %d regions, %d chunks, %d workers: %s -> %s",
                  total, len(self._layout), len(self._chunks), workers, self.path, self.device)

    # -- the workers ---------------------------------------------------------------------------
    def _work(self, slots: list[tuple[torch.Tensor, memoryview, Any]] | None) -> None:
        try:
            if slots is None:
                self._read_direct()
            else:
                self._read_staged(slots)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._fail(exc)
        finally:
            self._ended()

    def _next_chunk(self) -> tuple[int, int, int] | None:
        with self._take:
            while self._next < len(self._chunks) and not self._cancelled:
                chunk = self._chunks[self._next]
                self._next += 1
                if not self._unwanted(chunk[0], chunk[2]):
                    return chunk
            return None

    def _unwanted(self, offset: int, size: int) -> bool:
        wanted = self._wanted
        if wanted is None:
            return False
        starts, stops = wanted
        j = bisect.bisect_left(starts, offset + size) - 1  # the last wanted range starting before its end
        return j < 0 or stops[j] <= offset

    def _read_direct(self) -> None:
        while (chunk := self._next_chunk()) is not None:
            offset, position, size = chunk
            pread_into(self._fd, self._view[position:position + size], offset, self.path)

    def _read_staged(self, slots: list[tuple[torch.Tensor, memoryview, Any]]) -> None:
        buffer = self._buffer
        assert buffer is not None
        context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        turn = 0
        with context:
            while (chunk := self._next_chunk()) is not None:
                offset, position, size = chunk
                staging, view, copied = slots[turn % len(slots)]
                turn += 1
                if not copied.query():  # (query holds on to the GIL; synchronize lets go of it)
                    copied.synchronize()  # the last copy out of this staging buffer has finished
                pread_into(self._fd, view[:size], offset, self.path)
                buffer[position:position + size].copy_(staging[:size], non_blocking=True)
                copied.record(self._stream)

    def _fail(self, exc: BaseException) -> None:
        with self._state:
            if self._error is None:
                self._error = exc
        self._cancelled = True

    def _ended(self) -> None:
        with self._state:
            self._running -= 1
            last = self._running == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        """The last worker is done: wait for the copies, then release the file, ring and interval."""
        try:
            if self._stream is not None:
                self._stream.synchronize()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._fail(exc)
        finally:
            self._release()
            with _lock:
                _active.discard(self)
            self._done.set()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._held is not None:
            self._held.release()
            self._held = None
        self._end_switching()

    def _end_switching(self) -> None:
        with self._state:
            switching, self._switching = self._switching, False
        if switching:
            _restore_switching()

    # -- the caller ----------------------------------------------------------------------------
    def result(self, keep: Sequence[int] | None = None) -> list[torch.UntypedStorage]:
        """Wait for the read; one storage per span kept, views of one buffer on the device.

        Naming the spans still wanted lets the read skip the chunks of the others it has not read
        yet; if the buffer then holds more than 1/8 unwanted bytes, the wanted ones are copied
        into a buffer of their own (on the device), so the views keep no unwanted bytes alive.

        Args:
            keep: indices into the spans given, in the order the storages should come; None:
                every span, in order.

        Returns:
            One ``torch.UntypedStorage`` per kept span (an empty one for an empty span).

        Raises:
            FileChangedError: the file ended early while it was read.
            RuntimeError: the result was taken already, or the read was cancelled.
        """
        if keep is not None:
            keep = list(keep)
            wanted = _regions([self._spans[i] for i in keep], gap=0)
            self._wanted = ([a for a, _ in wanted], [b for _, b in wanted])
        self._end_switching()
        self._done.wait()
        if self._error is not None:
            self._buffer = None
            raise self._error
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            raise RuntimeError("PendingRead.result: the storages were taken already, or the read was cancelled")
        layout, starts = self._layout, self._starts
        chosen = self._spans if keep is None else [self._spans[i] for i in keep]
        if keep is not None:
            kept = _regions(chosen, gap=0)
            if (buffer.numel() - sum(b - a for a, b in kept)) * _WASTE > buffer.numel():
                buffer, layout = _compact(buffer, layout, starts, kept)
                starts = [start for start, _, _ in layout]
        return _views(buffer, layout, starts, chosen)

    def cancel(self) -> None:
        """Stop reading: skip the chunks not started, wait for the reads running, drop the buffer.

        When it returns, no worker of this read runs any more, the file is closed and the device
        buffer is no longer referenced from here. Calling it again, or after `result`, does nothing.
        """
        self._cancelled = True
        self._end_switching()
        self._done.wait()
        self._buffer = None


def _compact(buffer: torch.Tensor, layout: list[tuple[int, int, int]], starts: list[int],
             kept: list[tuple[int, int]]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The ``kept`` file ranges copied out of ``buffer`` into a buffer of their own."""
    new_layout, total = _layout(kept)
    target = torch.empty(total, dtype=torch.uint8, device=buffer.device)
    for start, stop, position in new_layout:
        old_start, _, old_position = layout[bisect.bisect_right(starts, start) - 1]
        source = old_position + start - old_start
        target[position:position + stop - start].copy_(buffer[source:source + stop - start])
    return target, new_layout


def _views(buffer: torch.Tensor, layout: list[tuple[int, int, int]], starts: list[int],
           spans: Sequence[Span]) -> list[torch.UntypedStorage]:
    storage = buffer.untyped_storage()
    out = []
    for span in spans:
        if span.nbytes == 0:
            out.append(torch.UntypedStorage(0, device=buffer.device))
            continue
        start, _, position = layout[bisect.bisect_right(starts, span.offset) - 1]
        first = position + span.offset - start
        out.append(storage[first:first + span.nbytes])
    return out


def start_read(path: str | os.PathLike[str], spans: Sequence[Span], device: torch.device | str, *,
               settings: TransferSettings | None = None) -> PendingRead:
    """Start reading each span of ``path`` onto ``device`` in the background; returns at once.

    Args:
        path: the file.
        spans: the byte ranges to read (they may overlap or leave gaps).
        device: where the bytes go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        settings: how to cut and run the read; None: `settings()`.

    Returns:
        The `PendingRead`: call its ``result`` (the storages) or its ``cancel``.

    Raises:
        CheckpointError: the path is not a regular file.

    Example:
        >>> import tempfile, torch
        >>> from pool.transfer import Span, start_read
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     _ = f.write(b"0123456789")
        ...     f.flush()
        ...     pending = start_read(f.name, [Span(2, 3), Span(7, 2)], "cpu")
        ...     (storage,) = pending.result(keep=[1])  # only the second span is still wanted
        >>> torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()
        b'78'
    """
    return PendingRead(path, spans, device, settings)


def read_spans(path: str | os.PathLike[str], spans: Sequence[Span], device: torch.device | str, *,
               settings: TransferSettings | None = None) -> list[torch.UntypedStorage]:
    """Read each span of ``path`` onto ``device``; returns one storage per span, in order.

    The storages are slices of one device buffer holding the merged regions. Onto CUDA the reads
    go through a ring of pinned staging buffers and overlap the host-to-device copies; on the CPU
    the ranges are read straight into the buffer, in parallel (see the module docstring).

    Args:
        path: the file.
        spans: the byte ranges to read (they may overlap or leave gaps).
        device: where the bytes go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        settings: how to cut and run the read; None: `settings()`.

    Returns:
        One ``torch.UntypedStorage`` per span, in the order of ``spans`` (an empty one for an
        empty span).

    Raises:
        CheckpointError: the path is not a regular file.
        FileChangedError: the file ended early while it was read.
    """
    return PendingRead(path, spans, device, settings, concurrent=False).result()
