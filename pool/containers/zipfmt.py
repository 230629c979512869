"""A strict zip parser: one reading of the archive for every check and every read.

torch's zip checkpoints (``torch.save`` since 1.6) are stored (uncompressed) zip archives. Zip is
a format two parsers can read differently (which end record, which central directory, which of
two equal names), so this module reads it once, strictly, and refuses whatever another reader
could see differently:

* exactly one end-of-central-directory record, at the very end (no comment), and at most one
  ZIP64 end record and locator, consistent with it;
* the central directory exactly where the end record says, its entries tiling it;
* every member: stored (no compression), not encrypted, a name with no NUL, ASCII or flagged
  UTF-8, unique even ignoring ASCII case (torch's reader looks names up that way), and a local
  header that agrees with its central entry;
* members laid out from byte 0 without overlaps or hidden gaps (a data descriptor's 24 bytes at
  most between them), ending where the central directory starts.

Knows zip, nothing of torch or pickles.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, ZipRefusal

__all__ = ["ZipMember", "ZipArchive", "parse_zip", "check_crcs"]

_EOCD = struct.Struct("<4sHHHHIIH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset, comment
_Z64_LOCATOR = struct.Struct("<4sIQI")  # sig, disk with z64 eocd, z64 eocd offset, disks
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # sig, size, made, needed, disk, cd disk, here, total, cd size, cd off
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_MAX_GAP = 24  # a data descriptor with signature and ZIP64 sizes
_MAX_MEMBERS = 100_000  # a real checkpoint has one member per storage: a few thousand at most
_MAX_VERSION = 63  # the newest "version needed to extract" Python's zipfile reads


@dataclass(frozen=True)
class ZipMember:
    """One member: its name, where its data starts, its size and its CRC32.

    Attributes:
        name: the member's name (``archive/data.pkl``).
        offset: where its data starts in the file.
        size: its size in bytes (stored: compressed and uncompressed sizes are equal).
        crc32: the CRC32 the central directory records.
    """

    name: str
    offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class ZipArchive:
    """The members of a zip archive by name, in central-directory order.

    Attributes:
        members: each member's `ZipMember`, by name.
    """

    members: dict[str, ZipMember]

    def read(self, buffer: memoryview | bytes, name: str) -> bytes:
        """A member's bytes, its CRC32 checked.

        Args:
            buffer: the whole file's bytes.
            name: the member's name.

        Returns:
            A copy of the member's bytes.

        Raises:
            KeyError: the archive has no member of that name.
            CorruptCheckpointError: the bytes fail the member's CRC32 check.
        """
        member = self.members[name]
        data = bytes(buffer[member.offset:member.offset + member.size])
        if zlib.crc32(data) != member.crc32:
            raise CorruptCheckpointError(f"member {name} fails its CRC32 check")
        return data


def parse_zip(buffer: memoryview | bytes, source: str,
              check_names: Callable[[list[str]], None] | None = None) -> ZipArchive:
    """Parse a zip archive strictly (see the module docstring); CorruptCheckpointError otherwise.

    ``check_names`` sees the member names as soon as the central directory is read, before the
    members themselves are checked (to name what an archive is, e.g. TorchScript, first).

    Args:
        buffer: the whole file's bytes.
        source: how error messages name the file.
        check_names: called with the member names; what it raises propagates. None skips it.

    Returns:
        The `ZipArchive`.

    Raises:
        CorruptCheckpointError: the archive is cut off, or is something another zip reader could
            read differently (see the module docstring).
    """
    try:
        return _parse(buffer, check_names)
    except ZipRefusal as exc:
        raise CorruptCheckpointError(
            f"{source}: a zip archive this reader refuses: {exc}. torch.save never writes this; the "
            "file is damaged, or crafted so that different zip readers see different contents. "
            "Download it again from a trusted source.") from None
    except struct.error:
        raise CorruptCheckpointError(f"{source}: a zip archive cut off inside one of its records; the "
                                     "file is truncated: download it again.") from None


@dataclass(frozen=True)
class _Directory:
    """Where the end record puts the central directory, and how many entries it counts."""

    entries: int
    offset: int  # where the central directory starts
    end: int  # where it ends: the ZIP64 end record, or the end record


@dataclass(frozen=True)
class _Entry:
    """One central-directory entry, its ZIP64 fields applied."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    disk_start: int
    local_at: int


