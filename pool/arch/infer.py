"""The architecture read off a checkpoint's tensors: `infer_arch`, in small steps.

Patch size, width, layers, image size, MLP ratio and embedding size come from the tensor shapes
(only shapes are read, so meta tensors do); the head count and activation from a pickled module's
records when there are any. Every check raises ArchitectureMismatchError naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArchitectureMismatchError, printable
from .spec import VisionArch

__all__ = ["infer_arch", "MAX_LAYERS"]

MAX_LAYERS = 256  # transformer blocks (the largest released ViTs have 48-64)
_BLOCKS = "visual.transformer.resblocks."
_MLP = _BLOCKS + "{}.mlp.c_fc.weight"


def infer_arch(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, Any] | None = None,
               *, source: str = "checkpoint") -> VisionArch:
    """Read the architecture off normalised CLIP keys (``visual.*``, ``token_embedding.weight``...).

    ``modules`` (from `pool.checkpoint.Checkpoint.modules`, keys without the ``model.`` prefix)
    supplies what shapes cannot: the attention head count and QuickGELU vs GELU. Without it the
    head count is ``width // 64`` and the activation unknown.

    Args:
        state_dict: tensors under open_clip CLIP keys (`pool.keys.to_clip_keys` of any layout);
            only their shapes are read, so meta tensors do.
        modules: a pickled module's records by CLIP path (`pool.keys.to_clip_modules`), or None.
        source: how error messages name the weights (the file, usually).

    Returns:
        The `VisionArch`; ``quick_gelu`` is None unless ``modules`` names the activation class.

    Raises:
        ArchitectureMismatchError: the tensors are no ViT image tower this loader can build (a
            key is missing, shapes disagree, a transformer block is missing, the head count does
            not divide the width, ...).

    Example:
        >>> import torch
        >>> shapes = {"visual.conv1.weight": (64, 3, 8, 8), "visual.positional_embedding": (17, 64),
        ...           "visual.proj": (64, 32), "visual.transformer.resblocks.0.mlp.c_fc.weight": (256, 64)}
        >>> weights = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
        >>> infer_arch(weights).describe()
        'patch 8, width 64, 1 layers, 32 px, embed 32'
    """
    tower = _tower(state_dict, source)
    layers = _block_count(state_dict, tower.mlp, source)
    heads, quick = _recorded_heads_and_activation(modules, tower.width, source)
    if tower.width % heads:
        raise _not_buildable(source, f"the width {tower.width} does not split into {heads} attention heads")
    text_width, context, vocab = _text_side(state_dict, tower.embed_dim, source)
    return VisionArch(
        image_size=tower.grid * tower.patch, patch_size=tower.patch, width=tower.width, layers=layers,
        heads=heads, mlp_ratio=tower.mlp[0] / tower.width, embed_dim=tower.embed_dim, quick_gelu=quick,
        text_context_length=context, text_vocab_size=vocab, text_width=text_width,
    )


def _not_buildable(source: str, why: str) -> ArchitectureMismatchError:
    return ArchitectureMismatchError(
        f"{source}: not a ViT image tower this loader can build: {why}. Expected an open_clip "
        "ViT CLIP image encoder (the file may be damaged or another architecture).")


def _no_projection(source: str) -> ArchitectureMismatchError:
    """A tower without its output projection (a transformers ``CLIPVisionModel``): never invented."""
    return ArchitectureMismatchError(
        f"{source}: a ViT image tower without its output projection (visual.proj; in a transformers folder "
        "visual_projection.weight, which a CLIPVisionModel, unlike CLIPVisionModelWithProjection or CLIPModel, "
        "does not have). An ImageEncoder's features are the projected embeddings, and pool does not invent a "
        "projection. Use a CLIPVisionModelWithProjection or CLIPModel folder (a fine-tuned vision tower with "
        "the projection of the model it was fine-tuned from, if that is what its user does), or read the "
        "tower's tensors with pool.load_state_dict.")


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, dims: int, source: str, *,
           required: bool = True) -> tuple[int, ...] | None:
    """The shape of ``state_dict[key]``: ``dims`` positive integers; None for a missing optional key."""
    tensor = state_dict.get(key)
    if tensor is None:
        if required:
            raise ArchitectureMismatchError(
                f"{source}: no ViT image tower found (missing {key!r}); expected an open_clip "
                f"ViT CLIP image encoder. Keys seen: {', '.join(list(state_dict)[:6])} ...")
        return None
    size = tuple(getattr(tensor, "shape", ()))
    if len(size) != dims or any(not isinstance(d, int) or d < 1 for d in size):
        raise _not_buildable(source, f"{key} has shape {list(size)}, expected {dims} non-zero dimensions")
    return size


@dataclass(frozen=True)
class _Tower:
    """What the image tower's first tensors say: width, patch, grid side, MLP and projection."""

    width: int
    patch: int
    grid: int
    mlp: tuple[int, ...]  # block 0's ``mlp.c_fc.weight`` shape: (hidden, width)
    embed_dim: int


