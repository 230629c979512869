"""The loading pipeline: a checkpoint file to an encoder or a head, each step once, in one direction.

An encoder::

    read            pool.checkpoint.read_checkpoint    bytes -> Checkpoint (tensors, records, metadata)
    recorded        recorded_options                   what the metadata says of the architecture
    normalise keys  normalise_keys                     DDP prefix, transformers layout -> open_clip keys
    resolve arch    resolve_arch                       inferred from the shapes, checked against a name
    build           pool.arch.build_clip               the CLIP on the meta device
    assign          pool.assign.assign                 the tensors into it (not copied)
    place           pool.placement.place_module        device and dtype

`load_encoder` runs them all from a path, `encoder_from_checkpoint` from a read checkpoint and
`encoder_from_state_dict` from tensors (each starts the same run at a later step, and hands on
through the class's own ``from_checkpoint`` / ``from_state_dict``, so that a subclass that
overrides one of them takes part, as it did before the pipeline had its own module). A head
(`load_head`, `head_from_checkpoint`): read, DDP prefix stripped, its tensors checked, built,
placed. The classes to build are passed in (``ImageEncoder``, ``ClassificationHead``), so no step
calls back up into `pool.modeling`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from os import PathLike
from typing import Any, TypeVar

import torch
from torch import nn

from .arch import (
    VisionArch,
    arch_for_name,
    build_clip,
    check_arch,
    default_quick_gelu,
    image_transforms,
    infer_arch,
    name_for_arch,
    recorded_heads,
    recorded_quick_gelu,
)
from .assign import assign
from .checkpoint import Checkpoint, read_checkpoint
from .errors import ArchitectureMismatchError, CheckpointError, printable
from .gcpause import paused_gc
from .keys import strip_ddp, to_clip_keys, to_clip_modules
from .placement import DType, place_module

__all__ = ["load_encoder", "encoder_from_checkpoint", "encoder_from_state_dict", "load_head",
           "head_from_checkpoint", "recorded_options", "normalise_keys", "resolve_arch"]

log = logging.getLogger("pool.modeling")  # the name its messages always had

_M = TypeVar("_M", bound=nn.Module)


# -- an encoder -----------------------------------------------------------------------------------
def load_encoder(cls: type[_M], path: str | PathLike[str], *, model_name: str | None = None,
                 quick_gelu: bool | None = None, device: Any = None, dtype: DType = None,
                 mmap: bool | None = None, map_location: Any = None, cache_dir: Any = None,
                 allow_globals: Iterable[str] | None = None) -> _M:
    """Read a file and run the encoder pipeline on it (`pool.modeling.ImageEncoder.load`).

    Args:
        cls: the encoder class to build (`pool.modeling.ImageEncoder`).
        path: the encoder file or transformers folder.
        model_name: an open_clip name to check the weights against, or None.
        quick_gelu: the activation; None: what the file says, else the name's default.
        device: where the tensors are read to and the encoder goes (None: ``map_location``).
        dtype: a ``torch.dtype`` or a name; None keeps the file's.
        mmap: whether zip and safetensors tensors are mapped from the file.
        map_location: used when ``device`` is None, in any form `read_checkpoint` takes.
        cache_dir: the conversion cache, as for `read_checkpoint`.
        allow_globals: globals to accept besides the allowlist, as for `read_checkpoint`.

    Returns:
        The encoder.
    """
    device = device if device is not None else map_location
    checkpoint = read_checkpoint(path, map_location=device, mmap=mmap, cache_dir=cache_dir,
                                 allow_globals=allow_globals)
    # through the class, so that a subclass's own from_checkpoint / from_state_dict take part
    return cls.from_checkpoint(checkpoint, model_name=model_name, quick_gelu=quick_gelu, device=device,
                               dtype=dtype)


def encoder_from_checkpoint(cls: type[_M], checkpoint: Checkpoint, **kwargs: Any) -> _M:
    """Run the encoder pipeline on a read checkpoint (`pool.modeling.ImageEncoder.from_checkpoint`).

    Args:
        cls: the encoder class to build.
        checkpoint: a checkpoint read with `read_checkpoint`.
        **kwargs: `encoder_from_state_dict`'s keyword arguments; ``source`` defaults to the
            checkpoint's path, ``quick_gelu`` and ``heads`` to what its metadata records.

    Returns:
        The encoder.
    """
    kwargs.setdefault("source", str(checkpoint.path))
    kwargs["quick_gelu"], kwargs["heads"] = recorded_options(
        checkpoint, quick_gelu=kwargs.get("quick_gelu"), heads=kwargs.get("heads"), source=kwargs["source"])
    return cls.from_state_dict(checkpoint.state_dict, modules=checkpoint.modules or None, **kwargs)


def encoder_from_state_dict(cls: type[_M], state_dict: Mapping[str, torch.Tensor], *,
                            model_name: str | None = None, quick_gelu: bool | None = None,
                            device: Any = None, dtype: DType = None, modules: Mapping[str, Any] | None = None,
                            source: str = "state dict", heads: int | None = None) -> _M:
    """Run the encoder pipeline on tensors: normalise keys, resolve the architecture, build, assign,
    place (`pool.modeling.ImageEncoder.from_state_dict` says what each argument means).

    Args:
        cls: the encoder class to build: called as ``cls(model, train_preprocess,
            val_preprocess, arch=..., model_name=...)``.
        state_dict: the weights, in any layout `pool.keys.to_clip_keys` knows.
        model_name: an open_clip name to check the weights against, or None.
        quick_gelu: the activation, or None to decide from the records and the name.
        device: where the encoder goes.
        dtype: a ``torch.dtype`` or a name; None keeps the tensors'.
        modules: a pickled module's records, or None.
        source: how error messages name the weights.
        heads: attention heads per block recorded apart from the weights, or None.

    Returns:
        The encoder.
    """
    sd, clip_modules = normalise_keys(state_dict, modules, source=source)
    arch, name = resolve_arch(sd, clip_modules, model_name=model_name, quick_gelu=quick_gelu, heads=heads,
                              source=source)
    with paused_gc():  # many small objects, no cycles to collect: see pool.gcpause
        model = assign(build_clip(arch, source=source), sd, source)
        encoder = cls(model, *image_transforms(arch), arch=arch, model_name=model_name or name)
    return place_module(encoder, device, dtype)


def recorded_options(checkpoint: Checkpoint, *, quick_gelu: bool | None, heads: int | None,
                     source: str) -> tuple[bool | None, int | None]:
    """The activation and head count to build with, given what the checkpoint's metadata records.

    Without module records, the caller's ``quick_gelu`` (else the recorded activation: a converted
    file's or a transformers folder's ``hidden_act``) and ``heads`` (else the recorded count).
    A transformers ``layer_norm_eps`` other than open_clip's is refused.

    Args:
        checkpoint: the read checkpoint.
        quick_gelu: the caller's activation, or None.
        heads: the caller's head count, or None.
        source: how error messages name the file.

    Returns:
        ``(quick_gelu, heads)``, each None where neither the caller nor the file says.

    Raises:
        ArchitectureMismatchError: a recorded head count that is no integer, or a transformers
            ``hidden_act`` or ``layer_norm_eps`` that open_clip's ViT does not have.
    """
    meta = checkpoint.metadata
    if quick_gelu is None and not checkpoint.modules:
        quick_gelu = recorded_quick_gelu(meta)  # written by pool.convert, or transformers' config
    recorded = recorded_heads(meta)
    if recorded is not None and heads is None and not checkpoint.modules:
        heads = _recorded_int(recorded, "attention heads", source)
    eps = meta.get("hf.layer_norm_eps")
    if eps is not None and eps not in ("1e-05", "1e-5"):
        raise ArchitectureMismatchError(f"{source}: the transformers config says layer_norm_eps={eps}; "
                                        "open_clip's ViT uses 1e-05, so these weights would compute other features.")
    return quick_gelu, heads


def _recorded_int(value: str, name: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ArchitectureMismatchError(f"{source}: the recorded {name} is {printable(value[:40])!r}, "
                                        "not an integer") from None


def normalise_keys(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, Any] | None, *,
                   source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and module records under open_clip CLIP keys, whatever wrote them.

    Args:
        state_dict: the weights (a DDP prefix, the ``model.`` prefix or transformers' layout).
        modules: a pickled module's records by path, or None.
        source: how errors (and the debug log) name the file.

    Returns:
        ``(tensors, records)`` under CLIP keys (`pool.keys.to_clip_keys`, `pool.keys.to_clip_modules`).

    Raises:
        ArchitectureMismatchError: transformers keys with no open_clip counterpart.
    """
    return to_clip_keys(state_dict, source=source), to_clip_modules(modules)