def _parse(buf: memoryview | bytes, check_names: Callable[[list[str]], None] | None) -> ZipArchive:
    directory = _end_records(buf)
    entries, tiled = _central_directory(buf, directory)
    if check_names is not None:
        check_names([entry.name for entry in entries])
    members, spans = _members(buf, entries, directory.offset)
    if not tiled:  # checked once the members are: their refusals come first
        raise ZipRefusal("the central directory holds more than the entries the end record counts")
    _check_layout(spans, directory.offset)
    return ZipArchive(members)


def _end_records(buf: memoryview | bytes) -> _Directory:
    """The end-of-central-directory record (and a ZIP64 one), checked: where the directory is."""
    n = len(buf)
    if n < _EOCD.size:
        raise ZipRefusal(f"the file has only {n} bytes")
    eocd_at = n - _EOCD.size
    sig, disk, cd_disk, here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(buf, eocd_at)
    if sig != b"PK\x05\x06":
        raise ZipRefusal("no end-of-central-directory record at the end of the file (a comment, trailing "
                         "bytes, or a truncated file)")
    if comment:
        raise ZipRefusal("the end record claims a comment")
    cd_end = eocd_at
    locator_at = eocd_at - _Z64_LOCATOR.size
    if locator_at >= 0 and bytes(buf[locator_at:locator_at + 4]) == b"PK\x06\x07":
        entries, cd_size, cd_offset, cd_end = _zip64_end(buf, locator_at, entries, cd_size, cd_offset)
    elif disk or cd_disk or here != entries:
        raise ZipRefusal("a multi-disk archive")
    if cd_offset + cd_size != cd_end:
        raise ZipRefusal(f"the central directory is not where the end record says (offset {cd_offset} + size "
                         f"{cd_size} != {cd_end})")
    if entries > _MAX_MEMBERS:
        raise ZipRefusal(f"{entries} members, more than the {_MAX_MEMBERS} any checkpoint has")
    for signature in (b"PK\x05\x06", b"PK\x06\x06"):
        if bytes(buf[cd_offset:cd_end]).find(signature) >= 0:
            raise ZipRefusal("a second end record inside the central directory")
    return _Directory(entries, cd_offset, cd_end)


def _zip64_end(buf: memoryview | bytes, locator_at: int, entries: int, cd_size: int,
               cd_offset: int) -> tuple[int, int, int, int]:
    """The ZIP64 locator and end record, checked against the end record: entries, directory size,
    offset and end."""
    _, ldisk, z64_at, disks = _Z64_LOCATOR.unpack_from(buf, locator_at)
    if ldisk != 0 or disks != 1 or z64_at + _Z64_EOCD.size > locator_at:
        raise ZipRefusal("a ZIP64 locator that points outside the file or to another disk")
    (zsig, zsize, _, _, zdisk, zcd_disk, zhere, ztotal, zcd_size, zcd_offset) = _Z64_EOCD.unpack_from(buf, z64_at)
    if zsig != b"PK\x06\x06" or z64_at + 12 + zsize != locator_at:
        raise ZipRefusal("the ZIP64 end record is not where its locator says")
    if zdisk or zcd_disk or zhere != ztotal:
        raise ZipRefusal("a multi-disk ZIP64 archive")
    for small, big in ((entries, ztotal), (cd_size, zcd_size), (cd_offset, zcd_offset)):
        if small not in (big, 0xFFFF, 0xFFFFFFFF):
            raise ZipRefusal("the ZIP64 end record and the end record disagree")
    return ztotal, zcd_size, zcd_offset, z64_at


