"""The small protocol every checkpoint container implements, and what a read returns.

A container module knows one file format's bytes: how to recognise it (`sniff`), how to read it
into tensors without running anything (`read`), how to check its checksums (`integrity`), and a
one-line description. `pool.containers` registers them in one place.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import CheckpointError, amended
from ..records import ModuleInfo, Walked
from ..tensors import TensorSpec, move, move_by_location
from ..transfer import open_regular, pread_into
from ..unpickler import GlobalName, Reader

log = logging.getLogger(__name__)

__all__ = ["Container", "ReadOptions", "Checkpoint", "FileRanges", "map_file", "copy_bytes", "file_storage",
           "listing_globals", "result", "as_text"]


@dataclass(frozen=True)
class ReadOptions:
    """How to read: target ``device`` (None: CPU) or, for a dict ``map_location``, ``locations``
    (saved location -> device), ``mmap`` (None: the container's default), and whether unsafe
    globals are refused (``inspect`` lists them instead)."""

    device: torch.device | None = None
    mmap: bool | None = None
    refuse_unsafe: bool = True
    locations: Mapping[str, torch.device] | None = None

    def place(self, tensors: dict[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
        """The tensors where this read puts them (each storage moved once)."""
        if self.locations is not None:
            return move_by_location(tensors, specs, self.locations)
        return move(tensors, self.device)


@dataclass
class Checkpoint:
    """Everything one read of a checkpoint file yields (public as `pool.checkpoint.Checkpoint`).

    ``state_dict`` is what the pickled module's own ``state_dict()`` returns (or the stored state
    dict); ``modules`` maps each submodule path ("" for the root) to its class and plain
    attributes; ``globals`` lists every global the pickle names, unsafe ones flagged.
    """

    path: Path
    container: str
    state_dict: dict[str, torch.Tensor]
    root_type: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    globals: list[GlobalName] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """Plain attributes of the root module, such as a head's ``normalize`` flag."""
        root = self.modules.get("")
        return dict(root.attributes) if root else {}

    @property
    def unsafe_globals(self) -> list[str]:
        return [str(g) for g in self.globals if g.unsafe]


class Container(Protocol):
    """One file format: its short ``name`` (``zip``, ``legacy``, ...) and its operations."""

    name: str

    def sniff(self, head: bytes, size: int) -> bool:
        """Whether a file of ``size`` bytes starting with ``head`` (up to 512 bytes) is this format."""

    def read(self, path: Path, options: ReadOptions) -> Checkpoint:
        """Read the file's tensors without running anything from it."""

    def integrity(self, path: Path) -> tuple[bool, str]:
        """Check the container's own checksums: (whether it has any, what was checked)."""

    def describe(self) -> str:
        """One line for people: what this format is and who writes it."""

    def diagnose(self, head: bytes, size: int) -> str | None:
        """For a file `sniff` did not accept: why, if it looks like a broken file of this format."""


def as_text(head: bytes) -> str | None:
    """head decoded as UTF-8 if it is printable text (a character cut at the end is allowed)."""
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return None
        decoded = head[:exc.start].decode("utf-8")
    if decoded and all(c.isprintable() or c in "\r\n\t\f\v" for c in decoded):
        return decoded
    return None


def map_file(path: Path) -> memoryview:
    """The file's bytes, memory-mapped copy-on-write (writes never reach the file)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)


class FileRanges:
    """Reads byte ranges of one open file into fresh, aligned CPU storages (``pread``: the bytes
    are copied once from the page cache, and no mapping of them stays resident)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_regular(path)

    def __enter__(self) -> FileRanges:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def storage(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        target = torch.empty(nbytes, dtype=torch.uint8)
        pread_into(self.fd, memoryview(target.numpy()), offset, self.path)
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


@contextlib.contextmanager
def listing_globals(reader: Reader) -> Iterator[None]:
    """Any CheckpointError raised inside carries the globals the reader had seen by then (what
    ``inspect`` lists for a file it cannot read)."""
    try:
        yield
    except CheckpointError as exc:
        if exc.checkpoint_globals:
            raise
        raise amended(exc, checkpoint_globals=reader.named_globals) from exc


def result(path: Path, container: str, walked: Walked, tensors: dict[str, torch.Tensor],
           reader: Reader) -> Checkpoint:
    """The Checkpoint of a pickled container."""
    log.debug("read %s (%s): %d tensors", path, container, len(tensors))
    return Checkpoint(path, container, tensors, walked.root_type, walked.modules, reader.named_globals,
                      wrapper=walked.wrapper)
