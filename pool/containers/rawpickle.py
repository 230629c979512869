"""A plain ``pickle.dump`` of a module: one pickle, storages nested as legacy byte blobs.

Some published checkpoints are plain pickles (``torch.load`` says "Invalid magic number"): each
storage is ``torch.storage._load_from_bytes(<a legacy torch stream>)``, parsed here by the legacy
parser (`pool.containers.legacy.BlobReader`). A plain pickle has no persistent ids.
"""

from __future__ import annotations

import pickle
import pickletools
import re
from pathlib import Path

from ..fileio import FileRanges, map_file, opened
from ..records import walk
from ..tensors import materialize
from ..transfer import OpenFile
from .base import Checkpoint, ReadOptions
from .legacy import BlobReader, is_legacy
from .pickled import listing_globals, reader_for, result

__all__ = ["PlainPickle"]

_LARGE = 1 << 16  # byte strings at least this long are read in place


class PlainPickle:
    """A plain ``pickle.dump`` of a module, storages as legacy byte blobs: a `Container`.

    Attributes:
        name: ``"pickle"``.
    """

    name = "pickle"
    description = "plain pickle (pickle.dump of the module)"


    def sniff(self, head: bytes, size: int) -> bool:
        """Whether the bytes start a pickle (any protocol) that is no legacy torch stream.

        Args:
            head: the file's first bytes.
            size: the file's size (not needed).

        Returns:
            True for ``PROTO`` with a protocol up to ``pickle.HIGHEST_PROTOCOL``, not followed by
            torch's magic number; or for a protocol 0 or 1 pickle (no ``PROTO``), recognised by its
            first opcodes (`_old_protocol`).
        """
        if len(head) > 1 and head[:1] == b"\x80":
            return head[1] <= pickle.HIGHEST_PROTOCOL and not is_legacy(head)
        return _old_protocol(head)

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
        reader = reader_for(options, str(path))
        # Storage blobs stay in the file (never copied into Python bytes); the legacy parser reads
        # their pickles from the mapping and their storages from the file: one copy of the bytes.
        with listing_globals(reader), opened(path, file) as f, FileRanges(f) as ranges:
            buffer = map_file(f)
            size = len(buffer)
            blobs = BlobReader(reader, size, ranges)
            root = reader.unpickle(buffer, what="pickle", large_bytes=_LARGE).root
            blobs.preload(root)
            walked = walk(root, reader.source, blob=blobs.read, made=reader.made_tensors)
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


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


#: How a protocol 0 or 1 checkpoint starts: a mark, a global, an empty dict, list or tuple.
_OLD_STARTS = frozenset(b"(c}])")


def _old_protocol(head: bytes) -> bool:
    """Whether ``head`` starts a protocol 0 or 1 pickle: it opens as a checkpoint's pickle does
    (`_OLD_STARTS`), at least three opcodes of those protocols parse up to the end of ``head`` (or a
    complete pickle ends), and each global named is a dotted Python name, so that text (YAML, JSON,
    an HTML error page) is not taken for one. Nothing is unpickled."""
    if not head or head[0] not in _OLD_STARTS:
        return False
    count = 0
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.proto > 1:
                return False
            if opcode.name in ("GLOBAL", "INST") and not (
                    isinstance(arg, str) and len(arg.split(" ")) == 2 and all(map(_NAME.fullmatch, arg.split(" ")))):
                return False
            count += 1
            if opcode.name == "STOP":
                return count >= 2
    except ValueError as exc:  # an unknown opcode is no pickle; an argument cut off by the head's end is
        if "unknown" in str(exc):
            return False
    except UnicodeDecodeError:
        pass
    return count >= 3