def _central_directory(buf: memoryview | bytes, directory: _Directory) -> tuple[list[_Entry], bool]:
    """The entries the end record counts, and whether they fill the directory exactly."""
    entries: list[_Entry] = []
    at, cd_end = directory.offset, directory.end
    for _ in range(directory.entries):
        if at + _CENTRAL.size > cd_end:
            raise ZipRefusal("the central directory holds fewer entries than the end record says")
        (csig, _, needed, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len,
         disk_start, _, _, local_at) = _CENTRAL.unpack_from(buf, at)
        if csig != b"PK\x01\x02":
            raise ZipRefusal(f"a central directory entry without its signature at byte {at}")
        if needed > _MAX_VERSION:
            raise ZipRefusal(f"an entry needs zip version {needed / 10:.1f} to extract")
        raw_name = bytes(buf[at + _CENTRAL.size:at + _CENTRAL.size + name_len])
        extra = bytes(buf[at + _CENTRAL.size + name_len:at + _CENTRAL.size + name_len + extra_len])
        at += _CENTRAL.size + name_len + extra_len + comment_len
        if at > cd_end:
            raise ZipRefusal("a central directory entry runs past the directory")
        usize, csize, local_at, disk_start = _zip64_fields(extra, usize, csize, local_at, disk_start)
        entries.append(_Entry(_name(raw_name, flags), raw_name, flags, method, crc, csize, usize, disk_start,
                              local_at))
    return entries, at == cd_end


def _members(buf: memoryview | bytes, entries: list[_Entry],
             cd_offset: int) -> tuple[dict[str, ZipMember], list[tuple[int, int, str, bool]]]:
    """Each entry checked as a member (stored, unencrypted, one disk, a unique name, a local header
    that agrees); the members by name and their spans ``(start, stop, name, has descriptor)``."""
    members: dict[str, ZipMember] = {}
    raw_names: set[bytes] = set()
    spans: list[tuple[int, int, str, bool]] = []
    for entry in entries:
        name, raw_name, flags = entry.name, entry.raw_name, entry.flags
        if flags & 0x41:
            raise ZipRefusal(f"member {name!r} is encrypted")
        if entry.method != 0 or entry.csize != entry.usize:
            raise ZipRefusal(f"member {name!r} is compressed (method {entry.method}); torch stores members "
                             "uncompressed")
        if entry.disk_start != 0:
            raise ZipRefusal(f"member {name!r} is on another disk")
        folded = raw_name.lower()  # torch's zip reader (miniz) looks names up ignoring ASCII case
        if name in members or folded in raw_names:
            raise ZipRefusal(f"two members are named {name!r} (names that differ only in case count as one: "
                             "torch's reader would take either)")
        raw_names.add(folded)
        data_at = _local_header(buf, entry.local_at, raw_name, flags, entry.crc, entry.usize, name)
        if data_at + entry.usize > cd_offset:
            raise ZipRefusal(f"member {name!r} runs into the central directory")
        members[name] = ZipMember(name, data_at, entry.usize, entry.crc)
        spans.append((entry.local_at, data_at + entry.usize, name, bool(flags & 0x8)))
    return members, spans


def _check_layout(spans: list[tuple[int, int, str, bool]], cd_offset: int) -> None:
    """Members laid out from byte 0, no overlaps, no gaps but a data descriptor's, up to the directory."""
    end, descriptor = 0, False  # a data descriptor (flag bit 3) may follow a member's data
    for start, stop, name, has_descriptor in sorted(spans):
        if start < end:
            raise ZipRefusal(f"member {name!r} overlaps the member before it")
        if start - end > (_MAX_GAP if descriptor else 0) or (end == 0 and start != 0):
            raise ZipRefusal(f"{start - end} unaccounted bytes before member {name!r}")
        end, descriptor = stop, has_descriptor
    if cd_offset - end > (_MAX_GAP if descriptor else 0):
        raise ZipRefusal(f"{cd_offset - end} unaccounted bytes before the central directory")


