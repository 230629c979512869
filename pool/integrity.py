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
from .containers.hf_folder import NAME as HF_FOLDER
from .containers.hf_folder import weights_file

__all__ = ["IntegrityResult", "check_integrity"]


@dataclass(frozen=True)
class IntegrityResult:
    """What was checked: ``checked`` False for containers without checksums.

    Attributes:
        container: the file's container (``zip``, ``legacy``, ``safetensors``, ``pickle``).
        checked: whether the container has checksums (or a header) that were checked.
        detail: what was checked, or why nothing could be.
    """

    container: str
    checked: bool
    detail: str


def check_integrity(path: str | Path) -> IntegrityResult:
    """Check one checkpoint file's integrity as far as its container allows.

    A torch zip's members are checked against their CRC32s, a safetensors header against the
    file; legacy files and plain pickles have no checksums (``checked`` False). A transformers
    model folder gets its weights file's check. Nothing is unpickled.

    Args:
        path: the checkpoint file, or a transformers model folder.

    Returns:
        The `IntegrityResult`; a check that fails raises instead.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CorruptCheckpointError: a checksum or the header does not match the bytes, or the file
            is no known container (or a directory that is no transformers model folder, a pipe
            or device, or empty), or a folder holds only a sharded model.
        CheckpointError: a tar archive.

    Example:
        >>> from pool.integrity import check_integrity
        >>> check_integrity("finetuned.pt").checked  # doctest: +SKIP
        True
    """
    p = Path(path)
    container = sniff_container(p)
    if container == HF_FOLDER:  # a transformers folder: its weights file's own check
        weights = weights_file(p)
        checked, detail = by_name(sniff_container(weights)).integrity(weights)
        return IntegrityResult(container, checked, f"{weights.name}: {detail}")
    checked, detail = by_name(container).integrity(p)
    return IntegrityResult(container, checked, detail)
