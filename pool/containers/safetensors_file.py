"""safetensors: an 8-byte header length, a JSON header, then the tensor data. No pickle at all.

The header is parsed once, here, within bounds (its size relative to the file, nesting depth,
duplicate names, every tensor's byte range against its dtype and shape and the file), and the
tensors are views of the memory-mapped file made from those same entries.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError
from ..tensors import INT_LIMIT, StorageRef, TensorSpec, materialize
from ..transfer import OpenFile, Span, read_spans
from .base import Checkpoint, ReadOptions, as_text, file_storage, map_file, opened

__all__ = ["Safetensors", "SafetensorsEntry", "safetensors_entries", "contiguous_strides",
           "SAFETENSORS_DTYPES", "SAFETENSORS_DTYPE_BITS"]

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8),
        ("U8", torch.uint8), ("BOOL", torch.bool), ("C64", torch.complex64),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)), ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)),
    ) if isinstance(dtype, torch.dtype)
}
#: safetensors dtype names -> bits per element (every dtype the format defines)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
                          "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
                          "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 64


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: name, dtype string, shape and absolute byte range.

    Attributes:
        name: the tensor's key.
        dtype: its safetensors dtype name (``F32``, ``BF16``, ...).
        shape: its shape.
        offset: where its bytes start in the file (absolute, header included).
        nbytes: how many bytes it takes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a contiguous tensor of ``shape``.

    Args:
        shape: the tensor's shape.

    Returns:
        The strides, in elements.

    Example:
        >>> contiguous_strides((2, 3, 4))
        (12, 4, 1)
    """
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key!r} appears twice")
        out[key] = value
    return out