def _name(raw: bytes, flags: int) -> str:
    """A member's name as every reader sees it: ASCII, or UTF-8 flagged as such (a name of other
    bytes without the flag is cp437 to Python's zipfile and raw bytes to torch's reader)."""
    if b"\x00" in raw:
        raise ZipRefusal(f"a member name holds a NUL byte ({raw[:60]!r})")
    if not flags & 0x800 and not raw.isascii():
        raise ZipRefusal(f"a member name of non-ASCII bytes without the UTF-8 flag ({raw[:60]!r}): zip readers "
                   "decode it differently")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ZipRefusal(f"a member name that is not valid UTF-8 ({raw[:60]!r})") from None


def _zip64_fields(extra: bytes, usize: int, csize: int, offset: int, disk: int) -> tuple[int, int, int, int]:
    """Sizes, offset and disk from a ZIP64 extra field, for the fields set to their maximum."""
    bodies = [body for tag, body in _extra_fields(extra) if tag == 1]
    if len(bodies) > 1:
        raise ZipRefusal("two ZIP64 extra fields in one entry")
    if not bodies:
        return usize, csize, offset, disk
    body, j, values = bodies[0], 0, []
    for value, width in ((usize, 8), (csize, 8), (offset, 8), (disk, 4)):
        if value == (0xFFFFFFFF if width == 8 else 0xFFFF):
            if j + width > len(body):
                raise ZipRefusal("a ZIP64 extra field too short for the sizes it stands for")
            value = int.from_bytes(body[j:j + width], "little")
            j += width
        values.append(value)
    return values[0], values[1], values[2], values[3]


def _extra_fields(extra: bytes) -> list[tuple[int, bytes]]:
    """The (tag, body) fields of an extra-field block; one cut off by the block's end is refused."""
    fields, i = [], 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        if i + 4 + size > len(extra):
            raise ZipRefusal("an extra field runs past its entry")
        fields.append((tag, extra[i + 4:i + 4 + size]))
        i += 4 + size
    return fields


def _local_header(buf: memoryview | bytes, at: int, raw_name: bytes, flags: int, crc: int, usize: int,
                  name: str) -> int:
    """Check a member's local header against its central entry; return where its data starts."""
    if at + _LOCAL.size > len(buf):
        raise ZipRefusal(f"member {name!r} has its local header past the end of the file")
    (sig, _, lflags, method, _, _, lcrc, lcsize, lusize, name_len, extra_len) = _LOCAL.unpack_from(buf, at)
    if sig != b"PK\x03\x04":
        raise ZipRefusal(f"member {name!r} has no local header where the central directory says")
    if bytes(buf[at + _LOCAL.size:at + _LOCAL.size + name_len]) != raw_name:
        raise ZipRefusal(f"member {name!r} has another name in its local header")
    if method != 0 or (lflags & 0x41) != (flags & 0x41):
        raise ZipRefusal(f"member {name!r} has a local header that disagrees with its central entry")
    if not lflags & 0x8:
        if 0xFFFFFFFF in (lusize, lcsize):  # the local ZIP64 extra field holds both sizes
            extra = bytes(buf[at + _LOCAL.size + name_len:at + _LOCAL.size + name_len + extra_len])
            local64 = [body for tag, body in _extra_fields(extra) if tag == 1]
            if len(local64) != 1 or len(local64[0]) < 16:
                raise ZipRefusal(f"member {name!r} has a local ZIP64 record that is missing or malformed")
            lusize, lcsize = int.from_bytes(local64[0][:8], "little"), int.from_bytes(local64[0][8:16], "little")
        if lcrc != crc or lusize != usize or lcsize != usize:
            raise ZipRefusal(f"member {name!r} has sizes or CRC in its local header that disagree with the directory")
    return at + _LOCAL.size + name_len + extra_len


