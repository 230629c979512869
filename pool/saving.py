"""Save a module's weights: safetensors by default, a torch zip state dict for ``.pt``, ``.pth``
and ``.bin``; never a pickled module.

`module_payload` says what is written for a module (tensors and metadata: an `ImageEncoder`'s
architecture and activation, a `ClassificationHead`'s ``normalize`` flag); `pool.writer.write_checked`
writes it atomically, read back and compared bit for bit. `pool.convert` and
`OpenCLIPVisionModelPool.save_model` both go through here, so what either writes loads back
through every form of the pool.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import (
    HEADS_METADATA,
    QUICK_GELU_METADATA,
    VisionArch,
    arch_for_name,
    default_quick_gelu,
    name_for_arch,
)
from .errors import ConfigError
from .writer import contiguous_unshared, write_checked

__all__ = ["module_payload", "save_module_weights", "torch_format_for", "TORCH_SUFFIXES"]

log = logging.getLogger(__name__)

#: Suffixes written as a torch zip state dict (``torch.save`` of a dict of tensors); others: safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def module_payload(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata written for ``module``.

    An `ImageEncoder` (anything with a ``VisionArch`` in ``.arch``) is written with its
    ``state_dict()`` keys (``model.visual...``) and ``pool.kind=encoder``, the architecture, the
    open_clip name and the activation (`pool.arch.QUICK_GELU_METADATA`); a `ClassificationHead`
    (``normalize`` plus a 2-d ``weight``) as ``weight`` / ``bias`` with its ``normalize`` flag;
    any other module as its state dict (``pool.kind=state_dict``).

    Args:
        module: the module whose weights are written.

    Returns:
        ``(tensors, metadata)``: contiguous CPU tensors sharing no storage, and string metadata.
    """
    arch = getattr(module, "arch", None)
    weight = getattr(module, "weight", None)
    if isinstance(arch, VisionArch):
        name = name_for_arch(arch)
        meta = {"pool.kind": "encoder", "pool.architecture": arch.describe(), "pool.model_name": name or "",
                QUICK_GELU_METADATA: str(bool(arch.quick_gelu)).lower(), "pool.embed_dim": str(arch.embed_dim),
                "pool.image_size": str(arch.image_size), HEADS_METADATA: str(arch.heads)}
        tensors = dict(module.state_dict())
    elif hasattr(module, "normalize") and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        classes, dim = (int(x) for x in weight.shape)
        bias = getattr(module, "bias", None)
        tensors = {"weight": weight, "bias": bias if bias is not None else torch.zeros(classes, dtype=weight.dtype)}
        meta = {"pool.kind": "head", "normalize": str(bool(module.normalize)).lower(),
                "pool.classes": str(classes), "pool.embed_dim": str(dim)}
    else:
        tensors = dict(module.state_dict())
        meta = {"pool.kind": "state_dict", "pool.module": type(module).__qualname__}
    return contiguous_unshared(tensors), meta


def _lost_in_torch_format(module: nn.Module) -> list[str]:
    """What a plain state-dict file would not carry: the settings a reader would infer otherwise
    (an activation or head count other than the shapes' default, a head's ``normalize=False``)."""
    arch = getattr(module, "arch", None)
    if isinstance(arch, VisionArch):
        lost = []
        if bool(arch.quick_gelu) != default_quick_gelu(arch):
            lost.append(f"activation ({'QuickGELU' if arch.quick_gelu else 'GELU'})")
        name = name_for_arch(arch)
        default_heads = arch_for_name(name).heads if name else max(1, arch.width // 64)
        if arch.heads != default_heads:
            lost.append(f"attention heads ({arch.heads})")
        return lost
    if hasattr(module, "normalize") and not module.normalize:
        return ["normalize=False flag"]
    return []


def torch_format_for(module: nn.Module, destination: Path) -> bool:
    """Whether ``destination`` is written as a torch zip state dict (its name ends in ``.pt``,
    ``.pth`` or ``.bin``; any other name is written as safetensors), refusing a torch file that
    would lose what ``module`` needs to read back as it is.

    A torch file keeps tensors only, no metadata: a reader infers the activation and head count
    from the shapes and takes a head's ``normalize`` as True.

    Args:
        module: the module to write (`module_payload` says what is written).
        destination: the file to write.

    Returns:
        True for a torch file, False for safetensors.

    Raises:
        ConfigError: a torch file could not carry the model's activation or head count (other
            than its shapes' default) or a head's ``normalize=False``: save it as safetensors.
    """
    if destination.suffix.lower() not in TORCH_SUFFIXES:
        return False
    lost = _lost_in_torch_format(module)
    if lost:
        raise ConfigError(f"{destination}: a {destination.suffix} file keeps tensors only, and this model's "
                          f"{' and '.join(lost)} would read back otherwise. Save it as .safetensors, "
                          "which records it.")
    return True


def save_module_weights(module: nn.Module, path: str | os.PathLike[str], **ignored: Any) -> Path:
    """Save ``module``'s weights to ``path``: safetensors, or a torch zip state dict when the name ends
    in ``.pt``, ``.pth`` or ``.bin``. Atomic and read back before it replaces anything; never a
    pickled module, so the file loads with any reader, ours included, in every pool form. A new
    file gets ``0666 & ~umask`` (as ``open`` gives), a replaced one keeps its mode
    (`pool.writer.written_mode`).

    Args:
        module: an `ImageEncoder`, a `ClassificationHead` or any module.
        path: the file to write (its folder must exist).
        ignored: other keyword arguments (FusionBench passes some); logged at debug level.

    Returns:
        The path written.

    Raises:
        ConfigError: ``path`` is a folder or its folder does not exist, or a ``.pt`` / ``.pth`` /
            ``.bin`` file could not carry what the model needs (an activation or head count other
            than its shapes' default, a head's ``normalize=False``): save as safetensors.
        CorruptCheckpointError: the written file did not read back identical (`pool.writer.write_checked`).

    Example:
        >>> from pool.saving import save_module_weights
        >>> save_module_weights(merged_encoder, "merged.safetensors")  # doctest: +SKIP
    """
    destination = Path(path).expanduser()
    if ignored:
        log.debug("save_model: ignoring arguments %s", sorted(ignored))
    if destination.is_dir():
        raise ConfigError(f"{destination} is a folder; give the file to write, e.g. {destination / 'merged.safetensors'}")
    if not destination.parent.is_dir():
        raise ConfigError(f"{destination.parent} does not exist; create the folder first.")
    torch_format = torch_format_for(module, destination)
    tensors, metadata = module_payload(module)
    size = write_checked(tensors, metadata, destination, torch_format=torch_format)
    log.info("saved %s (%d tensors, %d bytes)", destination, len(tensors), size)
    return destination
