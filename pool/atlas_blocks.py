"""Which blocks of a ViT a tensor belongs to, for the task-vector atlas (`pool.atlas_core`).

Keys are open_clip CLIP keys (`pool.keys.to_clip_keys`). Every key is in ``all`` and in one kind:

* ``embeddings``: the patch embedding stage (``conv1``, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``);
* ``attention``, ``mlp``, ``norm``: the residual blocks' attention, MLP and layer norms
  (``ln_1``, ``ln_2``);
* ``output``: ``ln_post`` and the projection ``proj``;
* ``text``: text-side leftovers a pickled ImageEncoder keeps (``token_embedding``, ``logit_scale``...);
* ``other``: anything else (an attentional pooler, say).

A residual block's tensors are also in ``layer.{i}`` and, for attention and MLP, in
``layer.{i}.attention`` / ``layer.{i}.mlp``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["KINDS", "blocks_of", "block_order"]

#: the kinds, in the order the atlas lists them
KINDS = ("embeddings", "attention", "mlp", "norm", "output", "text", "other")
_LAYER = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.(attn|mlp|ln_1|ln_2)\.")
_PART = {"attn": "attention", "mlp": "mlp", "ln_1": "norm", "ln_2": "norm"}
_VISUAL = {"conv1": "embeddings", "class_embedding": "embeddings", "positional_embedding": "embeddings",
           "ln_pre": "embeddings", "ln_post": "output", "proj": "output"}
_TEXT = ("token_embedding", "positional_embedding", "ln_final", "text_projection", "logit_scale", "logit_bias")


def blocks_of(key: str) -> list[str]:
    """The blocks a tensor's key belongs to: ``all``, its kind and, in a residual block, its layer.

    Args:
        key: an open_clip CLIP key (``visual.transformer.resblocks.3.mlp.c_fc.weight``).

    Returns:
        The block names, ``all`` first.

    Example:
        >>> blocks_of("visual.transformer.resblocks.3.mlp.c_fc.weight")
        ['all', 'mlp', 'layer.3', 'layer.3.mlp']
        >>> blocks_of("visual.proj"), blocks_of("logit_scale")
        (['all', 'output'], ['all', 'text'])
    """
    match = _LAYER.search(key)
    if match:
        layer, kind = match.group(1), _PART[match.group(2)]
        return ["all", kind, f"layer.{layer}"] + ([f"layer.{layer}.{kind}"] if kind != "norm" else [])
    head, _, rest = key.partition(".")
    if head == "visual":
        return ["all", _VISUAL.get(rest.split(".", 1)[0], "other")]
    return ["all", "text" if head in _TEXT else "other"]


def block_order(names: Iterable[str]) -> list[str]:
    """Block names in reading order: ``all``, the kinds (`KINDS`), then the layers by number.

    Example:
        >>> block_order(["layer.10", "mlp", "layer.2.mlp", "all", "layer.2"])
        ['all', 'mlp', 'layer.2', 'layer.2.mlp', 'layer.10']
    """
    def rank(name: str) -> tuple[int, int, int]:
        if name == "all":
            return (0, 0, 0)
        if name in KINDS:
            return (1, KINDS.index(name), 0)
        parts = name.split(".")
        return (2, int(parts[1]), 0 if len(parts) == 2 else 1 + ("attention", "mlp").index(parts[2]))

    return sorted(names, key=rank)