#: Bytes per chunk of a checksum pass.
_CHUNK = 1 << 20
#: Threads computing CRC32s at once (the bytes are mapped: no read to share).
_WORKERS = min(8, os.cpu_count() or 1)


def check_crcs(buffer: memoryview | bytes, archive: ZipArchive, source: str, sha: Any = None) -> int:
    """Recompute every member's CRC32 in one pass over ``buffer`` (torch's reader never checks them).

    With ``sha`` (a ``hashlib`` object: the file's digest in the same read), each 1 MiB chunk of the
    whole file feeds it and the CRC32 of every member it overlaps, in one sequential pass; without,
    the members' CRC32s are computed several at a time. Either way they are then compared with the
    central directory's.

    Args:
        buffer: the whole file's bytes (mapped).
        archive: what `parse_zip` made of them.
        source: how messages name the file.
        sha: a hash object to feed every byte of the file, or None.

    Returns:
        The members' total size in bytes.

    Raises:
        CorruptCheckpointError: a member fails its CRC32 check.
    """
    members = sorted(archive.members.values(), key=lambda m: m.offset)
    crcs = _one_pass(buffer, members, sha) if sha is not None else _parallel_crcs(buffer, members)
    for member, value in zip(members, crcs, strict=True):
        if value != member.crc32:
            raise CorruptCheckpointError(
                f"{source}: zip member {member.name} ({member.size} bytes) fails its CRC32 check "
                f"(stored {member.crc32:08x}, computed {value:08x}): its bytes changed after it was "
                "written (disk or transfer damage), so it would load wrong weights. Download the "
                "file again and compare its sha256 with the source.")
    return sum(m.size for m in members)


def _one_pass(buffer: memoryview | bytes, members: list[ZipMember], sha: Any) -> list[int]:
    """The members' CRC32s and the file's digest from one sequential pass (what ``pool.lock`` asks)."""
    crcs = [0] * len(members)
    first = 0  # the first member not yet wholly read
    for start in range(0, len(buffer), _CHUNK):
        end = min(start + _CHUNK, len(buffer))
        sha.update(buffer[start:end])
        first = _crc_chunk(buffer, members, crcs, first, start, end)
    return crcs


def _member_crc(buffer: memoryview | bytes, member: ZipMember) -> int:
    crc = 0
    for start in range(member.offset, member.offset + member.size, _CHUNK):
        crc = zlib.crc32(buffer[start:min(start + _CHUNK, member.offset + member.size)], crc)
    return crc


def _parallel_crcs(buffer: memoryview | bytes, members: list[ZipMember]) -> list[int]:
    """The members' CRC32s, several members at a time: ``zlib.crc32`` releases the GIL, and the CRC
    itself, not reading the bytes, is what an integrity pass costs (about 1.6 GB/s a core)."""
    if len(members) < 2 or _WORKERS < 2:
        return [_member_crc(buffer, m) for m in members]
    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="pool-crc") as workers:
        return list(workers.map(lambda m: _member_crc(buffer, m), members))


def _crc_chunk(buffer: memoryview | bytes, members: list[ZipMember], crcs: list[int], first: int, start: int,
               end: int) -> int:
    """Feed ``buffer[start:end]`` to the CRC32 of each member it overlaps; returns the index of the
    first member that ends after ``end`` (members are sorted by offset and never overlap)."""
    i = first
    while i < len(members) and members[i].offset < end:
        member = members[i]
        lo, hi = max(member.offset, start), min(member.offset + member.size, end)
        if lo < hi:
            crcs[i] = zlib.crc32(buffer[lo:hi], crcs[i])
        i += 1
    while first < len(members) and members[first].offset + members[first].size <= end:
        first += 1
    return first
