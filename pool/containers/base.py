"""The small protocol every checkpoint container implements, and what a read returns.

A container module knows one file format's bytes: how to recognise it (`sniff`), how to read it
into tensors without running anything (`read`), how to check its checksums (`integrity`), and a
one-line ``description``. It depends on no pickle module: the safetensors and transformers
containers read through it alone (`pool.containers.pickled` holds what the pickle containers share). `pool.containers` registers them in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..tensors import TensorSpec, move, move_by_location
from ..transfer import OpenFile

if TYPE_CHECKING:  # annotations only: this module depends on no pickle module
    from ..records import ModuleInfo
    from ..unpickler import GlobalName

__all__ = ["Container", "ReadOptions", "Checkpoint"]


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
        description: one line for people: what this format is and who writes it.
    """

    name: str
    description: str

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

    def diagnose(self, head: bytes, size: int) -> str | None:
        """For a file `sniff` did not accept: why, if it looks like a broken file of this format.

        Args:
            head: the file's first bytes (up to 512).
            size: the file's size in bytes.

        Returns:
            What is wrong with it (``"looks like safetensors but ..."``), or None.
        """
