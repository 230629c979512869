"""The small protocol every checkpoint container implements, and what a read returns.

A container module knows one file format's bytes: how to recognise it (`sniff`), how to read it
into tensors without running anything (`read`), how to check its checksums (`integrity`), and a
one-line description. `pool.containers` registers them in one place.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import CheckpointError, amended
from ..records import ModuleInfo, Walked
from ..tensors import TensorSpec, move, move_by_location
from ..transfer import OpenFile, host_buffer, pread_into
from ..unpickler import GlobalName, Reader

log = logging.getLogger(__name__)

__all__ = ["Container", "ReadOptions", "Checkpoint", "FileRanges", "OpenFile", "opened", "map_file", "copy_bytes",
           "file_storage", "listing_globals", "result", "as_text"]


@dataclass(frozen=True)
class ReadOptions:
    """How to read (`pool.checkpoint.read_options` builds it from ``map_location``).

    Attributes:
        device: where every tensor goes; None: the CPU (or ``locations`` decides).
        mmap: map tensors from the file (True: an explicit opt-in, the tensors then die with the
            file) or read them into private memory (None, the default, or False), so that nothing
            a caller holds depends on the file staying as it is (docs/design.md §3.6).
        refuse_unsafe: refuse a file naming unsafe globals (``inspect`` lists them instead).
        locations: for a dict ``map_location``: saved location -> device; a location it does not
            name stays on the CPU. None otherwise.
        allow_globals: exact ``module.name`` globals the user accepts besides the allowlist.
    """

    device: torch.device | None = None
    mmap: bool | None = None
    refuse_unsafe: bool = True
    locations: Mapping[str, torch.device] | None = None
    allow_globals: frozenset[str] = frozenset()

    def reader(self, source: str) -> Reader:
        """The unpickling `pool.unpickler.Reader` of one read under these options.

        Args:
            source: how error messages name the file.

        Returns:
            A new `pool.unpickler.Reader` (its refusal policy and user-allowed globals set).
        """
        return Reader(source, refuse_unsafe=self.refuse_unsafe, allow_globals=self.allow_globals)

    def place(self, tensors: dict[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
        """The tensors where this read puts them (each storage moved once).

        Args:
            tensors: the tensors read, by key.
            specs: their specs, whose storages' saved locations ``locations`` maps.

        Returns:
            A new dict of the tensors on their devices.
        """
        if self.locations is not None:
            return move_by_location(tensors, specs, self.locations)
        return move(tensors, self.device)


@dataclass
class Checkpoint:
    """Everything one read of a checkpoint file yields (public as `pool.checkpoint.Checkpoint`).

    ``state_dict`` is what the pickled module's own ``state_dict()`` returns (or the stored state
    dict); ``modules`` maps each submodule path ("" for the root) to its class and plain
    attributes; ``globals`` lists every global the pickle names, unsafe ones flagged.

    Attributes:
        path: the file (or transformers model folder) read.
        container: its container (``zip``, ``legacy``, ``safetensors``, ``pickle``; ``hf`` for a
            transformers model folder).
        state_dict: the tensors by key.
        root_type: the class of the pickle's root object (``src.modeling.ImageEncoder``,
            ``collections.OrderedDict``), ``"safetensors"`` for safetensors, ``"transformers
            <architecture>"`` for a transformers folder.
        modules: each submodule path ("" for the root) -> `pool.records.ModuleInfo`; empty for a
            state dict.
        globals: every global the pickle names (`pool.unpickler.GlobalName`), unsafe ones flagged.
        metadata: a safetensors file's metadata, plus a transformers folder's ``hf.*`` config
            fields (empty for the other containers).
        wrapper: ``"state_dict"`` when the tensors sat in ``{"state_dict": ...}``, else None.
        cache_entry: the conversion cache's safetensors copy the tensors were read from
            (`pool.cache`), None when they were read from ``path`` itself.
    """

    path: Path
    container: str
    state_dict: dict[str, torch.Tensor]
    root_type: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    globals: list[GlobalName] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None
    cache_entry: Path | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """Plain attributes of the root module, such as a head's ``normalize`` flag."""
        root = self.modules.get("")
        return dict(root.attributes) if root else {}

    @property
    def unsafe_globals(self) -> list[str]:
        """The unsafe globals the file names, as ``module.name`` strings (terminal-safe)."""
        return [str(g) for g in self.globals if g.unsafe]


