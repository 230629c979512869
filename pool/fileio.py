"""A checkpoint file's bytes as CPU storages: the one open file of a read, its copy-on-write
mapping, byte ranges read into private buffers, and storages over bytes already in memory.

The containers read every byte through these (`pool.containers`); bulk reads of many ranges onto
a device are `pool.transfer`'s. Knows files and bytes, nothing of formats.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .transfer import OpenFile, host_buffer, pread_into

__all__ = ["opened", "map_file", "FileRanges", "copy_bytes", "file_storage"]


@contextlib.contextmanager
def opened(path: Path, file: OpenFile | None = None) -> Iterator[OpenFile]:
    """The one open file a read takes every byte from: ``file`` when the caller opened it (left
    open), else ``path`` opened now (closed on leaving).

    Args:
        path: the file.
        file: the caller's open file, or None.

    Yields:
        The `pool.transfer.OpenFile`.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        UnreadableCheckpointError: ``path`` cannot be opened (a symbolic link loop, no permission).
        CheckpointError: ``path`` is no regular file.
    """
    if file is not None:
        yield file
        return
    with OpenFile(path) as own:
        yield own


def map_file(path: Path | OpenFile) -> memoryview:
    """The file's bytes, memory-mapped copy-on-write (writes never reach the file).

    Args:
        path: a regular file, or an `OpenFile` whose descriptor is mapped (and left open).

    Returns:
        A writable memoryview of the mapping (an empty one for an empty file).

    Raises:
        CheckpointError: the path is no longer a regular file.
    """
    given = path if isinstance(path, OpenFile) else None
    with opened(given.path if given is not None else path, given) as file:  # type: ignore[arg-type]
        size = file.size()
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(file.fd, size, access=mmap.ACCESS_COPY))


class FileRanges:
    """Reads byte ranges of one open file into fresh, aligned CPU storages.

    ``pread``: the bytes are copied once from the page cache, and no mapping of them stays
    resident. A context manager: leaving it closes the file it opened (an `OpenFile` given is
    left open for its owner).

    Args:
        path: the file, opened at once (a regular file only); or an `OpenFile` to read from.

    Raises:
        CheckpointError: the path is not a regular file.
    """

    def __init__(self, path: Path | OpenFile) -> None:
        self._own = None if isinstance(path, OpenFile) else OpenFile(path)
        file = path if isinstance(path, OpenFile) else self._own
        self.path = file.path  # type: ignore[union-attr]
        self.fd = file.fd  # type: ignore[union-attr]

    def __enter__(self) -> FileRanges:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.close()

    def storage(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        """``nbytes`` bytes of the file from ``offset``, in a new CPU storage.

        Args:
            offset: where to start reading, in bytes.
            nbytes: how many bytes to read.

        Returns:
            The storage.

        Raises:
            FileChangedError: the file ends before ``offset + nbytes`` (it changed meanwhile).
        """
        target = host_buffer(nbytes)  # large storages: huge pages, as the zip reads get
        pread_into(self.fd, memoryview(target.numpy()), offset, self.path)
        return target.untyped_storage()


def copy_bytes(buffer: memoryview | bytes, start: int, stop: int) -> torch.UntypedStorage:
    """A fresh, aligned CPU storage holding ``buffer[start:stop]``.

    Args:
        buffer: the bytes.
        start: the first byte to copy.
        stop: one past the last byte to copy.

    Returns:
        The new storage.
    """
    array = np.frombuffer(buffer, dtype=np.uint8, count=stop - start, offset=start).copy()
    return torch.from_numpy(array).untyped_storage()


def file_storage(buffer: memoryview) -> torch.UntypedStorage:
    """A CPU storage over a writable (copy-on-write) mapping, without copying.

    Args:
        buffer: a writable memoryview, such as `map_file` returns.

    Returns:
        The storage (an empty one for an empty buffer).
    """
    if len(buffer) == 0:
        return torch.UntypedStorage(0)
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
