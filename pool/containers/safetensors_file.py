"""safetensors: an 8-byte header length, a JSON header, then the tensor data. No pickle at all.

The header is parsed once, here, within bounds (its size relative to the file and the library's
100 MB, the number of JSON items and tensors, nesting depth), as strictly as the safetensors library
reads it or more (duplicate names, unpaired surrogates, floats, unknown fields and dtypes refused;
every tensor's byte count against its dtype and shape; byte ranges that tile the data section
exactly, with no overlap, gap, hidden prefix or trailing bytes), so that whatever a read returns,
``safetensors.torch.load_file`` returns too. The tensors are views of the memory-mapped file made
from those same entries.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, brief
from ..fileio import file_storage, map_file, opened
from ..tensors import INT_LIMIT, StorageRef, TensorSpec, materialize
from ..transfer import OpenFile, Span, read_spans
from .base import Checkpoint, ReadOptions
from .sniffing import as_text

__all__ = ["Safetensors", "SafetensorsEntry", "safetensors_entries", "SAFETENSORS_DTYPES",
           "MAX_HEADER_BYTES", "MAX_TENSORS", "MAX_HEADER_ITEMS"]

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
_SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
                          "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
                          "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
#: the safetensors library's own header limit (``MAX_HEADER_SIZE``, 100,000,000 bytes)
MAX_HEADER_BYTES = 100_000_000
#: the most tensors one file may list. Real checkpoints list a few thousand; a header listing
#: millions of empty tensors fits the library's 100 MB and would cost Python seconds and gigabytes.
MAX_TENSORS = 100_000
#: the most ``{``, ``[`` and ``,`` bytes a header may hold: every object member and array element
#: follows one of them, so this bounds how many values parsing can build before anything else is
#: checked (bytes inside strings count too; 20 per tensor leaves room for names and metadata).
MAX_HEADER_ITEMS = 20 * MAX_TENSORS
_MAX_DIMS = 64
_U64_MAX = (1 << 64) - 1
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a contiguous tensor of ``shape``.

    Args:
        shape: the tensor's shape.

    Returns:
        The strides, in elements.

    Example:
        >>> _contiguous_strides((2, 3, 4))
        (12, 4, 1)
    """
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


_Refusal = Callable[[str], CorruptCheckpointError]


def _json_hooks(bad: _Refusal) -> dict[str, Callable]:
    """``json.loads`` hooks that refuse what the safetensors library (serde_json) reads otherwise.

    At most `MAX_TENSORS` tensors' worth of objects are built. Duplicate names are refused outright (the library keeps the last tensor of a name and refuses
    a repeated field), as are strings with an unpaired surrogate (serde_json refuses ``"\\ud800"``,
    Python reads it), floats, ``NaN``/``Infinity`` and integers that are negative (``-0``
    included) or beyond 64 bits: no field of a safetensors header holds any of them.
    """
    objects = 0

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal objects
        objects += 1  # one per tensor, the metadata and the header itself: stop a count bomb early
        if objects > MAX_TENSORS + 2:
            raise bad(f"the header holds more than {MAX_TENSORS + 2:,} JSON objects: it lists more than the "
                      f"{MAX_TENSORS:,} tensors this reader accepts (real checkpoints list a few thousand)")
        out: dict[str, object] = {}
        for key, value in items:
            for text in (key, value):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad(f"the string {brief(text)} holds an unpaired UTF-16 surrogate, which the "
                                  "safetensors library refuses") from None
            if key in out:
                raise bad(f"the name {brief(key)} appears twice in one object")
            out[key] = value
        return out

    def integer(text: str) -> int:
        if text.startswith("-") or len(text) > 20 or int(text) > _U64_MAX:
            raise bad(f"the integer {brief(text)} is negative or beyond 64 bits; sizes and offsets "
                      "are unsigned 64-bit integers")
        return int(text)

    def no_float(text: str) -> float:
        raise bad(f"the number {brief(text)} is not an integer; a safetensors header holds none")

    return {"object_pairs_hook": pairs, "parse_int": integer, "parse_float": no_float,
            "parse_constant": no_float}