def safetensors_entries(path: str | Path | OpenFile) -> tuple[list[SafetensorsEntry], dict[str, str]]:
    """Parse and check a safetensors header: entries (absolute offsets) and metadata.

    The header's size is checked against the file's before it is read, and each entry's dtype,
    shape and byte range against the file; duplicate names are refused.

    Args:
        path: the safetensors file, or an `pool.transfer.OpenFile` whose descriptor is read.

    Returns:
        ``(entries, metadata)``: one `SafetensorsEntry` per tensor, in header order, and the
        ``__metadata__`` strings (empty when there are none).

    Raises:
        CorruptCheckpointError: the header is cut off, too large, not a JSON object, has a
            malformed entry (unknown dtype, bad shape or offsets, a byte range past the file or
            of the wrong size) or ``__metadata__`` that is not strings to strings.
        CheckpointError: the path is not a regular file.
    """
    given = path if isinstance(path, OpenFile) else None
    path = given.path if given is not None else Path(path)  # type: ignore[arg-type]

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: safetensors header check failed: {why}. The file is "
                                      "truncated or damaged: download it again.")

    with opened(path, given) as f:
        size = f.size()
        head = f.read_at(0, 8)
        if len(head) < 8:
            raise bad(f"the file has only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise bad(f"the header claims {header_len} bytes, the file has {size}")
        raw = f.read_at(8, header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the header is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise bad("the header nests deeper than any safetensors header") from None
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
            raise bad(f"entry {name[:200]!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise bad(f"tensor {name[:200]!r} has unknown dtype {str(dtype)[:40]!r}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(type(d) is int and 0 <= d < INT_LIMIT for d in shape)):
            raise bad(f"tensor {name[:200]!r} has a malformed shape {str(shape)[:100]}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name[:200]!r} has malformed data_offsets {str(offsets)[:100]}")
        if offsets[1] > size - base:
            raise bad(f"tensor {name[:200]!r} spans data bytes {offsets[0]}..{offsets[1]}, the data "
                      f"section has {size - base}")
        expected = (math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] + 7) // 8
        if offsets[1] - offsets[0] != expected:
            raise bad(f"tensor {name[:200]!r} ({dtype} {shape}) needs {expected} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]}")
        entries.append(SafetensorsEntry(name, dtype, tuple(shape), base + offsets[0], offsets[1] - offsets[0]))
    return entries, metadata


class Safetensors:
    """safetensors files: a `Container`; tensors are views of the mapped file (CPU) by default.

    Attributes:
        name: ``"safetensors"``.
    """

    name = "safetensors"

    def describe(self) -> str:
        """One line for people: what this format is.

        Returns:
            ``"safetensors (tensors and a JSON header; no pickle)"``.
        """
        return "safetensors (tensors and a JSON header; no pickle)"

    def sniff(self, head: bytes, size: int) -> bool:
        """Whether the bytes start a safetensors file: a header length that fits, then ``{``.

        Args:
            head: the file's first bytes.
            size: the file's size in bytes.

        Returns:
            True when byte 8 is ``{`` and the little-endian length before it is positive and
            fits in the file.
        """
        if len(head) < 9 or head[8:9] != b"{":
            return False
        (header_len,) = struct.unpack("<Q", head[:8])
        return 0 < header_len <= size - 8

    def diagnose(self, head: bytes, size: int) -> str | None:
        """Why a file that `sniff` refused looks like a truncated safetensors file, if it does.

        Args:
            head: the file's first bytes.
            size: the file's size in bytes.

        Returns:
            A message naming the header length it claims and the file's size, or None (for
            text that merely has ``{`` at byte 8, such as JSON or YAML).
        """
        if len(head) < 9 or head[8:9] != b"{" or as_text(head[:200]) is not None:
            return None  # text that merely has "{" at byte 8 (a JSON or YAML file): not ours
        (header_len,) = struct.unpack("<Q", head[:8])
        return (f"looks like safetensors but its header claims {header_len} bytes and the file has {size}; "
                "the file is truncated: download it again")

    def read(self, path: Path, options: ReadOptions, file: OpenFile | None = None) -> Checkpoint:
        """Read a safetensors file's tensors (no pickle is involved).

        Args:
            path: the file.
            options: where the tensors go; on the CPU they are views of the mapped file unless
                ``mmap`` is False, onto CUDA (or with ``mmap`` False) they are read in bulk.
            file: the file already open (every byte comes from it); None opens ``path`` once.

        Returns:
            The `Checkpoint` (``root_type`` ``"safetensors"``, the header's metadata).

        Raises:
            CorruptCheckpointError: the header is malformed, or a dtype is one this torch cannot
                hold.
            CheckpointError: the file is not regular, or changed while it was read.
        """
        with opened(path, file) as f:
            return self._read(path, options, f)

    def _read(self, path: Path, options: ReadOptions, f: OpenFile) -> Checkpoint:
        """`read` from the open file ``f``."""
        source = str(path)
        entries, metadata = safetensors_entries(f)
        for e in entries:
            if e.dtype not in SAFETENSORS_DTYPES:
                raise CorruptCheckpointError(f"{source}: tensor {e.name[:200]!r} has dtype {e.dtype}, which "
                                             "this torch cannot hold; convert the file to F32/F16/BF16.")
        device = options.device if options.device is not None else torch.device("cpu")
        bulk = device.type == "cuda" or (device.type == "cpu" and options.mmap is False)
        if bulk:
            storages = dict(zip([e.name for e in entries],
                                read_spans(f, [Span(e.offset, e.nbytes) for e in entries], device), strict=True))
        else:
            whole = file_storage(map_file(f))
            storages = {e.name: whole[e.offset:e.offset + e.nbytes] for e in entries}
        specs = {}
        for e in entries:
            dtype = SAFETENSORS_DTYPES[e.dtype]
            specs[e.name] = TensorSpec(StorageRef(e.name, torch.uint8, e.nbytes), dtype, 0, e.shape,
                                       contiguous_strides(e.shape))
        tensors = materialize(specs, storages, source, f.size())
        if not bulk:  # other devices (meta, mps, xpu, ...) or a dict map_location: moved once each
            tensors = options.place(tensors, specs)
        log.debug("read %s (safetensors): %d tensors", source, len(tensors))
        return Checkpoint(path, self.name, tensors, "safetensors", metadata=metadata)

    def integrity(self, path: Path) -> tuple[bool, str]:
        """The header check, then the tensors' byte ranges must tile the data section exactly.

        Args:
            path: the file.

        Returns:
            ``(True, detail)``: the tensor count and data bytes checked.

        Raises:
            CorruptCheckpointError: the header is malformed, tensors overlap or leave a gap, or
                bytes trail the last tensor.
        """
        entries, _ = safetensors_entries(path)
        with open(path, "rb") as f:
            data_start = end = 8 + int.from_bytes(f.read(8), "little")
        for entry in sorted(entries, key=lambda e: e.offset):
            if entry.offset != end:
                raise CorruptCheckpointError(
                    f"{path}: safetensors header check failed: tensor {entry.name[:200]!r} starts at byte "
                    f"{entry.offset}, expected {end} (overlapping tensors or a gap). The file is damaged: "
                    "download it again.")
            end = entry.offset + entry.nbytes
        size = path.stat().st_size
        if end != size:
            raise CorruptCheckpointError(
                f"{path}: safetensors header check failed: the tensors end at byte {end} but the file has "
                f"{size} bytes (trailing bytes). The file is damaged: download it again.")
        return True, f"{len(entries)} tensors, header and offsets ok ({end - data_start:,} data bytes)"
