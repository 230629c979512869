"""The small protocol every checkpoint container implements, and what a read returns.

A container module knows one file format's bytes: how to recognise it (`sniff`), how to read it
into tensors without running anything (`read`), how to check its checksums (`integrity`), and a
one-line description. `pool.containers` registers them in one place.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..records import ModuleInfo
from ..unpickler import GlobalName

__all__ = ["Container", "ReadOptions", "ReadResult", "FileRanges", "map_file", "copy_bytes", "file_storage"]


@dataclass(frozen=True)
class ReadOptions:
    """How to read: target ``device`` (None: CPU), ``mmap`` (None: the container's default),
    and whether unsafe globals are refused (``inspect`` lists them instead)."""

    device: torch.device | None = None
    mmap: bool | None = None
    refuse_unsafe: bool = True


@dataclass
class ReadResult:
    """What one container read yields (see `pool.checkpoint.Checkpoint`)."""

    tensors: dict[str, torch.Tensor]
    root_type: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    globals: list[GlobalName] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None


class Container(Protocol):
    """One file format: its short ``name`` (``zip``, ``legacy``, ...) and four operations."""

    name: str

    def sniff(self, head: bytes, size: int) -> bool:
        """Whether a file of ``size`` bytes starting with ``head`` (up to 512 bytes) is this format."""

    def read(self, path: Path, options: ReadOptions) -> ReadResult:
        """Read the file's tensors without running anything from it."""

    def integrity(self, path: Path) -> tuple[bool, str]:
        """Check the container's own checksums: (whether it has any, what was checked)."""

    def describe(self) -> str:
        """One line for people: what this format is and who writes it."""


def map_file(path: Path) -> memoryview:
    """The file's bytes, memory-mapped copy-on-write (writes never reach the file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    return memoryview(mapped)


class FileRanges:
    """Reads byte ranges of one open file into fresh, aligned CPU storages (``pread``: the bytes
    are copied once from the page cache, and no mapping of them stays resident)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def __enter__(self) -> FileRanges:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def storage(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        target = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(target.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise EOFError(f"the file ended {nbytes - done} bytes early (it changed while being read)")
            done += n
        return target.untyped_storage()


def copy_bytes(buffer: memoryview | bytes, start: int, stop: int) -> torch.UntypedStorage:
    """A fresh, aligned CPU storage holding ``buffer[start:stop]``."""
    array = np.frombuffer(buffer, dtype=np.uint8, count=stop - start, offset=start).copy()
    return torch.from_numpy(array).untyped_storage()


def file_storage(buffer: memoryview) -> torch.UntypedStorage:
    """A CPU storage over a writable (copy-on-write) mapping, without copying."""
    if len(buffer) == 0:
        return torch.UntypedStorage(0)
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
