"""A plain ``pickle.dump`` of a module: one pickle, storages nested as legacy byte blobs.

Some published checkpoints are plain pickles (``torch.load`` says "Invalid magic number"): each
storage is ``torch.storage._load_from_bytes(<a legacy torch stream>)``, parsed here by the legacy
parser (`pool.containers.legacy.BlobReader`). A plain pickle has no persistent ids.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

from ..errors import CorruptCheckpointError
from ..records import walk
from ..tensors import materialize
from ..unpickler import Reader
from .base import FileRanges, ReadOptions, ReadResult, map_file
from .legacy import BlobReader, is_legacy

__all__ = ["PlainPickle"]

log = logging.getLogger(__name__)
_LARGE = 1 << 16  # byte strings at least this long are read in place


class PlainPickle:
    name = "pickle"

    def describe(self) -> str:
        return "plain pickle (pickle.dump of the module)"

    def sniff(self, head: bytes, size: int) -> bool:
        return (len(head) > 1 and head[:1] == b"\x80" and head[1] <= pickle.HIGHEST_PROTOCOL
                and not is_legacy(head))

    def read(self, path: Path, options: ReadOptions) -> ReadResult:
        source = str(path)
        reader = Reader(source, refuse_unsafe=options.refuse_unsafe)
        # Storage blobs stay in the file (never copied into Python bytes); the legacy parser reads
        # their pickles from the mapping and their storages from the file: one copy of the bytes.
        with FileRanges(path) as ranges:
            blobs = BlobReader(reader, path.stat().st_size, ranges)
            try:
                unpickled = reader.unpickle(map_file(path), what="pickle", large_bytes=_LARGE)
                blobs.preload(unpickled.root)
                walked = walk(unpickled.root, source, blob=blobs.read)
            except CorruptCheckpointError as exc:
                exc.checkpoint_globals = reader.named_globals
                raise
        del unpickled
        tensors = materialize(walked.tensors, blobs.storages, source)
        if options.device is not None and options.device.type != "cpu":
            tensors = {k: v.to(options.device) for k, v in tensors.items()}
        log.debug("read %s (plain pickle): %d tensors", source, len(tensors))
        return ReadResult(tensors, walked.root_type, walked.modules, reader.named_globals,
                          wrapper=walked.wrapper)

    def integrity(self, path: Path) -> tuple[bool, str]:
        return False, "a plain pickle stores no checksums: integrity not checkable"
