"""Building open_clip objects for an architecture without waste: the ``CLIP`` (text transformer
removed) on the meta device, so no time goes into initialising weights about to be replaced, and
open_clip's image transforms.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch

from ..errors import ArchitectureMismatchError, printable
from .spec import VisionArch

__all__ = ["build_clip", "image_transforms"]


def build_clip(arch: VisionArch, *, device: str | torch.device = "meta", source: str | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` for ``arch`` with the text transformer removed.

    On the meta device (the default) nothing is allocated or initialised: the caller assigns the
    real tensors with ``load_state_dict(..., assign=True)``. Shapes open_clip cannot build raise
    ArchitectureMismatchError (naming ``source``, the file the shapes came from, when given).

    Args:
        arch: the architecture to build.
        device: where to build it; ``"meta"`` (the default) copies a cached meta-device
            template's structure, any other device constructs (and initialises) a fresh model.
        source: the file the shapes came from, put before an error's message; None leaves the
            message as it is.

    Returns:
        The ``CLIP`` module, without its ``transformer`` (and causal ``attn_mask``).

    Raises:
        ArchitectureMismatchError: open_clip cannot build a ViT of these shapes.

    Example:
        >>> from pool.synth import TINY
        >>> model = build_clip(TINY)
        >>> model.visual.conv1.weight.is_meta, hasattr(model, "transformer")
        (True, False)
    """
    try:
        if torch.device(device).type == "meta":
            return _fresh_structure(_meta_template(arch))
        return _construct(arch, device)
    except ArchitectureMismatchError as exc:
        if source is None:
            raise
        raise ArchitectureMismatchError(f"{source}: {exc}") from None


def _fresh_structure(template: torch.nn.Module) -> torch.nn.Module:
    """A new module tree shaped like ``template`` (a meta-device model): every module object and
    every registry dict (parameters, buffers, submodules, hooks) is new, so assigning weights into
    the copy never touches the template; the meta tensors themselves and plain configuration
    attributes are shared (they are replaced, or never changed). ~30x cheaper than deepcopy."""
    clone = object.__new__(type(template))
    state = dict(template.__dict__)
    for key, value in state.items():
        if key == "_modules":
            state[key] = {name: None if child is None else _fresh_structure(child) for name, child in value.items()}
        elif isinstance(value, (dict, set)):
            state[key] = type(value)(value) if not isinstance(value, OrderedDict) else OrderedDict(value)
    clone.__dict__.update(state)
    return clone


@functools.lru_cache(maxsize=8)
def _meta_template(arch: VisionArch) -> torch.nn.Module:
    return _construct(arch, "meta")


def _construct(arch: VisionArch, device: str | torch.device) -> torch.nn.Module:
    from open_clip.model import CLIP  # lazy: importing open_clip takes seconds; only building needs it

    try:
        with torch.device(device):
            model = CLIP(arch.embed_dim, arch.vision_cfg(), arch.text_cfg(),
                         quick_gelu=bool(arch.quick_gelu))
    except (AssertionError, ValueError) as exc:  # open_clip's (and torch.nn's) own shape checks
        raise ArchitectureMismatchError(
            f"open_clip cannot build a ViT of these shapes ({arch.describe()}): {printable(str(exc))[:200]}. "
            "The weights are no open_clip ViT image encoder.") from None
    del model.transformer
    if "attn_mask" in model._buffers:  # the text tower's causal mask: no text tower, no mask
        del model._buffers["attn_mask"]
        model.attn_mask = None
    return model


def image_transforms(arch: VisionArch) -> tuple[Any, Any]:
    """open_clip's (train, eval) transforms for an architecture, as the original encoder had them.

    Args:
        arch: the architecture (only its ``image_size`` matters).

    Returns:
        ``(train_preprocess, val_preprocess)``: open_clip's ``image_transform`` with
        ``is_train`` True, then False.
    """
    import open_clip  # lazy: importing open_clip takes seconds; only building needs it

    return (open_clip.image_transform(arch.image_size, is_train=True),
            open_clip.image_transform(arch.image_size, is_train=False))
