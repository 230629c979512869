"""A Hugging Face transformers model folder as one checkpoint: ``config.json`` beside
``model.safetensors`` (or ``pytorch_model.bin``, a torch zip read by our own parser).

The weights are read by the container their bytes are (nothing from the folder runs); the fields
of ``config.json`` that decide how the tensors are used become metadata (``hf.model_type``,
``hf.hidden_act``, ``hf.layer_norm_eps``, ``hf.projection_dim``): for a whole ``CLIPModel`` they
are its ``vision_config``'s. Which models the keys describe is for `pool.keys` to say; this module
knows only the folder's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError
from .base import Checkpoint

__all__ = ["NAME", "CONFIG", "is_hf_folder", "weights_file", "read_config", "with_config"]

#: the container name a folder reads as (`pool.checkpoint.sniff_container`, `Checkpoint.container`)
NAME = "hf"
CONFIG = "config.json"
#: weight files looked for, in this order
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20
_SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_folder(path: Path) -> bool:
    """Whether a path is a transformers model folder: ``config.json`` and a weights file (or a shard index).

    Args:
        path: any path.

    Returns:
        True for a folder holding `CONFIG` and one of `_WEIGHTS` (or a shard index).
    """
    return path.is_dir() and (path / CONFIG).is_file() and any(
        (path / name).is_file() for name in (*_WEIGHTS, *_SHARDED))


def weights_file(folder: Path) -> Path:
    """The folder's single weights file.

    Args:
        folder: a transformers model folder.

    Returns:
        ``model.safetensors`` when there is one, else ``pytorch_model.bin``.

    Raises:
        CorruptCheckpointError: only a sharded model (an index file) or no weights file.
    """
    for name in _WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    sharded = [name for name in _SHARDED if (folder / name).is_file()]
    if sharded:
        raise CorruptCheckpointError(f"{folder}: holds a sharded model ({sharded[0]}); pool reads one weights "
                                     "file. Merge the shards with transformers (save_pretrained with a "
                                     "larger max_shard_size) first.")
    raise CorruptCheckpointError(f"{folder}: no {' or '.join(_WEIGHTS)} beside {CONFIG}.")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, checked to be a small JSON object (read before the weights).

    Raises:
        CorruptCheckpointError: too large, not JSON, or not an object.
    """
    path = folder / CONFIG
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes; a model config is a few kB.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc}); the folder is damaged.") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object.")
    return config


def with_config(folder: Path, config: dict[str, Any], weights: Checkpoint) -> Checkpoint:
    """The folder's `Checkpoint`: its weights file's, with ``config.json`` attached as metadata.

    `pool.checkpoint` reads the config (`read_config`), then the weights file (`weights_file`) as
    any other file, then calls this: the container never reads a file through its caller.

    Args:
        folder: a transformers model folder.
        config: what `read_config` returned.
        weights: the weights file, read.

    Returns:
        The `Checkpoint`: container ``hf``, root type ``transformers <architecture>``, the weights
        file's tensors and globals, and ``hf.*`` metadata from ``config.json`` (a ``CLIPModel``'s
        from its ``vision_config``).

    Raises:
        CorruptCheckpointError: a config value of the wrong type.
    """
    model_type = str(config.get("model_type", ""))
    vision = config.get("vision_config") if model_type == "clip" else config
    if not isinstance(vision, dict):
        vision = {}
    metadata = dict(weights.metadata)
    metadata["hf.model_type"] = model_type
    for key in ("hidden_act", "layer_norm_eps", "projection_dim", "image_size", "num_attention_heads"):
        value = vision.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            metadata[f"hf.{key}"] = str(value)
        elif value is not None:
            raise CorruptCheckpointError(f"{folder / CONFIG}: {key} is {type(value).__name__}, not a number or name.")
    architectures = config.get("architectures")
    kind = architectures[0] if isinstance(architectures, list) and architectures and isinstance(
        architectures[0], str) else (model_type or "unknown")
    return Checkpoint(folder, NAME, weights.state_dict, f"transformers {kind[:100]}",
                      globals=weights.globals, metadata=metadata)
