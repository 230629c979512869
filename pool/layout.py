"""Where tensor bytes sit inside a checkpoint file, read from the container's own index.

* torch zip: each storage is an uncompressed member ``<archive>/data/<key>``; its bytes start
  after the member's local header, found from the central directory.
* safetensors: an 8-byte header length, a JSON header with ``dtype``, ``shape`` and
  ``data_offsets`` per tensor, then the data.

Used by the bulk transfer path (`pool.transfer`) and by integrity checks. No pickles here.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpointError

__all__ = ["ZipRecord", "ZipIndex", "zip_index", "zip_records", "SafetensorsEntry", "safetensors_entries",
           "contiguous_strides", "SAFETENSORS_DTYPES", "SAFETENSORS_DTYPE_BITS"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


@dataclass(frozen=True)
class ZipRecord:
    """One storage record of a torch zip file: its key, data offset, size and CRC32."""

    key: str
    offset: int
    nbytes: int
    crc32: int
    name: str


@dataclass(frozen=True)
class ZipIndex:
    """A torch zip file's member names, its storage records by key, and its pickle's bytes."""

    names: tuple[str, ...]
    records: dict[str, ZipRecord]
    pickle: bytes | None


def zip_index(path: str | Path, *, read_pickle: bool = True, offsets: bool = True) -> ZipIndex:
    """Index a torch zip checkpoint: members, ``data/<key>`` records with data offsets, data.pkl.

    ``offsets=False`` skips reading each member's local header (the records' ``offset`` is -1):
    enough for size checks, one seek per record cheaper.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            infos = zf.infolist()
            records: dict[str, ZipRecord] = {}
            pickle_info = None
            for info in infos:
                parts = info.filename.split("/")
                if parts[-1] == "data.pkl" and len(parts) <= 2:
                    pickle_info = info
                if len(parts) < 2 or parts[-2] != "data":
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CorruptCheckpointError(f"{path}: member {info.filename} is compressed; "
                                                 "torch writes storages uncompressed")
                offset = -1
                if offsets:
                    f.seek(info.header_offset)
                    signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                    if signature != b"PK\x03\x04":
                        raise CorruptCheckpointError(f"{path}: member {info.filename} has no local header "
                                                     "where the central directory says; the file is damaged")
                    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                records[parts[-1]] = ZipRecord(parts[-1], offset, info.file_size, info.CRC, info.filename)
            data = zf.read(pickle_info) if read_pickle and pickle_info is not None else None
            return ZipIndex(tuple(i.filename for i in infos), records, data)
    except (zipfile.BadZipFile, struct.error, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise CorruptCheckpointError(f"{path}: a zip archive that cannot be opened or indexed ({exc}); "
                                     "the file is truncated or damaged: download it again.") from None


def zip_records(path: str | Path) -> dict[str, ZipRecord]:
    """The ``data/<key>`` members of a torch zip checkpoint, by key, with their data offsets."""
    return zip_index(path, read_pickle=False).records


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a contiguous tensor of ``shape``."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: name, dtype string, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


#: safetensors dtype names -> bits per element (every dtype the format defines)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
                          "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
                          "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100 * 1024 * 1024


def safetensors_entries(path: str | Path) -> tuple[list[SafetensorsEntry], dict[str, str]]:
    """Parse and check a safetensors header: entries (absolute offsets) and metadata.

    Each entry's dtype, shape and byte range are checked against each other and the file size.
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: safetensors header check failed: {why}. The file is "
                                      "truncated or damaged: download it again.")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"the file has only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise bad(f"the header claims {header_len} bytes, the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metadata.items())):
        raise bad("__metadata__ is not a mapping of strings to strings")
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        if offsets[1] > size - base:
            raise bad(f"tensor {name!r} spans data bytes {offsets[0]}..{offsets[1]}, the data section "
                      f"has {size - base}")
        expected = (math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] + 7) // 8
        if offsets[1] - offsets[0] != expected:
            raise bad(f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]}")
        entries.append(SafetensorsEntry(name, dtype, tuple(shape), base + offsets[0], offsets[1] - offsets[0]))
    return entries, metadata