class Container(Protocol):
    """One file format: its short ``name`` (``zip``, ``legacy``, ...) and its operations.

    Attributes:
        name: the short name `pool.checkpoint.sniff_container` returns.
    """

    name: str

    def sniff(self, head: bytes, size: int) -> bool:
        """Whether a file of ``size`` bytes starting with ``head`` (up to 512 bytes) is this format.

        Args:
            head: the file's first bytes (up to 512).
            size: the file's size in bytes.

        Returns:
            True when the bytes are this format's.
        """

    def read(self, path: Path, options: ReadOptions, file: OpenFile | None = None) -> Checkpoint:
        """Read the file's tensors without running anything from it.

        Args:
            path: the file, which `sniff` accepted (it labels the checkpoint and names the file in
                messages).
            options: where the tensors go, whether to map them, whether unsafe globals are refused.
            file: the file already open (`opened`): every byte is read from its descriptor, never
                from ``path`` reopened; None opens ``path`` once for this read.

        Returns:
            The `Checkpoint`.

        Raises:
            CheckpointError: the file cannot be used; a subclass says why (`CorruptCheckpointError`,
                `UnsafeCheckpointError`).
        """

    def integrity(self, path: Path) -> tuple[bool, str]:
        """Check the container's own checksums: (whether it has any, what was checked).

        Args:
            path: the file.

        Returns:
            ``(checked, detail)``: False and why for a format without checksums.

        Raises:
            CorruptCheckpointError: a checksum (or the header) does not match the bytes.
        """

    def describe(self) -> str:
        """One line for people: what this format is and who writes it.

        Returns:
            The description.
        """

    def diagnose(self, head: bytes, size: int) -> str | None:
        """For a file `sniff` did not accept: why, if it looks like a broken file of this format.

        Args:
            head: the file's first bytes (up to 512).
            size: the file's size in bytes.

        Returns:
            What is wrong with it (``"looks like safetensors but ..."``), or None.
        """


def as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 if it is printable text (a character cut at the end is allowed).

    Args:
        head: a file's first bytes.

    Returns:
        The text (without a character cut off at the end), or None when the bytes are not
        printable UTF-8 text (or empty).

    Example:
        >>> as_text(b"version https://git-lfs"), as_text(b"PK\\x03\\x04")
        ('version https://git-lfs', None)
    """
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return None
        decoded = head[:exc.start].decode("utf-8")
    if decoded and all(c.isprintable() or c in "\r\n\t\f\v" for c in decoded):
        return decoded
    return None


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


@contextlib.contextmanager
def listing_globals(reader: Reader) -> Iterator[None]:
    """Any CheckpointError raised inside carries the globals the reader had seen by then.

    That is what ``inspect`` lists for a file it cannot read. An error that already carries
    globals is re-raised as it is; another is re-raised as an `pool.errors.amended` copy.

    Args:
        reader: the read's `pool.unpickler.Reader`.

    Yields:
        None: the block runs as it is.

    Raises:
        CheckpointError: what the block raised, with ``checkpoint_globals`` set.
    """
    try:
        yield
    except CheckpointError as exc:
        if exc.checkpoint_globals:
            raise
        raise amended(exc, checkpoint_globals=reader.named_globals) from exc


def result(path: Path, container: str, walked: Walked, tensors: dict[str, torch.Tensor],
           reader: Reader) -> Checkpoint:
    """The Checkpoint of a pickled container.

    Args:
        path: the file read.
        container: its container's name.
        walked: what `pool.records.walk` found in its pickle.
        tensors: the tensors, placed.
        reader: the read's reader, whose globals the checkpoint lists.

    Returns:
        The `Checkpoint`.
    """
    log.debug("read %s (%s): %d tensors", path, container, len(tensors))
    return Checkpoint(path, container, tensors, walked.root_type, walked.modules, reader.named_globals,
                      wrapper=walked.wrapper)
