"""Integrity checks on checkpoint files, run before loading (``verify --integrity``).

Each container checks what it can (`pool.containers`): torch zip recomputes every member's CRC32
(torch's own reader never checks them, so flipped bits in tensor data otherwise load as wrong
weights); safetensors checks its header and that the tensors tile the data section up to the
file's end; legacy torch files and plain pickles carry no checksums and are reported as not
checkable. Nothing here unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import sniff_container
from .containers import by_name

__all__ = ["IntegrityResult", "check_integrity"]


@dataclass(frozen=True)
class IntegrityResult:
    """What was checked: ``checked`` False for containers without checksums."""

    container: str
    checked: bool
    detail: str


def check_integrity(path: str | Path) -> IntegrityResult:
    """Check one checkpoint file's integrity as far as its container allows."""
    p = Path(path)
    container = sniff_container(p)
    checked, detail = by_name(container).integrity(p)
    return IntegrityResult(container, checked, detail)
