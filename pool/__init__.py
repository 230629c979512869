"""pool: safe, offline, fast loading of OpenCLIP vision-encoder pools and classification heads.

Public API (README.md, "Using it from Python")::

    from pool import OpenCLIPVisionModelPool, ImageEncoder, ClassificationHead
    from pool.checkpoint import load_state_dict

Names are imported on first use (PEP 562), so ``import pool`` (and the opt-in pytest plugin it
registers) does not import torch or open_clip until something needs them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the package's version: pyproject.toml reads it from here

_EXPORTS = {
    "ArchitectureMismatchError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "CorruptCheckpointError": "errors",
    "DatasetError": "errors",
    "PoolError": "errors",
    "UnsafeCheckpointError": "errors",
    "CheckpointNotFoundError": "errors",
    "DestinationExistsError": "errors",
    "DistributedError": "errors",
    "FileChangedError": "errors",
    "NotACacheError": "errors",
    "TaskVectorError": "errors",
    "UnreadableCheckpointError": "errors",
    "UsageError": "errors",
    "LockMismatchError": "errors",
    "Checkpoint": "checkpoint",
    "load_state_dict": "checkpoint",
    "read_checkpoint": "checkpoint",
    "VisionArch": "arch",
    "ClassificationHead": "modeling",
    "ImageEncoder": "modeling",
    "OpenCLIPVisionModelPool": "modelpool",
    "EntryResult": "verify_report",
    "VerifyReport": "verify_report",
    "Atlas": "atlas_core",
    "atlas": "atlas_core",
}

__all__ = [
    "ArchitectureMismatchError",
    "Atlas",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ClassificationHead",
    "ConfigError",
    "CorruptCheckpointError",
    "DatasetError",
    "DestinationExistsError",
    "DistributedError",
    "EntryResult",
    "FileChangedError",
    "ImageEncoder",
    "LockMismatchError",
    "NotACacheError",
    "OpenCLIPVisionModelPool",
    "PoolError",
    "TaskVectorError",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "UsageError",
    "VerifyReport",
    "VisionArch",
    "__version__",
    "atlas",
    "load_state_dict",
    "read_checkpoint",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .arch import VisionArch
    from .atlas_core import Atlas, atlas
    from .checkpoint import Checkpoint, load_state_dict, read_checkpoint
    from .errors import (
        ArchitectureMismatchError,
        CheckpointError,
        CheckpointNotFoundError,
        ConfigError,
        CorruptCheckpointError,
        DatasetError,
        DestinationExistsError,
        DistributedError,
        FileChangedError,
        LockMismatchError,
        NotACacheError,
        PoolError,
        TaskVectorError,
        UnreadableCheckpointError,
        UnsafeCheckpointError,
        UsageError,
    )
    from .modeling import ClassificationHead, ImageEncoder
    from .modelpool import OpenCLIPVisionModelPool
    from .verify_report import EntryResult, VerifyReport


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


logging.getLogger(__name__).addHandler(logging.NullHandler())