def resolve_arch(sd: Mapping[str, torch.Tensor], modules: Mapping[str, Any], *, model_name: str | None,
                 quick_gelu: bool | None, heads: int | None, source: str) -> tuple[VisionArch, str | None]:
    """The architecture to build: read off the weights, checked against ``model_name`` if given.

    QuickGELU: ``quick_gelu`` wins, then the activation class the records name, then the name's
    default. Heads: ``heads`` wins, then the records, then the open_clip config of the name (or of
    these shapes), else width / 64.

    Args:
        sd: the weights under CLIP keys (`normalise_keys`).
        modules: a pickled module's records under CLIP paths (empty when there are none).
        model_name: an open_clip name to check the weights against, or None.
        quick_gelu: the activation to use, or None.
        heads: the attention heads per block to use, or None.
        source: how error messages name the weights.

    Returns:
        ``(arch, name)``: the `VisionArch` and the open_clip name of these shapes (None when
        ``model_name`` is given, or for a custom ViT).

    Raises:
        ConfigError: ``model_name`` is no open_clip ViT config this loader can build.
        ArchitectureMismatchError: the weights are no ViT image tower, not the one ``model_name``
            names, or ``heads`` does not split the width.
    """
    weights = infer_arch(sd, modules, source=source)
    named = None  # the open_clip name of these shapes, looked up once (the registry is scanned)
    if model_name:
        arch = _named(weights, model_name, bool(modules), source)
    else:
        named = name_for_arch(weights)
        arch = _unnamed(weights, named, bool(modules))
    return _overridden(arch, quick_gelu, heads, source), named


