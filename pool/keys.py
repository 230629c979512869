"""Key normalisation across checkpoint writers, in one place.

Writers in the wild name the same tensors differently:

* ``src.modeling.ImageEncoder`` state dicts and pickles: ``model.visual.conv1.weight``;
* open_clip's own CLIP state dict: ``visual.conv1.weight``;
* training scripts: ``{"state_dict": {"module.visual.conv1.weight": ...}}`` (DDP prefixes);
* full CLIP state dicts that still hold the text transformer (``transformer.resblocks.*``).

`to_clip_keys` maps all of them onto open_clip CLIP keys (no prefix, no text transformer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

__all__ = ["to_clip_keys", "to_clip_modules", "key_mismatch", "ENCODER_PREFIX", "TEXT_SIDE_KEYS"]

log = logging.getLogger(__name__)

#: The prefix `pool.ImageEncoder` (like the original) puts before CLIP keys.
ENCODER_PREFIX = "model."
#: Top-level CLIP entries of the text side that an ImageEncoder keeps (the transformer is deleted).
TEXT_SIDE_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                  "text_projection", "logit_scale", "logit_bias")
_DROPPED_PREFIXES = ("transformer.",)
_DROPPED_KEYS = ("attn_mask",)


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def to_clip_keys(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Any known writer's keys -> open_clip CLIP keys, text transformer dropped."""
    keys = list(state_dict)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    strip_module = keys and all(k.startswith("module.") for k in keys)
    for key, value in state_dict.items():
        k = _strip(key, "module.") if strip_module else key
        if not k.startswith("visual.") and k.startswith(ENCODER_PREFIX):
            k = k[len(ENCODER_PREFIX):]
        if k.startswith(_DROPPED_PREFIXES) or k in _DROPPED_KEYS:
            dropped.append(key)
            continue
        out[k] = value
    if dropped:
        log.debug("%s: dropped %d text-transformer entries (e.g. %s): an ImageEncoder has no text "
                  "transformer", source, len(dropped), dropped[0])
    return out


def to_clip_modules(modules: Mapping[str, object] | None) -> dict[str, object]:
    """Module-record paths of a pickled ImageEncoder (``model.visual...``) -> CLIP paths, as
    `to_clip_keys` does for tensor names."""
    return {(k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else k): v
            for k, v in (modules or {}).items()}


def _preview(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def key_mismatch(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                 want_name: str = "expected") -> str | None:
    """Why two state dicts do not line up key for key and shape for shape, or None if they do."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        return f"the keys differ: missing {_preview(missing)}, unexpected {_preview(extra)}"
    shapes = [(k, tuple(got[k].shape), tuple(v.shape)) for k, v in want.items() if got[k].shape != v.shape]
    if shapes:
        key, have, need = shapes[0]
        return f"tensor {key} has shape {have}, {want_name} has {need} ({len(shapes)} tensors differ)"
    return None