def _parse_header(raw: bytes, bad: _Refusal) -> dict[str, object]:
    """The header bytes as a JSON object, parsed within bounds (see `MAX_HEADER_ITEMS`)."""
    items = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if items > MAX_HEADER_ITEMS:
        raise bad(f"the header holds {items:,} JSON items, more than the {MAX_HEADER_ITEMS:,} that "
                  f"{MAX_TENSORS:,} tensors need")
    try:
        header = json.loads(raw.decode("utf-8"), **_json_hooks(bad))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the header is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise bad("the header nests deeper than any safetensors header") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    return header


def _metadata(header: dict[str, object], bad: _Refusal) -> dict[str, str]:
    """Pop ``__metadata__`` off the header: absent or ``null`` (none), else strings to strings."""
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a mapping of strings to strings")
    return metadata


def _element_count(shape: list[int]) -> int | None:
    """The number of elements, or None where the library's running 64-bit product overflows.

    The library multiplies the dimensions in order with overflow checks: ``[2**40, 2**40, 0]`` is
    refused there, ``[0, 2**40, 2**40]`` is not, so the order matters.
    """
    count = 1
    for dim in shape:
        count *= dim
        if count > _U64_MAX:
            return None
    return count


def _entry(name: str, info: object, base: int, data_len: int, bad: _Refusal) -> SafetensorsEntry:
    """One header entry, checked: dtype, shape, offsets and byte count, as the library checks them.

    Stricter than the library in two places: an entry must have exactly its three fields (the
    library ignores others, up to its own nesting limit) and at most 64 dimensions.
    """
    if not isinstance(info, dict):
        raise bad(f"entry {brief(name)} is not an object")
    if info.keys() != _ENTRY_FIELDS:
        raise bad(f"tensor {brief(name)} has the fields {brief(sorted(info))}, expected exactly "
                  f"{sorted(_ENTRY_FIELDS)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BITS:
        raise bad(f"tensor {brief(name)} has unknown dtype {brief(dtype, 40)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(type(d) is int and 0 <= d < INT_LIMIT for d in shape)):
        raise bad(f"tensor {brief(name)} has a malformed shape {brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"tensor {brief(name)} has malformed data_offsets {brief(offsets)}")
    if offsets[1] > data_len:
        raise bad(f"tensor {brief(name)} spans data bytes {offsets[0]}..{offsets[1]}, the data section "
                  f"has {data_len}")
    count = _element_count(shape)
    bits = None if count is None else count * _SAFETENSORS_DTYPE_BITS[dtype]
    if bits is None or bits > _U64_MAX or bits % 8:
        raise bad(f"tensor {brief(name)} ({dtype} {brief(shape)}) has a size that overflows 64 bits or "
                  "is no whole number of bytes")
    if offsets[1] - offsets[0] != bits // 8:
        raise bad(f"tensor {brief(name)} ({dtype} {brief(shape)}) needs {bits // 8} bytes, its offsets "
                  f"span {offsets[1] - offsets[0]}")
    return SafetensorsEntry(name, dtype, tuple(shape), base + offsets[0], offsets[1] - offsets[0])


def _check_tiling(entries: list[SafetensorsEntry], base: int, size: int, bad: _Refusal) -> None:
    """The byte ranges, sorted as the library sorts them, must tile ``base..size`` exactly.

    No overlap (two names for the same bytes), no gap or hidden prefix (bytes no tensor owns) and
    nothing after the last tensor: the safetensors library refuses each of these.
    """
    end = base
    for entry in sorted(entries, key=lambda e: (e.offset, e.offset + e.nbytes)):
        if entry.offset != end:
            what = ("overlaps the tensor before it" if entry.offset < end else
                    "leaves a gap before it" if end > base else "leaves a hidden prefix before it")
            raise bad(f"tensor {brief(entry.name)} starts at byte {entry.offset}, expected {end}: it "
                      f"{what} (the tensors must tile the data section)")
        end = entry.offset + entry.nbytes
    if end != size:
        raise bad(f"the tensors end at byte {end} but the file has {size} bytes (trailing bytes)")


def safetensors_entries(path: str | Path | OpenFile) -> tuple[list[SafetensorsEntry], dict[str, str]]:
    """Parse and check a safetensors header: entries (absolute offsets) and metadata.

    Everything the safetensors library checks is checked here, or refused where this is stricter:
    the header's size (against the file and the library's 100 MB), strict JSON (no duplicate names,
    no unpaired surrogates, no floats), at most `MAX_TENSORS` tensors, each entry's dtype, shape
    and byte count, and byte ranges that tile the data section exactly from its start to the end
    of the file. What this returns is what ``safetensors.torch.load_file`` returns.

    Args:
        path: the safetensors file, or an `pool.transfer.OpenFile` whose descriptor is read.

    Returns:
        ``(entries, metadata)``: one `SafetensorsEntry` per tensor, in header order, and the
        ``__metadata__`` strings (empty when there are none).

    Raises:
        CorruptCheckpointError: the header is cut off, too large, no strict JSON object, lists too
            many tensors, has a malformed entry (unknown dtype or field, bad shape or offsets, a
            byte range past the file or of the wrong size), ``__metadata__`` that is not strings
            to strings, or byte ranges that overlap, leave a gap or stop before the file's end.
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
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"the header claims {header_len} bytes, the file has {size} (at most "
                      f"{MAX_HEADER_BYTES:,} are allowed)")
        raw = f.read_at(8, header_len)
    header = _parse_header(raw, bad)
    metadata = _metadata(header, bad)
    if len(header) > MAX_TENSORS:
        raise bad(f"the header lists {len(header):,} tensors, more than the {MAX_TENSORS:,} tensors this "
                  "reader accepts (real checkpoints list a few thousand)")
    base = 8 + header_len
    entries = [_entry(name, info, base, size - base, bad) for name, info in header.items()]
    _check_tiling(entries, base, size, bad)
    return entries, metadata


class Safetensors:
    """safetensors files: a `Container`; tensors are views of the mapped file (CPU) by default.

    Attributes:
        name: ``"safetensors"``.
    """

    name = "safetensors"
    description = "safetensors (tensors and a JSON header; no pickle)"


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
            options: where the tensors go; read in bulk into private memory (the CPU) or onto
                the device, or, with ``mmap=True`` only, views of the mapped file.
            file: the file already open (every byte comes from it); None opens ``path`` once.

        Returns:
            The `Checkpoint` (``root_type`` ``"safetensors"``, the header's metadata).

        Raises:
            CorruptCheckpointError: the header fails any check of `safetensors_entries` (the
                safetensors library's rules, strict JSON, byte ranges that tile the data section,
                at most `MAX_TENSORS` tensors), or a dtype is one this torch cannot hold.
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
        bulk = device.type == "cuda" or (device.type == "cpu" and not options.mmap)
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
                                       _contiguous_strides(e.shape))
        tensors = materialize(specs, storages, source, f.size())
        # where they are not yet (meta, mps, xpu, ..., or a dict map_location): moved once each
        tensors = options.place(tensors, specs)
        log.debug("read %s (safetensors): %d tensors", source, len(tensors))
        return Checkpoint(path, self.name, tensors, "safetensors", metadata=metadata)

    def integrity(self, path: Path) -> tuple[bool, str]:
        """The header check of `safetensors_entries`, which every read makes too.

        Args:
            path: the file.

        Returns:
            ``(True, detail)``: the tensor count and data bytes checked.

        Raises:
            CorruptCheckpointError: the header is malformed, tensors overlap or leave a gap, or
                bytes trail the last tensor.
        """
        entries, _ = safetensors_entries(path)
        data = sum(e.nbytes for e in entries)
        return True, f"{len(entries)} tensors, header and offsets ok ({data:,} data bytes)"
