"""Hugging Face transformers' CLIP layout <-> open_clip's, both ways, without importing transformers.

transformers names a CLIP vision tower ``vision_model.*`` plus ``visual_projection.weight``
(``CLIPVisionModelWithProjection``; a whole ``CLIPModel`` adds ``text_model.*``,
``text_projection.weight`` and ``logit_scale``). The mapping is exact:

* open_clip's fused attention input ``in_proj_weight`` / ``in_proj_bias`` is transformers'
  ``q_proj``, ``k_proj``, ``v_proj`` stacked in that order;
* open_clip's ``proj`` / ``text_projection`` (``x @ proj``) are transformers' bias-free
  ``Linear`` weights transposed;
* everything else is a rename (``ln_pre`` is transformers' ``pre_layrnorm``, sic).

`from_hf` gives open_clip CLIP keys (what `pool.keys.to_clip_keys` returns for any layout);
`to_hf` gives a ``CLIPVisionModelWithProjection`` state dict (`pool.hf_export` writes the folder
around it). QuickGELU is ``hidden_act: quick_gelu``, nn.GELU is ``gelu`` (both exact; transformers'
tanh approximations are other functions and are refused).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch

from .deferred import Deferred, DeferredTensors
from .errors import ArchitectureMismatchError

__all__ = ["is_hf_layout", "from_hf", "to_hf", "HF_ACTIVATIONS", "LAYER_NORM_EPS"]

#: transformers' ``hidden_act`` for each open_clip activation (QuickGELU or not).
HF_ACTIVATIONS = {True: "quick_gelu", False: "gelu"}
#: open_clip's LayerNorm epsilon (transformers' CLIP default too).
LAYER_NORM_EPS = 1e-5

_BLOCK_HF = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_BLOCK_CLIP = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
#: per-block renames, open_clip -> transformers (attention input handled apart)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
#: top-level renames, open_clip -> transformers (``proj`` and ``text_projection`` are transposed apart)
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_TOP_FROM_HF = {v: k for k, v in _TOP.items()}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TRANSPOSED_FROM_HF = {v: k for k, v in _TRANSPOSED.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
#: transformers-only entries with no open_clip counterpart (buffers; the text transformer, which an
#: ImageEncoder does not keep)
_DROPPED = re.compile(r"^(?:vision_model\.embeddings\.position_ids|text_model\.embeddings\.position_ids|"
                      r"text_model\.encoder\..*)$")


def is_hf_layout(keys: list[str]) -> bool:
    """Whether tensor names are transformers' CLIP layout (``vision_model.*``).

    Args:
        keys: the tensor names.

    Returns:
        True when any name starts with ``vision_model.``.

    Example:
        >>> is_hf_layout(["vision_model.embeddings.class_embedding"]), is_hf_layout(["visual.proj"])
        (True, False)
    """
    return any(k.startswith("vision_model.") for k in keys)


def from_hf(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
            deferred: bool = False) -> Mapping[str, torch.Tensor]:
    """transformers CLIP keys -> open_clip CLIP keys; the text transformer is dropped.

    Kept: the vision tower, the projection, and a whole CLIPModel's text-side pieces an
    ImageEncoder keeps. q/k/v are fused into ``in_proj_*``, projections transposed.

    Args:
        state_dict: a ``CLIPVisionModelWithProjection`` or ``CLIPModel`` state dict.
        source: how error messages name the file.
        deferred: make the fused and transposed tensors only when each is looked up
            (`pool.deferred.DeferredTensors`), for a reader that takes one key at a time.

    Returns:
        A new dict under open_clip CLIP keys (fused and transposed tensors are new; the others
        are the same tensors); with ``deferred``, a `pool.deferred.DeferredTensors`.

    Raises:
        ArchitectureMismatchError: a key no open_clip ViT has, or q/k/v projections missing.
    """
    out: dict[str, torch.Tensor | Deferred] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _DROPPED.match(key):
            continue
        if key in _TOP_FROM_HF:
            out[_TOP_FROM_HF[key]] = value
        elif key in _TRANSPOSED_FROM_HF:
            out[_TRANSPOSED_FROM_HF[key]] = (Deferred(value.t, tuple(reversed(value.shape)), value.dtype) if deferred
                                             else value.t().contiguous())
        elif (m := _BLOCK_HF.match(key)) is not None:
            index, rest = m.groups()
            name, _, kind = rest.rpartition(".")
            if name.startswith("self_attn.") and name.split(".", 1)[1] in _QKV:
                qkv.setdefault((index, kind), {})[name.split(".", 1)[1]] = value
                continue
            clip = next((c for c, h in _BLOCK.items() if h == name), None)
            if clip is None:
                raise ArchitectureMismatchError(f"{source}: transformers key {key!r} has no open_clip counterpart")
            out[f"visual.transformer.resblocks.{index}.{clip}.{kind}"] = value
        else:
            raise ArchitectureMismatchError(f"{source}: transformers key {key!r} has no open_clip counterpart; "
                                            "only CLIP vision models (and CLIPModel) are read")
    for (index, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ArchitectureMismatchError(f"{source}: layer {index} has {sorted(parts)} {kind}s, not q, k and v")
        ordered = [parts[p] for p in _QKV]
        fused = Deferred(functools.partial(torch.cat, ordered),
                         (sum(p.shape[0] for p in ordered), *ordered[0].shape[1:]), ordered[0].dtype)
        out[f"visual.transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused if deferred else fused.make()
    return DeferredTensors(out) if deferred else out  # type: ignore[return-value]


def to_hf(clip: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys -> a ``CLIPVisionModelWithProjection`` state dict.

    The vision tower and projection; text-side pieces are left out. Tensors are contiguous
    copies where reshaped.

    Args:
        clip: tensors under open_clip CLIP keys (`pool.keys.to_clip_keys`).

    Returns:
        A new dict under transformers keys (``in_proj_*`` split into q/k/v, ``visual.proj``
        transposed).

    Example:
        >>> import torch
        >>> hf = to_hf({"visual.proj": torch.zeros(768, 512)})
        >>> hf["visual_projection.weight"].shape, from_hf(hf)["visual.proj"].shape
        (torch.Size([512, 768]), torch.Size([768, 512]))
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in clip.items():
        if key in _TOP and key.startswith("visual."):
            out[_TOP[key]] = value
        elif key == "visual.proj":
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := _BLOCK_CLIP.match(key)) is not None:
            index, rest = m.groups()
            name, _, kind = rest.rpartition(".")
            prefix = f"vision_model.encoder.layers.{index}"
            if name == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                for part, chunk in zip(_QKV, value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{part}.{kind.removeprefix('in_proj_')}"] = chunk.contiguous()
            elif name in _BLOCK:
                out[f"{prefix}.{_BLOCK[name]}.{kind}"] = value
    return out
