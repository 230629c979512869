"""torch's zip checkpoints (``torch.save``, the default since torch 1.6).

An archive ``<name>/``: ``data.pkl`` (the pickle, storages as persistent ids), ``data/<key>`` (one
member per storage, raw little-endian bytes), ``byteorder``, ``version``. Read with our own zip
parser (`pool.containers.zipfmt`) and our own unpickler; TorchScript archives (``constants.pkl``,
``code/``) are refused, never run. Tensors are memory-mapped from the file by default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError, brief
from ..fileio import file_storage, map_file, opened
from ..record_values import storage_from_pid
from ..records import walk
from ..tensors import StorageRef, materialize
from ..transfer import OpenFile, Span, read_spans
from .base import Checkpoint, ReadOptions
from .legacy import BlobReader
from .pickled import listing_globals, reader_for, result
from .zipfmt import ZipArchive, check_crcs, parse_zip

__all__ = ["TorchZip", "TorchArchive", "open_archive"]

_MAX_FORMAT_VERSION = 10  # torch's kMaxSupportedFileFormatVersion


def _size_mismatch(claimed: int, held: int) -> str:
    if claimed > held:
        return f"it claims {claimed} bytes but only {held} are in its record"
    return f"its record holds {held} bytes, more than the {claimed} it claims (torch refuses that)"


def _refuse_torchscript(source: str) -> Callable[[list[str]], None]:
    def check(names: list[str]) -> None:
        inside = [n.split("/", 1)[1] for n in names if "/" in n]  # names below the archive's folder
        if any(n == "constants.pkl" or n.startswith("code/") for n in inside):
            raise UnsafeCheckpointError(
                f"{source}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint: it "
                "carries code that loading it would run, so it is not read. If you trust it, load it "
                "with torch.jit.load and save its state_dict() with torch.save.", ["TorchScript"])
    return check


class TorchArchive:
    """A parsed torch zip: its folder prefix, its pickle member and its storage records.

    Args:
        source: how error messages name the file.
        archive: the parsed zip (`pool.containers.zipfmt.parse_zip`).

    Raises:
        CorruptCheckpointError: the archive has no single ``<folder>/data.pkl``, or members
            outside that folder.
    """

    def __init__(self, source: str, archive: ZipArchive) -> None:
        names = list(archive.members)
        pickles = [n for n in names if n.rsplit("/", 1)[-1] == "data.pkl" and n.count("/") == 1]
        if len(pickles) != 1:
            raise CorruptCheckpointError(
                f"{source}: a zip archive without data.pkl (holds {', '.join(names[:5]) or 'nothing'}); "
                "not a torch checkpoint.")
        prefix = pickles[0][:-len("data.pkl")]
        versions = [n for n in (prefix + ".data/version", prefix + "version") if n in archive.members]
        if not versions:
            raise CorruptCheckpointError(
                f"{source}: a zip archive without {prefix}version; torch.save always writes it and "
                "torch.load refuses an archive without it: the file is damaged or was not written by torch.")
        outside = [n for n in names if not n.startswith(prefix)]
        if outside:
            raise CorruptCheckpointError(
                f"{source}: a zip archive with members outside its folder {prefix!r} "
                f"({', '.join(outside[:3])}); not a torch.save checkpoint.")
        self.source = source
        self.archive = archive
        self.prefix = prefix
        self.version = versions[0]  # torch reads .data/version when the archive has one
        self.records = {name[len(prefix) + 5:]: m for name, m in archive.members.items()
                        if name.startswith(prefix + "data/")}
        self.refs: dict[str, StorageRef] = {}

    def pickle_bytes(self, buffer: memoryview) -> bytes:
        """The bytes of ``data.pkl``, their CRC32 checked.

        Args:
            buffer: the whole file's bytes.

        Returns:
            A copy of the pickle's bytes.

        Raises:
            CorruptCheckpointError: the member fails its CRC32 check.
        """
        try:
            return self.archive.read(buffer, self.prefix + "data.pkl")
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{self.source}: {exc}; the file is damaged: download it again.") from None

    def check_version(self, buffer: memoryview) -> None:
        """Refuse a format version torch's reader would not read (it reads ``.data/version``, else
        ``version``: a decimal number from 1 to 10 with a newline), or a ``.storage_alignment``
        that ``torch.load`` cannot parse as a number.

        Args:
            buffer: the whole file's bytes.

        Raises:
            CorruptCheckpointError: the version member holds anything else.
        """
        text = self.archive.read(buffer, self.version).strip()
        if not (text.isdigit() and len(text) <= 3 and 1 <= int(text) <= _MAX_FORMAT_VERSION):
            raise CorruptCheckpointError(
                f"{self.source}: {self.version} says {text[:20]!r}; torch reads zip formats 1 to "
                f"{_MAX_FORMAT_VERSION}. The file is damaged or was not written by torch.save.")
        alignment = self.prefix + ".storage_alignment"  # torch.load parses it with int()
        if alignment in self.archive.members:
            value = self.archive.read(buffer, alignment)
            if not (value.isdigit() and len(value) <= 6):
                raise CorruptCheckpointError(
                    f"{self.source}: {alignment} says {value[:20]!r}, not a number of bytes; torch.load refuses "
                    "it. The file is damaged or was not written by torch.save.")

    def storage_ref(self, pid: Any) -> StorageRef:
        """A persistent id as torch's zip reader resolves it: one dtype and size per storage key
        (torch keeps the first it meets), the record exactly that many bytes, no legacy view.

        Args:
            pid: the persistent id the pickle gave.

        Returns:
            The `pool.tensors.StorageRef`.

        Raises:
            CorruptCheckpointError: a malformed id, a view, a key named with two dtypes or sizes,
                or a record missing or of another size.
        """
        if not (isinstance(pid, tuple) and len(pid) == 5):  # torch unpacks exactly these five fields
            raise CorruptCheckpointError(f"{self.source}: a storage reference of {brief(pid)}; torch.save writes "
                                         "('storage', type, key, location, size): the file is damaged or crafted.")
        ref = storage_from_pid(pid, self.source)
        first = self.refs.setdefault(ref.key, ref)
        record = self.records.get(ref.key)
        if ref.root_numel >= 0 or (first.dtype, first.numel) != (ref.dtype, ref.numel) or record is None \
                or record.size != ref.numel * ref.dtype.itemsize:
            why = ("a storage view, which zip checkpoints never hold" if ref.root_numel >= 0 else
                   "a key named with two element types or sizes (torch would take the first)"
                   if first is not ref else f"no data/{ref.key} record" if record is None else
                   _size_mismatch(ref.numel * ref.dtype.itemsize, record.size))
            raise CorruptCheckpointError(f"{self.source}: storage {brief(ref.key)}: {why}; the file is damaged "
                                         "or crafted so that readers load different weights.")
        return ref

    def check_byteorder(self, buffer: memoryview) -> None:
        """Refuse a big-endian checkpoint (an archive without ``byteorder`` is little-endian).

        Args:
            buffer: the whole file's bytes.

        Raises:
            CorruptCheckpointError: the ``byteorder`` member says anything but ``little``.
        """
        member = self.archive.members.get(self.prefix + "byteorder")
        if member is not None and bytes(buffer[member.offset:member.offset + member.size]) != b"little":
            raise CorruptCheckpointError(f"{self.source}: a big-endian torch checkpoint; only little-endian "
                                         "files are read. Re-save it on a little-endian machine.")


def open_archive(buffer: memoryview, source: str) -> TorchArchive:
    """Parse a torch zip checkpoint (refusing TorchScript archives first).

    Args:
        buffer: the whole file's bytes.
        source: how error messages name the file.

    Returns:
        The `TorchArchive`.

    Raises:
        UnsafeCheckpointError: a TorchScript archive (``constants.pkl`` or ``code/``).
        CorruptCheckpointError: a zip archive the strict parser refuses, or no torch checkpoint.
    """
    return TorchArchive(source, parse_zip(buffer, source, _refuse_torchscript(source)))


class TorchZip:
    """torch's zip checkpoints (``torch.save`` since torch 1.6): a `Container`.

    Attributes:
        name: ``"zip"``.
    """

    name = "zip"
    description = "torch zip (torch.save, torch >= 1.6)"


    def sniff(self, head: bytes, size: int) -> bool:
        """Whether the bytes start a zip archive (a local file header).

        Args:
            head: the file's first bytes.
            size: the file's size (not needed).

        Returns:
            True when the file starts with ``PK\\x03\\x04``.
        """
        return head.startswith(b"PK\x03\x04")

    def diagnose(self, head: bytes, size: int) -> str | None:
        """Why a file that `sniff` refused is a zip all the same: an empty or split archive.

        Args:
            head: the file's first bytes.
            size: the file's size.

        Returns:
            A message for an empty or split zip archive, else None.
        """
        if head.startswith((b"PK\x05\x06", b"PK\x07\x08")):
            return "an empty or split zip archive, not a torch checkpoint"
        return None

    def read(self, path: Path, options: ReadOptions, file: OpenFile | None = None) -> Checkpoint:
        """Read a torch zip's tensors without running anything from it.

        Args:
            path: the file.
            options: where the tensors go; the storages the state dict uses are read in bulk into
                private memory (the CPU) or onto the device, or, with ``mmap=True`` only, are views
                of the mapped file.
            file: the file already open (every byte comes from it); None opens ``path`` once.

        Returns:
            The `Checkpoint`.

        Raises:
            UnsafeCheckpointError: a TorchScript archive, or a pickle naming an unsafe global
                (when ``options`` refuses them).
            CorruptCheckpointError: the archive or its pickle is malformed, big-endian, or refers
                to storage the archive does not hold.
            CheckpointError: the file changed while it was read.
        """
        source = str(path)
        reader = reader_for(options, source)
        with listing_globals(reader), opened(path, file) as f:
            buffer = map_file(f)
            archive = open_archive(buffer, source)
            archive.check_byteorder(buffer)
            archive.check_version(buffer)
            blobs = BlobReader(reader, len(buffer))
            unpickled = reader.unpickle(archive.pickle_bytes(buffer), what="data.pkl",
                                        persistent=archive.storage_ref)
            blobs.preload(unpickled.root)
            walked = walk(unpickled.root, source, blob=blobs.read, made=reader.made_tensors)
            if "" not in walked.modules:  # the root is no pickled model: a state dict
                reader.require_state_tier("torch.load(weights_only=True)")
            used = {spec.storage.key for spec in walked.tensors.values()}
            missing = sorted(k for k in used if k not in archive.records and k not in blobs.storages)
            if missing:
                raise CorruptCheckpointError(
                    f"{source}: the pickle refers to storage {missing[0]!r} but the archive has no "
                    f"data/{missing[0]} record; the file is damaged: download it again.")
            device = options.device if options.device is not None else torch.device("cpu")
            keys = [k for k in archive.records if k in used]
            if device.type == "cuda" or (device.type == "cpu" and not options.mmap):
                # one bulk read of just the records the state dict uses (pool.transfer)
                spans = [Span(archive.records[k].offset, archive.records[k].size) for k in keys]
                storages = dict(zip(keys, read_spans(f, spans, device), strict=True))
            else:  # mapped from the file
                whole = file_storage(buffer)
                storages = {k: whole[archive.records[k].offset:archive.records[k].offset + archive.records[k].size]
                            for k in keys}
            storages.update(blobs.storages)
            # what is not on the device yet (blob storages, other devices than cpu/cuda): moved once each
            tensors = options.place(materialize(walked.tensors, storages, source, len(buffer)), walked.tensors)
        return result(path, self.name, walked, tensors, reader)

    def integrity(self, path: Path) -> tuple[bool, str]:
        """Recompute every member's CRC32 over its bytes (torch's reader never checks them).

        Args:
            path: the file.

        Returns:
            ``(True, detail)``: the members and bytes checked.

        Raises:
            CorruptCheckpointError: a member fails its CRC32 check, or the zip is malformed.
        """
        buffer = map_file(path)
        archive = parse_zip(buffer, str(path))
        total = check_crcs(buffer, archive, str(path))
        return True, f"{len(archive.members)} zip members, {total:,} bytes: CRC32 ok"
