"""Key normalisation across checkpoint writers, in one place.

Writers in the wild name the same tensors differently:

* ``src.modeling.ImageEncoder`` state dicts and pickles: ``model.visual.conv1.weight``;
* open_clip's own CLIP state dict: ``visual.conv1.weight``;
* training scripts: ``{"state_dict": {"module.visual.conv1.weight": ...}}`` (DDP prefixes);
* full CLIP state dicts that still hold the text transformer (``transformer.resblocks.*``).

`to_clip_keys` maps all of them onto open_clip CLIP keys (no prefix, no text transformer);
`checkpoint_kind` says whether tensors are an encoder or a classification head, and
`describe_layout` names the layout for people. Every other module asks these three.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypeVar

import torch

from .hf import from_hf, is_hf_layout

__all__ = ["to_clip_keys", "to_clip_modules", "strip_ddp", "checkpoint_kind", "describe_layout", "key_mismatch",
           "task_vector_pair",
           "ENCODER_PREFIX", "DDP_PREFIX", "ENCODER_MARKER", "TEXT_SIDE_KEYS"]

log = logging.getLogger(__name__)

#: The prefix `pool.ImageEncoder` (like the original) puts before CLIP keys.
ENCODER_PREFIX = "model."
#: The prefix DistributedDataParallel puts before every key.
DDP_PREFIX = "module."
#: The tensor (in CLIP keys) whose presence makes a state dict a ViT image encoder.
ENCODER_MARKER = "visual.conv1.weight"
#: Top-level CLIP entries of the text side that an ImageEncoder keeps (the transformer is deleted).
TEXT_SIDE_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                  "text_projection", "logit_scale", "logit_bias")
_DROPPED_PREFIXES = ("transformer.",)
_DROPPED_KEYS = ("attn_mask",)
_V = TypeVar("_V")


def _has_ddp_prefix(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(DDP_PREFIX) for k in keys)


def strip_ddp(state_dict: Mapping[str, _V]) -> dict[str, _V]:
    """``state_dict`` without DistributedDataParallel's ``module.`` prefix, when every key has it.

    Args:
        state_dict: values (tensors, usually) by key.

    Returns:
        A new dict: the keys without the prefix when every key had it, else the keys unchanged.

    Example:
        >>> strip_ddp({"module.weight": 1, "module.bias": 2})
        {'weight': 1, 'bias': 2}
        >>> strip_ddp({"module.weight": 1, "bias": 2})  # not every key: unchanged
        {'module.weight': 1, 'bias': 2}
    """
    if not _has_ddp_prefix(list(state_dict)):
        return dict(state_dict)
    return {k[len(DDP_PREFIX):]: v for k, v in state_dict.items()}


def checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Whether tensors are an image encoder, a classification head or neither.

    Args:
        state_dict: tensors by key, in any layout `to_clip_keys` knows (DDP prefix included).

    Returns:
        ``"encoder"`` (a ViT image tower in any known key layout), ``"head"`` (a 2-d ``weight``
        and optionally a ``bias``, nothing else) or ``"unknown"``.

    Raises:
        ArchitectureMismatchError: transformers-layout keys that do not map (as `to_clip_keys`).

    Example:
        >>> import torch
        >>> checkpoint_kind({"module.model.visual.conv1.weight": torch.zeros(8, 3, 4, 4)})
        'encoder'
        >>> checkpoint_kind({"weight": torch.zeros(10, 512), "bias": torch.zeros(10)})
        'head'
        >>> checkpoint_kind({"weight": torch.zeros(10)})
        'unknown'
    """
    clip = to_clip_keys(state_dict)
    if ENCODER_MARKER in clip:
        return "encoder"
    head = strip_ddp(state_dict)
    weight = head.get("weight")
    if set(head) <= {"weight", "bias"} and weight is not None and weight.dim() == 2:
        return "head"
    return "unknown"


def describe_layout(keys: list[str], wrapper: str | None = None) -> str:
    """How a file's tensors are named, for people (``inspect`` shows it).

    Args:
        keys: the state dict's keys, as the file has them.
        wrapper: the key of the dict the tensors sat in (``"state_dict"``), or None.

    Returns:
        ``model.visual.* (task_vectors ImageEncoder)``, ``visual.* (open_clip CLIP)``,
        ``vision_model.* (transformers CLIP)``, ``weight, bias`` or the first three keys, with the
        DDP prefix and wrapper noted.

    Example:
        >>> describe_layout(["module.model.visual.conv1.weight"], wrapper="state_dict")
        'model.visual.* (task_vectors ImageEncoder), module. prefix (DDP), wrapped in {"state_dict": ...}'
    """
    ddp = _has_ddp_prefix(keys)
    stripped = [k[len(DDP_PREFIX):] for k in keys] if ddp else list(keys)
    if any(k.startswith(ENCODER_PREFIX + "visual.") for k in stripped):
        layout = "model.visual.* (task_vectors ImageEncoder)"
    elif is_hf_layout(stripped):
        layout = "vision_model.* (transformers CLIP)"
    elif any(k.startswith("visual.") for k in stripped):
        layout = "visual.* (open_clip CLIP)"
    elif set(stripped) <= {"weight", "bias"}:
        layout = "weight, bias"
    else:
        layout = ", ".join(stripped[:3]) + (" ..." if len(stripped) > 3 else "")
    if ddp:
        layout += ", module. prefix (DDP)"
    if wrapper:
        layout += f', wrapped in {{"{wrapper}": ...}}'
    return layout


