"""Checkpoint containers, registered in one place.

Each container is one module implementing `pool.containers.base.Container` (sniff, read,
integrity, diagnose, and a ``description``). Adding a format means adding its module and one line to `REGISTRY`.
Sniffing goes by content, never by file name, in registry order.
"""

from __future__ import annotations

from .base import Checkpoint, Container, ReadOptions
from .legacy import Legacy
from .rawpickle import PlainPickle
from .safetensors_file import Safetensors
from .torchzip import TorchZip

__all__ = ["REGISTRY", "CONTAINERS", "Checkpoint", "Container", "ReadOptions", "by_name", "sniff"]

REGISTRY: tuple[Container, ...] = (TorchZip(), Legacy(), Safetensors(), PlainPickle())
CONTAINERS: tuple[str, ...] = tuple(c.name for c in REGISTRY)
_BY_NAME = {c.name: c for c in REGISTRY}


def by_name(name: str) -> Container:
    """The registered container of a name (what `pool.checkpoint.sniff_container` returns).

    Args:
        name: ``"zip"``, ``"legacy"``, ``"safetensors"`` or ``"pickle"`` (see `CONTAINERS`).

    Returns:
        The container.

    Raises:
        KeyError: no container has that name.

    Example:
        >>> by_name("safetensors").description
        'safetensors (tensors and a JSON header; no pickle)'
    """
    return _BY_NAME[name]


def sniff(head: bytes, size: int) -> Container | None:
    """The container a file's first bytes (and size) say it is, or None.

    Args:
        head: the file's first bytes (up to 512).
        size: the file's size in bytes.

    Returns:
        The first container in `REGISTRY` order whose ``sniff`` accepts the bytes, or None.

    Example:
        >>> sniff(b"PK\\x03\\x04" + bytes(60), 4096).name, sniff(b"hello", 5)
        ('zip', None)
    """
    for container in REGISTRY:
        if container.sniff(head, size):
            return container
    return None
