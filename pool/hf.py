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
`to_hf` gives a ``CLIPVisionModelWithProjection`` state dict; `vision_config` and
`preprocessor_config` the JSON files `write_hf_folder` puts beside it. QuickGELU is
``hidden_act: quick_gelu``, nn.GELU is ``gelu`` (both exact; transformers' tanh approximations are
other functions and are refused).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["is_hf_layout", "from_hf", "to_hf", "vision_config", "preprocessor_config", "write_hf_folder",
           "HF_ACTIVATIONS", "LAYER_NORM_EPS"]

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


def from_hf(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """transformers CLIP keys -> open_clip CLIP keys; the text transformer is dropped.

    Kept: the vision tower, the projection, and a whole CLIPModel's text-side pieces an
    ImageEncoder keeps. q/k/v are fused into ``in_proj_*``, projections transposed.

    Args:
        state_dict: a ``CLIPVisionModelWithProjection`` or ``CLIPModel`` state dict.
        source: how error messages name the file.

    Returns:
        A new dict under open_clip CLIP keys (fused and transposed tensors are new; the others
        are the same tensors).

    Raises:
        ArchitectureMismatchError: a key no open_clip ViT has, or q/k/v projections missing.
    """
    from .errors import ArchitectureMismatchError

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _DROPPED.match(key):
            continue
        if key in _TOP_FROM_HF:
            out[_TOP_FROM_HF[key]] = value
        elif key in _TRANSPOSED_FROM_HF:
            out[_TRANSPOSED_FROM_HF[key]] = value.t().contiguous()
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
        out[f"visual.transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV])
    return out


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


def vision_config(arch: Any) -> dict[str, Any]:
    """``config.json`` of a ``CLIPVisionModelWithProjection`` for a `pool.arch.VisionArch`.

    Args:
        arch: the encoder's architecture (its ``quick_gelu`` decides ``hidden_act``).

    Returns:
        The config as a dict, ready for ``json.dumps``.

    Example:
        >>> from pool.arch import arch_for_name
        >>> config = vision_config(arch_for_name("ViT-B-32"))
        >>> config["hidden_size"], config["num_attention_heads"], config["hidden_act"]
        (768, 12, 'quick_gelu')
    """
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": arch.width,
        "intermediate_size": int(round(arch.width * arch.mlp_ratio)),
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "projection_dim": arch.embed_dim,
        "num_channels": 3,
        "hidden_act": HF_ACTIVATIONS[bool(arch.quick_gelu)],
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def preprocessor_config(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``CLIPImageProcessor``.

    Resize the shortest side (bicubic), center-crop, scale to [0, 1], normalise with the encoder's
    own mean and std.

    Args:
        image_size: the encoder's input resolution (the resize and the crop).
        mean: the per-channel mean to subtract.
        std: the per-channel standard deviation to divide by.

    Returns:
        The config as a dict, ready for ``json.dumps``.
    """
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True,
    }


def _normalize_of(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for step in getattr(transform, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(float(x) for x in step.mean), tuple(float(x) for x in step.std)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def write_hf_folder(encoder: Any, destination: str | os.PathLike[str]) -> Path:
    """Write an `ImageEncoder` as a transformers ``CLIPVisionModelWithProjection`` folder:
    ``config.json``, ``model.safetensors`` (written and read back by `pool.saving.write_checked`) and
    ``preprocessor_config.json``. The files are written into a temporary folder beside it, then a
    new (or empty) folder is renamed into place in one step; in an existing folder each file is
    replaced atomically. An interrupted or failed write leaves no partial file and nothing of the
    temporary folder (SIGTERM / SIGHUP included: `pool.saving.signals_as_exit`).

    Args:
        encoder: an `ImageEncoder` (its ``arch`` and ``val_preprocess`` are used).
        destination: the folder (``~`` is expanded).

    Returns:
        The folder.

    Raises:
        CorruptCheckpointError: ``model.safetensors`` did not read back identical.
    """
    from .keys import to_clip_keys
    from .writer import contiguous_unshared, signals_as_exit, write_checked

    folder = Path(destination).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = contiguous_unshared(to_hf(to_clip_keys(encoder.state_dict())))
    from .arch import HEADS_METADATA, QUICK_GELU_METADATA

    # transformers reads only "format"; ours keep the weights file right when used on its own
    metadata = {"format": "pt", QUICK_GELU_METADATA: str(bool(encoder.arch.quick_gelu)).lower(),
                HEADS_METADATA: str(encoder.arch.heads)}
    mean, std = _normalize_of(encoder.val_preprocess)
    with signals_as_exit():
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            write_checked(tensors, metadata, staging / "model.safetensors")
            for name, body in (("config.json", vision_config(encoder.arch)),
                               ("preprocessor_config.json", preprocessor_config(encoder.arch.image_size, mean, std))):
                (staging / name).write_text(json.dumps(body, indent=2) + "\n")
            _publish(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _publish(staging: Path, folder: Path) -> None:
    """Move a written folder into place: renamed whole where ``folder`` is new or empty, else file by
    file (each replace atomic)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.rename(staging, folder)
        return
    for item in staging.iterdir():
        os.replace(item, folder / item.name)
