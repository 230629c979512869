"""Integrity checks on checkpoint files, run before loading (``verify --integrity``).

* torch zip: every member's CRC32 is recomputed over its bytes (torch's own reader does not check
  it, so flipped bits in tensor data otherwise load as wrong weights);
* safetensors: the header is parsed and every tensor's byte range is checked against its dtype
  and shape, the ranges must tile the data section and the data section must end at the file's
  end (a truncated or padded file fails);
* legacy torch files and plain pickles carry no checksums: reported as not checkable.

Nothing here unpickles anything.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import sniff_container
from .errors import CorruptCheckpointError
from .layout import safetensors_entries

__all__ = ["IntegrityResult", "check_integrity", "check_zip", "check_safetensors"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
@dataclass(frozen=True)
class IntegrityResult:
    """What was checked: ``checked`` False for containers without checksums."""

    container: str
    checked: bool
    detail: str


def check_zip(path: Path) -> str:
    """Recompute every member's CRC32; raise CorruptCheckpointError naming the first bad one."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpointError(
            f"{path}: a zip archive that cannot be opened ({exc}); the file is truncated or "
            "damaged: download it again.") from None
    with zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            crc = 0
            try:
                with zf.open(info) as member:
                    member._expected_crc = None  # compute it here, to name the member in the error
                    while chunk := member.read(_CHUNK):
                        crc = zlib.crc32(chunk, crc)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
                raise CorruptCheckpointError(
                    f"{path}: zip member {info.filename} cannot be read ({exc}); the file is "
                    "truncated or damaged: download it again.") from None
            if crc != info.CRC:
                raise CorruptCheckpointError(
                    f"{path}: zip member {info.filename} ({info.file_size} bytes) fails its CRC32 "
                    f"check (stored {info.CRC:08x}, computed {crc:08x}): its bytes changed after "
                    "it was written (disk or transfer damage), so it would load wrong weights. "
                    "Download the file again and compare its sha256 with the source.")
            total += info.file_size
    return f"{len(infos)} zip members, {total:,} bytes: CRC32 ok"


def check_safetensors(path: Path) -> str:
    """Check the header (`pool.layout.safetensors_entries`), then that the tensors' byte ranges
    tile the data section exactly, up to the file's end."""
    entries, _ = safetensors_entries(path)
    with open(path, "rb") as f:
        data_start = end = 8 + int.from_bytes(f.read(8), "little")
    for entry in sorted(entries, key=lambda e: e.offset):
        if entry.offset != end:
            raise CorruptCheckpointError(
                f"{path}: safetensors header check failed: tensor {entry.name!r} starts at byte "
                f"{entry.offset}, expected {end} (overlapping tensors or a gap). The file is damaged: "
                "download it again.")
        end = entry.offset + entry.nbytes
    size = path.stat().st_size
    if end != size:
        raise CorruptCheckpointError(
            f"{path}: safetensors header check failed: the tensors end at byte {end} but the file has "
            f"{size} bytes (trailing bytes). The file is damaged: download it again.")
    return f"{len(entries)} tensors, header and offsets ok ({end - data_start:,} data bytes)"


def check_integrity(path: str | Path) -> IntegrityResult:
    """Check one checkpoint file's integrity as far as its container allows."""
    p = Path(path)
    container = sniff_container(p)
    if container == "zip":
        return IntegrityResult(container, True, check_zip(p))
    if container == "safetensors":
        return IntegrityResult(container, True, check_safetensors(p))
    return IntegrityResult(container, False,
                           f"a {container} container stores no checksums: integrity not checkable")
