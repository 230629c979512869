"""Integrity checks on checkpoint files, run before loading (``verify``'s default; ``--no-integrity``
skips them).

Each container checks what it can (`pool.containers`): torch zip recomputes every member's CRC32
(torch's own reader never checks them, so flipped bits in tensor data otherwise load as wrong
weights); safetensors checks its header and that the tensors tile the data section up to the
file's end; legacy torch files and plain pickles carry no checksums and are reported as not
checkable. Nothing here unpickles anything.

With ``digest=True`` the file's sha256 is computed too (what ``pool.lock`` records): for a zip it
comes from the same pass over the bytes as the CRC32s (`pool.containers.zipfmt.check_crcs`: each 1 MiB chunk of the
mapped file feeds the sha256 and the CRC32 of the members it overlaps), so a locked verify reads
the file once; other containers are hashed in one sequential pass of their own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import sniff_container
from .containers import by_name
from .containers.hf_folder import NAME as HF_FOLDER
from .containers.hf_folder import weights_file
from .containers.zipfmt import check_crcs, parse_zip
from .fileio import map_file

__all__ = ["IntegrityResult", "check_integrity", "file_digest"]

#: Bytes per chunk of a pass over a file.
_CHUNK = 1 << 20
_ZIP = "zip"


@dataclass(frozen=True)
class IntegrityResult:
    """What was checked: ``checked`` False for containers without checksums.

    Attributes:
        container: the file's container (``zip``, ``legacy``, ``safetensors``, ``pickle``).
        checked: whether the container has checksums (or a header) that were checked.
        detail: what was checked, or why nothing could be.
        sha256: the file's sha256 (of a transformers folder: its weights file's), when asked for.
        size: the file's size in bytes, when ``sha256`` was asked for.
    """

    container: str
    checked: bool
    detail: str
    sha256: str | None = None
    size: int | None = None


def check_integrity(path: str | Path, *, digest: bool = False, crc: bool = True) -> IntegrityResult:
    """Check one checkpoint file's integrity as far as its container allows.

    A torch zip's members are checked against their CRC32s, a safetensors header against the
    file; legacy files and plain pickles have no checksums (``checked`` False). A transformers
    model folder gets its weights file's check. Nothing is unpickled.

    Args:
        path: the checkpoint file, or a transformers model folder.
        digest: also compute the file's sha256 and size (in the same pass as a zip's CRC32s).
        crc: False skips the checks (``verify --no-integrity``): only the digest is computed.

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
    target, prefix = p, ""
    if container == HF_FOLDER:  # a transformers folder: its weights file's own check
        target = weights_file(p)
        prefix = f"{target.name}: "
    kind = sniff_container(target) if target is not p else container
    if kind == _ZIP:
        checked, detail, sha, size = _zip_pass(target, digest=digest, crc=crc)
    else:
        checked, detail = by_name(kind).integrity(target) if crc else (False, "not checked")
        sha, size = file_digest(target) if digest else (None, None)
    if not crc:
        checked, detail = False, "not checked (--no-integrity)"
    return IntegrityResult(container, checked, prefix + detail, sha, size)


def file_digest(path: Path) -> tuple[str, int]:
    """A file's sha256 and size, in one sequential pass over its mapped bytes.

    Args:
        path: a regular file.

    Returns:
        ``(hex digest, size in bytes)``.
    """
    buffer = map_file(path)
    sha = hashlib.sha256()
    for start in range(0, len(buffer), _CHUNK):
        sha.update(buffer[start:start + _CHUNK])
    return sha.hexdigest(), len(buffer)


def _zip_pass(path: Path, *, digest: bool, crc: bool) -> tuple[bool, str, str | None, int | None]:
    """A torch zip's CRC32 check and, with ``digest``, its sha256, from one pass over its bytes
    (`pool.containers.zipfmt.check_crcs`)."""
    if not crc:
        sha_hex, size = file_digest(path) if digest else (None, None)
        return False, "not checked", sha_hex, size
    buffer = map_file(path)
    sha = hashlib.sha256() if digest else None
    archive = parse_zip(buffer, str(path))
    total = check_crcs(buffer, archive, str(path), sha)
    detail = f"{len(archive.members)} zip members, {total:,} bytes: CRC32 ok"
    return True, detail, sha.hexdigest() if sha is not None else None, len(buffer) if digest else None
