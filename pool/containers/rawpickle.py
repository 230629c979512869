"""A plain ``pickle.dump`` of a module: one pickle, storages nested as legacy byte blobs.

Some published checkpoints are plain pickles (``torch.load`` says "Invalid magic number"): each
storage is ``torch.storage._load_from_bytes(<a legacy torch stream>)``, parsed here by the legacy
parser (`pool.containers.legacy.BlobReader`). A plain pickle has no persistent ids.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from ..records import walk
from ..tensors import materialize
from ..unpickler import Reader
from .base import Checkpoint, FileRanges, OpenFile, ReadOptions, listing_globals, map_file, opened, result
from .legacy import BlobReader, is_legacy

__all__ = ["PlainPickle"]

_LARGE = 1 << 16  # byte strings at least this long are read in place


class PlainPickle:
    """A plain ``pickle.dump`` of a module, storages as legacy byte blobs: a `Container`.

    Attributes:
        name: ``"pickle"``.
    """

    name = "pickle"

    def describe(self) -> str:
        """One line for people: what this format is.

        Returns:
            ``"plain pickle (pickle.dump of the module)"``.
        """
        return "plain pickle (pickle.dump of the module)"

    def sniff(self, head: bytes, size: int) -> bool:
        """Whether the bytes start with a pickle ``PROTO`` opcode and are no legacy torch stream.

        Args:
            head: the file's first bytes.
            size: the file's size (not needed).

        Returns:
            True for ``PROTO`` with a protocol up to ``pickle.HIGHEST_PROTOCOL``, not followed by
            torch's magic number.
        """
        return (len(head) > 1 and head[:1] == b"\x80" and head[1] <= pickle.HIGHEST_PROTOCOL
                and not is_legacy(head))

    def read(self, path: Path, options: ReadOptions, file: OpenFile | None = None) -> Checkpoint:
        """Read a plain pickle's tensors without running anything from it.

        Args:
            path: the file.
            options: where the tensors go and whether unsafe globals are refused (``mmap`` is
                not used: the pickle is mapped, the storages read from the file).
            file: the file already open (every byte comes from it); None opens ``path`` once.

        Returns:
            The `Checkpoint`.

        Raises:
            CorruptCheckpointError: the pickle or a storage blob is malformed or truncated, or
                the pickle uses persistent ids (no plain pickle does).
            UnsafeCheckpointError: it names an unsafe global (when ``options`` refuses them).
            CheckpointError: the file changed while it was read.
        """
        reader = Reader(str(path), refuse_unsafe=options.refuse_unsafe)
        # Storage blobs stay in the file (never copied into Python bytes); the legacy parser reads
        # their pickles from the mapping and their storages from the file: one copy of the bytes.
        with listing_globals(reader), opened(path, file) as f, FileRanges(f) as ranges:
            buffer = map_file(f)
            size = len(buffer)
            blobs = BlobReader(reader, size, ranges)
            root = reader.unpickle(buffer, what="pickle", large_bytes=_LARGE).root
            blobs.preload(root)
            walked = walk(root, reader.source, blob=blobs.read)
            del root
            tensors = options.place(materialize(walked.tensors, blobs.storages, reader.source, size), walked.tensors)
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
        """A plain pickle has no checksums: nothing is checked.

        Args:
            path: the file (not read).

        Returns:
            ``(False, why)``.
        """
        return False, "a plain pickle stores no checksums: integrity not checkable"