def _named(weights: VisionArch, model_name: str, pickled: bool, source: str) -> VisionArch:
    """The configured name's architecture, checked against the weights, with their text sizes."""
    arch = arch_for_name(model_name)
    check_arch(weights, arch, model_name, source)
    arch = replace(arch, heads=weights.heads if pickled else arch.heads,
                   text_context_length=weights.text_context_length,
                   text_vocab_size=weights.text_vocab_size, text_width=weights.text_width)
    if weights.quick_gelu is not None:
        arch = replace(arch, quick_gelu=weights.quick_gelu)
    return arch


def _unnamed(weights: VisionArch, named: str | None, pickled: bool) -> VisionArch:
    """The weights' architecture, the activation and heads completed from the config of its shapes."""
    arch = weights if weights.quick_gelu is not None else replace(weights, quick_gelu=default_quick_gelu(named))
    if named and not pickled:  # the weights cannot tell the heads: open_clip's config of these shapes does
        arch = replace(arch, heads=arch_for_name(named).heads)
    return arch


def _overridden(arch: VisionArch, quick_gelu: bool | None, heads: int | None, source: str) -> VisionArch:
    """``arch`` with the caller's (or the file's metadata's) activation and head count."""
    if quick_gelu is not None:
        arch = replace(arch, quick_gelu=bool(quick_gelu))
    if heads is not None:
        if not (type(heads) is int and heads >= 1 and arch.width % heads == 0):
            raise ArchitectureMismatchError(f"{source}: {heads!r} attention heads do not split the width {arch.width}")
        arch = replace(arch, heads=heads)
    return arch


