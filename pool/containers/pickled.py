"""What the pickle containers (torch zip, torch legacy, plain pickle) share: the unpickling reader
of a read, refusals that list the globals seen, and the `Checkpoint` of a walked pickle.

Only the pickle containers import this module, so that the safetensors and transformers
containers depend on no pickle module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError, amended
from ..records import Walked
from ..unpickler import Reader
from .base import Checkpoint, ReadOptions

log = logging.getLogger("pool.containers.base")  # the name its messages always had

__all__ = ["reader_for", "listing_globals", "result"]


def reader_for(options: ReadOptions, source: str) -> Reader:
    """The unpickling `pool.unpickler.Reader` of one read under ``options``.

    Args:
        options: the read's options (their refusal policy and user-allowed globals apply).
        source: how error messages name the file.

    Returns:
        A new `pool.unpickler.Reader`.
    """
    return Reader(source, refuse_unsafe=options.refuse_unsafe, allow_globals=options.allow_globals)


@contextlib.contextmanager
def listing_globals(reader: Reader) -> Iterator[None]:
    """Any CheckpointError raised inside carries the globals the reader had seen by then.

    That is what ``inspect`` lists for a file it cannot read. An error that already carries
    globals is re-raised as it is; another is re-raised as an `pool.errors.amended` copy.

    Args:
        reader: the read's `pool.unpickler.Reader`.

    Yields:
        None: the block runs as it is.

    Raises:
        CheckpointError: what the block raised, with ``checkpoint_globals`` set.
    """
    try:
        yield
    except CheckpointError as exc:
        if exc.checkpoint_globals:
            raise
        raise amended(exc, checkpoint_globals=reader.named_globals) from exc


def result(path: Path, container: str, walked: Walked, tensors: dict[str, torch.Tensor],
           reader: Reader) -> Checkpoint:
    """The Checkpoint of a pickled container.

    Args:
        path: the file read.
        container: its container's name.
        walked: what `pool.records.walk` found in its pickle.
        tensors: the tensors, placed.
        reader: the read's reader, whose globals the checkpoint lists.

    Returns:
        The `Checkpoint`.
    """
    log.debug("read %s (%s): %d tensors", path, container, len(tensors))
    return Checkpoint(path, container, tensors, walked.root_type, walked.modules, reader.named_globals,
                      wrapper=walked.wrapper)
