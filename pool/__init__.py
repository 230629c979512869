"""pool: safe, offline, fast loading of OpenCLIP vision-encoder pools and classification heads.

Public API (see DESIGN.md section 4)::

    from pool import OpenCLIPVisionModelPool, ImageEncoder, ClassificationHead
    from pool.checkpoint import load_state_dict
"""

from __future__ import annotations

import logging

from .arch import VisionArch
from .checkpoint import Checkpoint, load_state_dict, read_checkpoint
from .errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    DatasetError,
    PoolError,
    UnsafeCheckpointError,
)
from .modeling import ClassificationHead, ImageEncoder
from .modelpool import OpenCLIPVisionModelPool

__version__ = "0.1.0"

__all__ = [
    "ArchitectureMismatchError",
    "Checkpoint",
    "CheckpointError",
    "ClassificationHead",
    "ConfigError",
    "CorruptCheckpointError",
    "DatasetError",
    "ImageEncoder",
    "OpenCLIPVisionModelPool",
    "PoolError",
    "UnsafeCheckpointError",
    "VisionArch",
    "load_state_dict",
    "read_checkpoint",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