def to_clip_keys(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                 deferred: bool = False) -> dict[str, torch.Tensor]:
    """Any known writer's keys -> open_clip CLIP keys, text transformer dropped.

    The DDP ``module.`` prefix (when every key has it) and the ImageEncoder's ``model.`` prefix
    are removed; ``transformer.*`` and ``attn_mask`` (the text transformer, which an ImageEncoder
    deletes) are dropped. transformers' CLIP layout (``vision_model.*``) goes through
    `pool.hf.from_hf`.

    Args:
        state_dict: tensors by key, in any of the layouts the module docstring lists, or
            transformers' CLIP layout.
        source: how the debug log (and a transformers layout's errors) name the tensors' file.
        deferred: for transformers' layout, make the fused and transposed tensors only when each
            is looked up (`pool.hf.from_hf`), so a mapped file is not copied up front.

    Returns:
        A new dict of the tensors under open_clip CLIP keys (not copied, except transformers'
        fused q/k/v and transposed projections).

    Raises:
        ArchitectureMismatchError: a transformers key has no open_clip counterpart, or a layer
            lacks one of its q/k/v projections.

    Example:
        >>> list(to_clip_keys({"module.model.visual.proj": torch.zeros(1)}))
        ['visual.proj']
    """
    plain = strip_ddp(state_dict)
    if is_hf_layout(list(plain)):  # transformers' CLIP: renamed, q/k/v fused, projections transposed
        return from_hf(plain, source=source, deferred=deferred)  # type: ignore[return-value]
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in plain.items():
        k = key[len(ENCODER_PREFIX):] if key.startswith(ENCODER_PREFIX) else key
        if k.startswith(_DROPPED_PREFIXES) or k in _DROPPED_KEYS:
            dropped.append(key)
            continue
        out[k] = value
    if dropped:
        log.debug("%s: dropped %d text-transformer entries (e.g. %s): an ImageEncoder has no text "
                  "transformer", source, len(dropped), dropped[0])
    return out


def to_clip_modules(modules: Mapping[str, object] | None) -> dict[str, object]:
    """Module-record paths of a pickled ImageEncoder (``model.visual...``) -> CLIP paths.

    What `to_clip_keys` does for tensor names, for `pool.checkpoint.Checkpoint.modules`.

    Args:
        modules: module records by path, or None.

    Returns:
        A new dict with the ``model.`` prefix removed from each path (empty for None).

    Example:
        >>> to_clip_modules({"model.visual.transformer": "record", "": "root"})
        {'visual.transformer': 'record', '': 'root'}
    """
    return {(k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else k): v
            for k, v in (modules or {}).items()}


def _preview(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def task_vector_pair(finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The two encoders' state dicts a task vector is taken over: all keys but one-sided leftovers.

    Left out are the text-side leftovers (`TEXT_SIDE_KEYS`) that only one of them has. An encoder
    read from a transformers vision model has none of those, one read from a task_vectors pickle
    has them all, and a forward pass uses none of them, so such pairs line up on every
    image-tower key.

    Args:
        finetuned: the fine-tuned encoder's state dict.
        pretrained: the pre-trained encoder's state dict.

    Returns:
        ``(finetuned, pretrained)`` restricted to the keys compared; `key_mismatch` checks the rest.
    """
    text = set(TEXT_SIDE_KEYS) | {ENCODER_PREFIX + k for k in TEXT_SIDE_KEYS}
    drop = {k for k in text if (k in finetuned) != (k in pretrained)}
    return ({k: v for k, v in finetuned.items() if k not in drop},
            {k: v for k, v in pretrained.items() if k not in drop})


def key_mismatch(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                 want_name: str = "expected") -> str | None:
    """Why two state dicts do not line up key for key and shape for shape, or None if they do.

    Args:
        got: the tensors at hand.
        want: the tensors they should match (only their keys and shapes are compared).
        want_name: how the message names ``want``.

    Returns:
        None when the keys and every shape agree; else one sentence naming the first missing
        and unexpected keys, or the first tensor whose shape differs.

    Example:
        >>> import torch
        >>> print(key_mismatch({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "the architecture"))
        tensor w has shape (2,), the architecture has (3,) (1 tensors differ)
    """
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        return f"the keys differ: missing {_preview(missing)}, unexpected {_preview(extra)}"
    shapes = [(k, tuple(got[k].shape), tuple(v.shape)) for k, v in want.items() if got[k].shape != v.shape]
    if shapes:
        key, have, need = shapes[0]
        return f"tensor {key} has shape {have}, {want_name} has {need} ({len(shapes)} tensors differ)"
    return None
