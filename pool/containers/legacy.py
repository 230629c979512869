"""torch's legacy stream (``torch.save(..., _use_new_zipfile_serialization=False)``).

Five pickles, then raw storages: the magic number, the protocol version (1001), a ``sys_info``
dict, the object (storages as persistent ids), the list of storage keys; then for each key in
that order an int64 element count and the storage's bytes. torch's own loader first tries the
file as a tar archive (pre-1.0 format, with members it extracts); this reader never does.

The same parser reads the byte blobs of ``torch.storage._load_from_bytes`` (`BlobReader`), which
is how a plain ``pickle.dump`` of a module carries its storages; an archive inside a blob is
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, brief
from ..fileio import FileRanges, copy_bytes, map_file, opened
from ..inert import GlobalRecord, PersistentRecord, Record
from ..record_values import is_key, record_bytes, storage_from_pid
from ..records import find_calls, walk
from ..tensors import StorageRef, materialize
from ..transfer import OpenFile
from ..unpickler import InPlaceBytes, Reader
from .base import Checkpoint, ReadOptions
from .pickled import listing_globals, reader_for, result

__all__ = ["Legacy", "BlobReader", "is_legacy"]


_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_MAGIC_LONG = b"\x8a\x0a" + _MAGIC_NUMBER.to_bytes(10, "little", signed=True)


def is_legacy(head: bytes) -> bool:
    """Whether bytes start a legacy torch stream: a pickle (any protocol) of the magic number.

    Args:
        head: a file's (or a blob's) first bytes; the first 32 are looked at.

    Returns:
        True for a legacy torch stream.
    """
    return head[:1] == b"\x80" and _MAGIC_LONG in head[:32]


class _Stream:
    """The legacy stream's pickles and storages, parsed from one buffer."""

    def __init__(self, buffer: memoryview | bytes, reader: Reader, what: str) -> None:
        self.buffer = memoryview(buffer)  # slices are views, not copies
        self.reader = reader
        self.what = what
        self.pos = 0
        self.refs: dict[str, StorageRef] = {}
        self.views: dict[str, tuple] = {}  # view key -> (root key, dtype, byte offset, size)

    def fail(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.reader.source}: {self.what}: {why}; the file is truncated or "
                                      "damaged: download it again.")

    def next_pickle(self, what: str, persistent: Any = None) -> Any:
        if self.pos >= len(self.buffer):
            raise self.fail(f"the stream ends before its {what}")
        unpickled = self.reader.unpickle(self.buffer[self.pos:], what=f"{self.what} ({what})",
                                         persistent=persistent)
        self.pos += unpickled.end
        return unpickled.root

    def persistent(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            cls = pid[1]  # a module class, recorded with its source: the class record is the id
            if not (isinstance(cls, type) and issubclass(cls, GlobalRecord)):
                raise self.fail("a module reference that names no class")
            return cls
        if not (isinstance(pid, tuple) and len(pid) == 6 and type(pid[2]) is str):  # as torch unpacks them
            raise self.fail(f"a storage reference of {brief(pid)} (torch writes ('storage', type, key, "
                            "location, size, view))")
        ref = storage_from_pid(pid, self.reader.source)
        self.check_view(ref, pid[5])
        numel = ref.root_numel if ref.root_numel >= 0 else ref.numel  # the root storage's size
        root = self.refs.get(ref.key)
        if root is None:
            self.refs[ref.key] = StorageRef(ref.key, ref.dtype, numel, location=ref.location)
        elif root.dtype != ref.dtype or root.numel != numel:
            raise self.fail(f"storage {brief(ref.key)} is named with two element types or sizes")
        return ref

    def check_view(self, ref: StorageRef, view: Any) -> None:
        """One meaning per key, as torch's legacy reader caches them: a view key names one view
        (root, offset, size) and is never a root storage's key."""
        if view is None:
            if ref.key in self.views:
                raise self.fail(f"storage key {brief(ref.key)} names both a view and a root storage (torch "
                                "would read one for the other)")
            return
        key = str(view[0])
        if not is_key(view[0]) or key == ref.key or key in self.refs:
            raise self.fail(f"a storage view whose key {brief(view[0])} is also a root storage's key")
        meaning = (ref.key, ref.dtype, ref.byte_offset, ref.numel)
        if self.views.setdefault(key, meaning) != meaning:
            raise self.fail(f"storage view {brief(key)} is named twice with different offsets or sizes (torch "
                            "would reuse the first)")

    def parse(self) -> tuple[Any, dict[str, tuple[int, int]]]:
        """The root object and, per storage key, the (start, stop) of its bytes in the buffer."""
        if self.next_pickle("magic number") != _MAGIC_NUMBER:
            raise self.fail("no torch magic number at the start")
        if self.next_pickle("protocol version") != _PROTOCOL_VERSION:
            raise self.fail("an unknown legacy protocol version")
        sys_info = self.next_pickle("sys_info")
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise self.fail("a big-endian file; only little-endian files are read")
        root = self.next_pickle("object", persistent=self.persistent)
        keys = self.next_pickle("storage keys")
        if not (isinstance(keys, list) and all(type(k) is str for k in keys)):  # torch looks them up as written
            raise self.fail("the storage-key list is malformed")
        spans: dict[str, tuple[int, int]] = {}
        for key in map(str, keys):
            ref = self.refs.get(key)
            if ref is None or key in spans:
                raise self.fail(f"storage {key!r} is listed {'twice' if ref else 'but never used'}")
            if self.pos + 8 > len(self.buffer):
                raise self.fail(f"the data of storage {key!r} is cut off")
            numel = int.from_bytes(self.buffer[self.pos:self.pos + 8], "little", signed=True)
            if numel != ref.numel:
                raise self.fail(f"storage {brief(key)} claims {ref.numel * ref.dtype.itemsize} bytes but only "
                                f"{max(numel, 0) * ref.dtype.itemsize} are there (the file stores {numel} "
                                f"elements, the pickle says {ref.numel})")
            start = self.pos + 8
            stop = start + numel * ref.dtype.itemsize
            if stop > len(self.buffer):
                raise self.fail(f"storage {key!r} needs {stop - start} bytes, {len(self.buffer) - start} remain")
            spans[key] = (start, stop)
            self.pos = stop
        unfilled = sorted(set(self.refs) - set(spans))
        if unfilled:
            raise self.fail(f"storage {unfilled[0]!r} is used but its data is not in the file")
        return root, spans


def _parse_legacy(buffer: memoryview | bytes, reader: Reader, what: str,
                 file: tuple[FileRanges, int] | None = None) -> tuple[Any, dict[str, torch.UntypedStorage]]:
    """Parse a legacy stream: its root object and its storages (copied out, aligned).

    With ``file`` (an open file and the buffer's offset in it), the storages are read from the
    file rather than copied from the buffer.

    Args:
        buffer: the stream's bytes.
        reader: the read's reader (its unsafe-global policy applies to all five pickles).
        what: how messages name the stream (``legacy stream``, ``storage blob 3``).
        file: ``(ranges, offset)``: read the storages from ``ranges`` at ``offset`` plus their
            place in ``buffer``; None copies them from ``buffer``.

    Returns:
        ``(root, storages)``: the unpickled object (storages as `pool.tensors.StorageRef`) and
        the storages' bytes by key.

    Raises:
        CorruptCheckpointError: a pickle is malformed, the magic number or protocol version is
            wrong, the file is big-endian, or the storages' keys or sizes do not match their data.
        UnsafeCheckpointError: a pickle names an unsafe global (when the reader refuses them).
    """
    root, spans = _Stream(buffer, reader, what).parse()
    if file is None:
        return root, {key: copy_bytes(buffer, start, stop) for key, (start, stop) in spans.items()}
    ranges, base = file
    return root, {key: ranges.storage(base + start, stop - start) for key, (start, stop) in spans.items()}


class BlobReader:
    """Reads ``torch.storage._load_from_bytes`` blobs with the legacy parser, for the walker.

    `preload` reads every blob a pickle holds as soon as it is unpickled, wherever it sits, so
    that an unsafe global inside any blob is refused (and listed by ``inspect``) even where the
    walk would never look.

    Args:
        reader: the read's reader.
        budget: the storage bytes all blobs may yield together (the file's size).
        file: the open file in which blobs left in place (`pool.unpickler.InPlaceBytes`) are
            read; None copies them from memory.
    """

    MAX_BLOBS = 100_000
    MAX_NESTING = 8
    GLOBAL = "torch.storage._load_from_bytes"

    def __init__(self, reader: Reader, budget: int, file: FileRanges | None = None) -> None:
        self.reader = reader
        self.budget = budget  # storage bytes the blobs may yield in all: the file's size
        self.file = file  # where InPlaceBytes blobs are read from
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.refs: dict[int, StorageRef | None] = {}  # by id of the blob record
        self.by_content: dict[tuple, StorageRef | None] = {}  # by identity of the blob's bytes
        self._keep: list[Any] = []  # ids stay unique while these live

    def preload(self, root: Any, depth: int = 0) -> None:
        """Parse every blob reachable from ``root`` now, so their globals are checked first.

        Args:
            root: an unpickled object (a file's root, or a blob's).
            depth: how deep in nested blobs ``root`` is.

        Raises:
            CorruptCheckpointError: a blob is no legacy torch stream, is malformed, nests too
                deep, or the blobs hold more bytes than the file.
            UnsafeCheckpointError: a blob names an unsafe global (when the reader refuses them).
        """
        if ("torch.storage", "_load_from_bytes") in self.reader.globals:
            for record in find_calls(root, self.GLOBAL, self.reader.source):
                self._parse(record, depth)

    def read(self, record: Record) -> StorageRef:
        """The storage a blob record holds (the walker's callback).

        Args:
            record: a ``torch.storage._load_from_bytes`` call record.

        Returns:
            A `pool.tensors.StorageRef` to the blob's storage (its bytes are in ``storages``).

        Raises:
            CorruptCheckpointError: the blob holds no storage, or cannot be parsed.
        """
        ref = self._parse(record, 0)
        if ref is None:
            raise CorruptCheckpointError(f"{self.reader.source}: a storage blob (torch.storage._load_from_bytes) "
                                         "that holds no storage; the file is damaged or crafted.")
        return ref

    def _parse(self, record: Record, depth: int) -> StorageRef | None:
        if id(record) in self.refs:
            return self.refs[id(record)]
        source = self.reader.source
        number = len(self.by_content) + 1
        if number > self.MAX_BLOBS or depth > self.MAX_NESTING:
            raise CorruptCheckpointError(f"{source}: more than {self.MAX_BLOBS} storage blobs, or blobs "
                                         f"nested more than {self.MAX_NESTING} deep; no checkpoint has them.")
        arg = record.args[0] if len(record.args) == 1 and not record.kwargs else None
        # One parse per distinct byte string, however many records share it; known before any
        # bytes are decoded (protocol 2 spells them as _codecs.encode(text, 'latin1') calls).
        inner = arg.value if isinstance(arg, PersistentRecord) else arg.args[0] if (
            isinstance(arg, Record) and arg.args) else arg
        content = (("at", inner.offset, len(inner.view)) if isinstance(inner, InPlaceBytes)
                   else ("id", id(inner)))
        self._keep.extend((record, arg, inner))
        if content in self.by_content:
            ref = self.refs[id(record)] = self.by_content[content]
            return ref
        self.by_content[content] = None
        blob = record_bytes(arg)
        if blob is None:
            raise CorruptCheckpointError(f"{source}: storage blob {number} is not a byte string; the file "
                                         "is damaged or not written by torch.save / pickle.dump.")
        file = None
        if isinstance(blob, InPlaceBytes):
            file = (self.file, blob.offset) if self.file is not None else None
            blob = blob.view
        if not is_legacy(bytes(blob[:32])):
            kind = "an archive (zip or TorchScript)" if bytes(blob[:2]) == b"PK" else "not a legacy torch stream"
            raise CorruptCheckpointError(
                f"{source}: a storage blob (torch.storage._load_from_bytes) that is {kind}; only "
                "legacy torch streams are read inside a pickle, so the file is refused.")
        self.refs[id(record)] = None
        root, storages = _parse_legacy(blob, self.reader, f"storage blob {number}", file)
        self.budget -= sum(s.nbytes() for s in storages.values())
        if self.budget < 0:
            raise CorruptCheckpointError(f"{source}: the storage blobs hold more bytes than the file; the "
                                         "file is crafted (shared or nested blobs), not a checkpoint.")
        self.preload(root, depth + 1)  # blobs inside blobs: their globals are checked too
        if isinstance(root, PersistentRecord) and root.untouched:
            root = root.value
        if not isinstance(root, StorageRef):
            return None
        prefix = f"blob{number}/"
        for key, storage in storages.items():
            self.storages[prefix + key] = storage
        ref = StorageRef(prefix + root.key, root.dtype, root.numel, root.byte_offset, location=root.location)
        self.refs[id(record)] = self.by_content[content] = ref
        return ref


class Legacy:
    """torch's legacy stream (``_use_new_zipfile_serialization=False``): a `Container`.

    Attributes:
        name: ``"legacy"``.
    """

    name = "legacy"
    description = "torch legacy (_use_new_zipfile_serialization=False)"


    def sniff(self, head: bytes, size: int) -> bool:
        """Whether the bytes start a legacy stream (`is_legacy`).

        Args:
            head: the file's first bytes.
            size: the file's size (not needed).

        Returns:
            True for a legacy torch stream.
        """
        return is_legacy(head)

    def read(self, path: Path, options: ReadOptions, file: OpenFile | None = None) -> Checkpoint:
        """Read a legacy file's tensors without running anything from it.

        Args:
            path: the file.
            options: where the tensors go and whether unsafe globals are refused (``mmap`` is
                not used: the storages are read from the file, and copied).
            file: the file already open (every byte comes from it); None opens ``path`` once.

        Returns:
            The `Checkpoint`.

        Raises:
            CorruptCheckpointError: the stream or a blob in it is malformed or truncated.
            UnsafeCheckpointError: it names an unsafe global (when ``options`` refuses them).
            CheckpointError: the file changed while it was read.
        """
        reader = reader_for(options, str(path))
        with listing_globals(reader), opened(path, file) as f:
            buffer = map_file(f)
            size = len(buffer)
            blobs = BlobReader(reader, size)
            with FileRanges(f) as ranges:
                root, storages = _parse_legacy(buffer, reader, "legacy stream", (ranges, 0))
            blobs.preload(root)
            walked = walk(root, reader.source, blob=blobs.read, made=reader.made_tensors)
            if "" not in walked.modules:  # the root is no pickled model: a state dict
                reader.require_state_tier("torch.load(weights_only=True)")
            storages.update(blobs.storages)
            tensors = options.place(materialize(walked.tensors, storages, reader.source, size), walked.tensors)
        return result(path, self.name, walked, tensors, reader)

    def diagnose(self, head: bytes, size: int) -> str | None:
        """Nothing to say about a file `sniff` refused.

        Args:
            head: the file's first bytes.
            size: the file's size.

        Returns:
            None.
        """
        return None

    def integrity(self, path: Path) -> tuple[bool, str]:
        """A legacy file has no checksums: nothing is checked.

        Args:
            path: the file (not read).

        Returns:
            ``(False, why)``.
        """
        return False, "a legacy container stores no checksums: integrity not checkable"
