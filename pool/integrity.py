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

import json
import logging
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import sniff_container
from .errors import CorruptCheckpointError

__all__ = ["IntegrityResult", "check_integrity", "check_zip", "check_safetensors"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# safetensors dtype names -> bytes per element
_ST_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
                  "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
                  "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100 * 1024 * 1024


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
    """Parse the header and check every tensor's byte range against dtype, shape and file size."""
    size = path.stat().st_size

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{path}: safetensors header check failed: {why}. The file is truncated or damaged: "
            "download it again.")

    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"the file has only {size} bytes")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER):
            raise bad(f"the header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("__metadata__ is not a mapping of strings to strings")
    data_len = size - 8 - n
    ranges = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPE_BITS:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        nbits = math.prod(shape) * _ST_DTYPE_BITS[dtype]
        expected = (nbits + 7) // 8
        if offsets[1] - offsets[0] != expected:
            raise bad(f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]}")
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    end = 0
    for begin, stop, name in ranges:
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin} of the data, expected {end} "
                      "(overlapping tensors or a gap)")
        end = stop
    if end != data_len:
        raise bad(f"the tensors end at data byte {end} but the data section has {data_len} bytes "
                  f"({'truncated' if end > data_len else 'trailing bytes'})")
    return f"{len(ranges)} tensors, header and offsets ok ({data_len:,} data bytes)"


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
