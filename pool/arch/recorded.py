"""What a checkpoint's metadata records about its architecture: the activation and the attention
heads, which the weights' shapes cannot tell (a converted file's ``pool.*`` keys, a transformers
folder's ``hf.*`` ones).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ArchitectureMismatchError

__all__ = ["QUICK_GELU_METADATA", "HEADS_METADATA", "recorded_heads", "recorded_quick_gelu"]

#: The safetensors metadata key `pool.convert` writes the activation under ("true" / "false").
QUICK_GELU_METADATA = "pool.quick_gelu"
#: The metadata keys that give the attention heads per block (the weights cannot tell): ours, then
#: a transformers config's.
HEADS_METADATA = "pool.heads"
_HEADS_KEYS = (HEADS_METADATA, "hf.num_attention_heads")


def recorded_heads(metadata: Mapping[str, str]) -> str | None:
    """The attention heads per block a file's metadata records (as written), or None.

    Args:
        metadata: a checkpoint's metadata: `HEADS_METADATA` (ours) is read first, then a
            transformers folder's ``hf.num_attention_heads``.

    Returns:
        The recorded value as a string (not checked), or None when neither key is there.

    Example:
        >>> recorded_heads({"pool.heads": "12"}), recorded_heads({})
        ('12', None)
    """
    return next((metadata[k] for k in _HEADS_KEYS if k in metadata), None)



def recorded_quick_gelu(metadata: Mapping[str, str]) -> bool | None:
    """The activation a file records in its metadata, or None when it records none: a converted
    file's `QUICK_GELU_METADATA`, or a transformers folder's ``hidden_act`` (``quick_gelu``, or
    ``gelu``, exact like nn.GELU; transformers' default is ``quick_gelu``).

    Args:
        metadata: a checkpoint's metadata (`pool.checkpoint.Checkpoint.metadata`).

    Returns:
        True for QuickGELU, False for GELU, None when nothing is recorded.

    Raises:
        ArchitectureMismatchError: a transformers activation open_clip's ViT does not have.

    Example:
        >>> recorded_quick_gelu({"pool.quick_gelu": "false"}), recorded_quick_gelu({})
        (False, None)
        >>> recorded_quick_gelu({"hf.model_type": "clip_vision_model"})
        True
    """
    value = metadata.get(QUICK_GELU_METADATA)
    if value is not None:
        return value == "true"
    if "hf.model_type" not in metadata:
        return None
    act = metadata.get("hf.hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ArchitectureMismatchError(
            f"the transformers config says hidden_act={act!r}; open_clip's ViT uses quick_gelu or gelu (exact), "
            "so these weights would compute other features.")
    return act == "quick_gelu"