def _tower(state_dict: Mapping[str, torch.Tensor], source: str) -> _Tower:
    """Patch embedding, positional embedding, projection and block 0's MLP, checked to agree."""
    conv = _shape(state_dict, "visual.conv1.weight", 4, source)
    pos = _shape(state_dict, "visual.positional_embedding", 2, source)
    if "visual.proj" not in state_dict:
        raise _no_projection(source)
    proj = _shape(state_dict, "visual.proj", 2, source)
    fc = _shape(state_dict, _MLP.format(0), 2, source)
    assert conv is not None and pos is not None and proj is not None and fc is not None
    width, channels, patch, patch_w = conv
    if channels != 3 or patch != patch_w:
        raise _not_buildable(source, f"the patch embedding visual.conv1.weight has shape {list(conv)}, expected "
                             "[width, 3, patch, patch]")
    grid = math.isqrt(pos[0] - 1)
    if grid < 1 or grid * grid + 1 != pos[0]:
        raise _not_buildable(source, f"visual.positional_embedding has {pos[0]} rows, expected a square grid plus one")
    if pos[1] != width or fc[1] != width or proj[0] != width:
        raise _not_buildable(source, f"the tower's widths disagree (patch embedding {width}, positional embedding "
                             f"{pos[1]}, MLP input {fc[1]}, projection input {proj[0]})")
    return _Tower(width=width, patch=patch, grid=grid, mlp=fc, embed_dim=proj[1])


def _block_count(state_dict: Mapping[str, torch.Tensor], mlp: tuple[int, ...], source: str) -> int:
    """The transformer blocks: numbered 0..n-1 with none missing, each holding block 0's MLP shape."""
    blocks = _block_indices(state_dict, source)
    layers = len(blocks)
    if blocks != set(range(layers)):
        missing = min(set(range(max(blocks) + 1)) - blocks)
        raise _not_buildable(source, f"transformer blocks numbered up to {max(blocks)} but block {missing} is missing")
    for i in range(layers):  # every block holds its MLP weights: the block count is paid for in bytes
        if _shape(state_dict, _MLP.format(i), 2, source) != mlp:
            raise _not_buildable(source, f"block {i}'s MLP weight has another shape than block 0's {list(mlp)}")
    return layers


def _block_indices(state_dict: Mapping[str, torch.Tensor], source: str) -> set[int]:
    """The block numbers the keys name (at most `MAX_LAYERS`, each a short decimal)."""
    blocks: set[int] = set()
    for key in state_dict:
        if key.startswith(_BLOCKS):
            index = key.split(".")[3]
            if not (index.isascii() and index.isdigit()) or len(index) > 6:
                raise _not_buildable(source, f"a transformer block key with index {printable(index[:20])!r}")
            blocks.add(int(index))
            if len(blocks) > MAX_LAYERS:
                raise _not_buildable(source, f"more than {MAX_LAYERS} transformer blocks")
    return blocks


def _recorded_heads_and_activation(modules: Mapping[str, Any] | None, width: int,
                                   source: str) -> tuple[int, bool | None]:
    """The head count and activation a pickled module's records give; else ``width // 64`` and None."""
    heads, quick = max(1, width // 64), None
    if not modules:
        return heads, quick
    attn = modules.get("visual.transformer.resblocks.0.attn")
    if attn is not None and "num_heads" in attn.attributes:
        num_heads = attn.attributes["num_heads"]
        if not (type(num_heads) is int and num_heads >= 1 and width % num_heads == 0):
            raise _not_buildable(source, f"the pickled attention module says num_heads={str(num_heads)[:20]}, which "
                                 f"does not divide the width {width}")
        heads = num_heads
    types = {str(m.type).rsplit(".", 1)[-1] for m in modules.values()}
    if "QuickGELU" in types:
        quick = True
    elif "GELU" in types:
        quick = False
    return heads, quick


def _text_side(state_dict: Mapping[str, torch.Tensor], embed_dim: int, source: str) -> tuple[int, int, int]:
    """(width, context length, vocabulary size) of the kept text pieces; defaults where absent."""
    text = _shape(state_dict, "token_embedding.weight", 2, source, required=False)
    ctx = _shape(state_dict, "positional_embedding", 2, source, required=False)
    text_width = text[1] if text is not None else embed_dim
    if text_width % max(1, text_width // 64):
        raise _not_buildable(source, f"the text width {text_width} does not split into {text_width // 64} "
                             "attention heads")
    return text_width, ctx[0] if ctx is not None else 77, text[0] if text is not None else 49408