# -- a classification head ------------------------------------------------------------------------
def load_head(cls: type[_M], path: str | PathLike[str], *, normalize: bool | None = None, device: Any = None,
              dtype: DType = None, map_location: Any = None, cache_dir: Any = None,
              allow_globals: Iterable[str] | None = None) -> _M:
    """Read a head file and run the head pipeline on it (`pool.modeling.ClassificationHead.load`).

    Args:
        cls: the head class to build (`pool.modeling.ClassificationHead`).
        path: the head file.
        normalize: whether the head normalises its inputs; None: the flag the file stored, else True.
        device: where the tensors are read to and the head goes (None: ``map_location``).
        dtype: a ``torch.dtype`` or a name; None keeps the file's.
        map_location: used when ``device`` is None, in any form `read_checkpoint` takes.
        cache_dir: the conversion cache, as for `read_checkpoint`.
        allow_globals: globals to accept besides the allowlist, as for `read_checkpoint`.

    Returns:
        The head.
    """
    device = device if device is not None else map_location
    checkpoint = read_checkpoint(path, map_location=device, cache_dir=cache_dir, allow_globals=allow_globals)
    return cls.from_checkpoint(checkpoint, normalize=normalize, device=device, dtype=dtype)


def head_from_checkpoint(cls: type[_M], checkpoint: Checkpoint, *, normalize: bool | None = None,
                         device: Any = None, dtype: DType = None) -> _M:
    """Run the head pipeline on a read checkpoint: DDP prefix stripped, tensors checked, the
    ``normalize`` flag decided, built, placed (`pool.modeling.ClassificationHead.from_checkpoint`).

    Args:
        cls: the head class to build: called as ``cls(normalize, weight, bias)``.
        checkpoint: a checkpoint read with `read_checkpoint`.
        normalize: the flag, or None for the stored one (else True); a string means True for
            ``"1"``, ``"true"`` or ``"yes"`` (any case).
        device: where the head goes.
        dtype: a ``torch.dtype`` or a name; None keeps the checkpoint's.

    Returns:
        The head.
    """
    weight, bias = _head_tensors(strip_ddp(checkpoint.state_dict), checkpoint.path)
    head = cls(_normalize_flag(checkpoint, normalize), weight, bias)
    return place_module(head, device, dtype)


def _head_tensors(sd: dict[str, torch.Tensor], path: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A head's ``weight`` and ``bias``, checked to make a linear map this loader can build."""
    weight, bias = sd.get("weight"), sd.get("bias")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(
            f"{path}: expected a classification head (a 'weight' of shape [classes, "
            f"embed_dim]); found {printable(', '.join(list(sd)[:5]))}.")
    classes, width = weight.shape
    problem = None
    if classes < 1 or width < 1:
        problem = f"its weight has shape {list(weight.shape)}: no classes or no inputs"
    elif not all(t.is_floating_point() for t in (weight, bias) if t is not None):
        problem = "its weights are not floating point (" + ", ".join(
            f"{n} {t.dtype}" for n, t in (("weight", weight), ("bias", bias)) if t is not None) + ")"
    elif bias is not None and tuple(bias.shape) != (classes,):
        problem = f"its bias has shape {list(bias.shape)}, its weight {list(weight.shape)} (expected [{classes}])"
    if problem:
        raise ArchitectureMismatchError(f"{path}: not a classification head this loader can "
                                        f"build: {problem}. The file is damaged or holds something else.")
    return weight, bias


def _normalize_flag(checkpoint: Checkpoint, normalize: bool | str | None) -> bool:
    """The caller's flag, else the stored one (a pickled head's attribute, a converted file's
    metadata), else True as task_vectors did."""
    stored = checkpoint.attributes.get("normalize", checkpoint.metadata.get("normalize"))
    if normalize is None:
        normalize = stored if stored is not None else True
        if stored is None:
            log.info("%s: no normalize flag stored; using normalize=True as task_vectors did", checkpoint.path)
    if isinstance(normalize, str):
        normalize = normalize.lower() in ("1", "true", "yes")
    return bool(normalize)
