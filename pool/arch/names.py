"""open_clip's names for architectures: a name's `VisionArch`, the name of an architecture's shapes,
the activation a name means, and checking weights against the architecture a name gives.

open_clip's model configs are read once per process (the first call imports open_clip).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import ArchitectureMismatchError, ConfigError
from .spec import VisionArch

__all__ = ["OPENAI_MODEL_NAMES", "arch_for_name", "name_for_arch", "default_quick_gelu", "known_architectures",
           "check_arch"]

# Architectures OpenAI released; the task-arithmetic checkpoints come from their weights, whose
# transformer uses QuickGELU, so these names default to QuickGELU here.
OPENAI_MODEL_NAMES = frozenset(
    {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"}
)


def known_architectures() -> dict[str, VisionArch]:
    """Every plain-ViT model config open_clip ships, by name.

    Read once per process: the first call imports open_clip. Configs this loader cannot build
    (timm towers, non-square images, layer scale, ...) are left out.

    Returns:
        A new dict, open_clip model name -> `VisionArch` (with the config's own activation).

    Example:
        >>> known = known_architectures()
        >>> "ViT-B-32" in known, "RN50" in known
        (True, False)
    """
    return dict(_registry())


@functools.cache
def _registry() -> dict[str, VisionArch]:
    """Every plain-ViT model config open_clip ships, as VisionArch."""
    import open_clip  # lazy: importing open_clip takes seconds; only name lookups need it

    out: dict[str, VisionArch] = {}
    for name in open_clip.list_models():
        try:
            out[name] = _arch_from_config(name, open_clip.get_model_config(name))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _arch_from_config(name: str, cfg: Mapping[str, Any] | None) -> VisionArch:
    if not cfg:
        raise KeyError(name)
    v, t = dict(cfg["vision_cfg"]), dict(cfg.get("text_cfg", {}))
    if v.get("timm_model_name") or not isinstance(v.get("layers"), int) or "patch_size" not in v:
        raise ValueError(f"{name} is not a plain ViT")
    extra = set(v) - {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    if extra - {"ls_init_value", "patch_dropout"} or v.get("ls_init_value"):
        raise ValueError(f"{name} has vision options this loader does not build: {sorted(extra)}")
    width = int(v.get("width", 768))
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ValueError("non-square")
        image_size = image_size[0]
    quick = bool(cfg.get("quick_gelu", False))  # the config's own; arch_for_name adds the OpenAI rule
    return VisionArch(
        image_size=int(image_size), patch_size=int(v["patch_size"]), width=width,
        layers=int(v["layers"]), heads=width // int(v.get("head_width", 64)),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)), embed_dim=int(cfg["embed_dim"]),
        quick_gelu=bool(quick), text_context_length=int(t.get("context_length", 77)),
        text_vocab_size=int(t.get("vocab_size", 49408)), text_width=int(t.get("width", 512)),
    )


def _base_name(name: str) -> str:
    return re.sub(r"-quickgelu$", "", name)


def arch_for_name(model_name: str, quick_gelu: bool | None = None) -> VisionArch:
    """The architecture open_clip's config gives ``model_name``.

    OpenAI names (ViT-B-32, ViT-B-16, ViT-L-14, ...) mean QuickGELU unless ``quick_gelu`` says
    otherwise, because the published checkpoints come from OpenAI's weights. task_vectors' own
    spelling ``NAME__pretrained__TAG`` is understood: a tag other than ``openai`` (LAION weights,
    say) means the config's activation (GELU for the plain names).

    Args:
        model_name: an open_clip ViT name (``ViT-B-32``, ``ViT-B-32-quickgelu``, ...), optionally
            as ``NAME__pretrained__TAG``.
        quick_gelu: the activation to use; None (the default) applies the rules above.

    Returns:
        The `VisionArch`, ``quick_gelu`` set to True or False.

    Raises:
        ConfigError: ``model_name`` is not an open_clip ViT config this loader can build (the
            message lists known names).

    Example:
        >>> arch_for_name("ViT-B-16").quick_gelu, arch_for_name("ViT-B-16", quick_gelu=False).quick_gelu
        (True, False)
        >>> arch_for_name("ViT-B-16__pretrained__laion400m_e32").quick_gelu
        False
    """
    name, _, tag = model_name.partition("__pretrained__")
    registry = _registry()
    if name not in registry:
        vits = sorted(n for n in registry if n.startswith("ViT"))
        raise ConfigError(
            f"model_name {model_name!r} is not an open_clip ViT config this loader can build. "
            f"Known ViT names include: {', '.join(vits[:12])} ... ({len(registry)} in all). Leave "
            "model_name out to infer the architecture from the weights.")
    arch = registry[name]
    if name.endswith("-quickgelu") or (_base_name(name) in OPENAI_MODEL_NAMES and tag in ("", "openai")):
        arch = replace(arch, quick_gelu=True)
    if quick_gelu is not None:
        arch = replace(arch, quick_gelu=bool(quick_gelu))
    return arch


def name_for_arch(arch: VisionArch) -> str | None:
    """The open_clip name whose config has these shapes (OpenAI names first), or None.

    Args:
        arch: the architecture; only its `VisionArch.shapes` are compared.

    Returns:
        The best name (OpenAI names first, then names without ``-quickgelu``, then the shortest),
        or None when no open_clip config has these shapes (a custom ViT).

    Example:
        >>> name_for_arch(arch_for_name("ViT-L-14"))
        'ViT-L-14'
    """
    matches = [n for n, a in _registry().items() if a.shapes() == arch.shapes()]
    if not matches:
        return None
    matches.sort(key=lambda n: (_base_name(n) not in OPENAI_MODEL_NAMES, n.endswith("-quickgelu"), len(n), n))
    return matches[0]



def default_quick_gelu(arch: VisionArch | str | None) -> bool:
    """The activation to use when the file records none: QuickGELU for OpenAI's shapes.

    An architecture (or open_clip name) of OpenAI's shapes means QuickGELU, as the published
    weights use it; a custom ViT too, as every checkpoint of this field derives from OpenAI's
    weights. An architecture with the shapes of a non-OpenAI config gets that config's activation.

    Args:
        arch: an architecture, an open_clip name (read with `arch_for_name`'s rules), or None
            (a custom ViT).

    Returns:
        True for QuickGELU, False for GELU.

    Raises:
        ConfigError: ``arch`` is a name that is no open_clip ViT config this loader can build.

    Example:
        >>> default_quick_gelu("ViT-B-32"), default_quick_gelu("ViT-B-32__pretrained__laion2b_s34b_b79k")
        (True, False)
    """
    if isinstance(arch, str):
        return bool(arch_for_name(arch).quick_gelu)
    name = name_for_arch(arch) if arch is not None else None
    return bool(arch_for_name(name).quick_gelu) if name else True



def _label(arch: VisionArch) -> str:
    name = name_for_arch(arch)
    return f"{name} ({arch.describe()})" if name else f"a custom ViT ({arch.describe()})"


def check_arch(weights: VisionArch, configured: VisionArch, model_name: str, source: str) -> None:
    """Raise ArchitectureMismatchError when the weights are not the configured architecture.

    Only `VisionArch.shapes` are compared (not the activation, head count or text sizes).

    Args:
        weights: the architecture the weights have (`infer_arch`).
        configured: the architecture the configuration names (`arch_for_name`).
        model_name: the configured name, for the message.
        source: how the message names the weights (the file, usually).

    Raises:
        ArchitectureMismatchError: the shapes differ; the message describes both and says to fix
            or leave out ``model_name``.
    """
    if weights.shapes() == configured.shapes():
        return
    raise ArchitectureMismatchError(
        f"{source}: weights are {_label(replace(weights, quick_gelu=None))}; config says "
        f"{model_name} ({replace(configured, quick_gelu=None).describe()}). Set model_name to the "
        "weights' architecture, or leave it out to infer it from the weights.")
