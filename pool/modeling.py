"""`ImageEncoder` and `ClassificationHead`: the task-arithmetic modules, rebuilt safely.

Both mirror the originals in ``src.modeling`` (attributes, forward, ``state_dict()`` keys) but are
built from weights: the CLIP is constructed on the meta device and the checkpoint's tensors are
assigned into it, so there is no download and no initialisation thrown away.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from os import PathLike
from typing import Any

import torch
from torch import nn

from .arch import (
    VisionArch,
    arch_for_name,
    build_clip,
    check_arch,
    default_quick_gelu,
    infer_arch,
    name_for_arch,
    recorded_quick_gelu,
)
from .checkpoint import Checkpoint, read_checkpoint
from .errors import ArchitectureMismatchError, CheckpointError, ConfigError, printable
from .gcpause import paused_gc
from .keys import TEXT_SIDE_KEYS, key_mismatch, strip_ddp, to_clip_keys, to_clip_modules

__all__ = ["ImageEncoder", "ClassificationHead", "DType"]

log = logging.getLogger(__name__)

DType = torch.dtype | str | None
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


def resolve_dtype(dtype: DType) -> torch.dtype | None:
    """``"bf16"``, ``"torch.bfloat16"`` or a torch.dtype -> torch.dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def place_module(module: nn.Module, device: Any, dtype: DType) -> nn.Module:
    """The module in ``dtype`` on ``device``. A dict ``map_location`` placed each tensor when the
    file was read: the module is then not moved as a whole."""
    dt = resolve_dtype(dtype)
    if isinstance(device, Mapping):
        device = None
    if device is not None or dt is not None:
        module = module.to(device=device, dtype=dt)
    return module


class ImageEncoder(nn.Module):
    """An open_clip image encoder shaped like task_vectors' ``src.modeling.ImageEncoder``.

    ``.model`` is the open_clip ``CLIP`` (text transformer removed), ``forward(images)`` is
    ``model.encode_image(images)``, ``.train_preprocess`` / ``.val_preprocess`` are open_clip's
    transforms for the architecture, ``.arch`` describes it, and ``state_dict()`` has the
    original checkpoint's keys (``model.visual...``).
    """

    def __init__(self, model: nn.Module, train_preprocess: Any = None, val_preprocess: Any = None,
                 *, arch: VisionArch | None = None, model_name: str | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = cache_dir
        self.arch = arch
        self.model_name = model_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, model_name: str | None = None,
                        quick_gelu: bool | None = None, device: Any = None, dtype: DType = None,
                        modules: Mapping[str, Any] | None = None, source: str = "state dict") -> ImageEncoder:
        """Build from tensors in any known key layout; infer or check the architecture.

        ``model_name`` (an open_clip name) is checked against the weights; without it the
        architecture is read from the tensor shapes. QuickGELU: an explicit ``quick_gelu`` wins,
        then the activation class a pickle names, then the model name's default (OpenAI names
        use QuickGELU).
        """
        sd = to_clip_keys(state_dict, source=source)
        weights = infer_arch(sd, to_clip_modules(modules), source=source)
        if model_name:
            arch = arch_for_name(model_name)
            check_arch(weights, arch, model_name, source)
            arch = replace(arch, heads=weights.heads if modules else arch.heads,
                           text_context_length=weights.text_context_length,
                           text_vocab_size=weights.text_vocab_size, text_width=weights.text_width)
            if weights.quick_gelu is not None:
                arch = replace(arch, quick_gelu=weights.quick_gelu)
        else:
            arch = weights if weights.quick_gelu is not None else replace(
                weights, quick_gelu=default_quick_gelu(weights))
        if quick_gelu is not None:
            arch = replace(arch, quick_gelu=bool(quick_gelu))
        with paused_gc():  # many small objects, no cycles to collect: see pool.gcpause
            model = _assign(build_clip(arch, source=source), sd, source)
            encoder = cls(model, *image_transforms(arch), arch=arch, model_name=model_name or name_for_arch(arch))
        return place_module(encoder, device, dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> ImageEncoder:
        """Build from a `pool.checkpoint.Checkpoint` (uses its module records when it has them)."""
        kwargs.setdefault("source", str(checkpoint.path))
        if kwargs.get("quick_gelu") is None and not checkpoint.modules:
            kwargs["quick_gelu"] = recorded_quick_gelu(checkpoint.metadata)  # written by pool.convert
        return cls.from_state_dict(checkpoint.state_dict, modules=checkpoint.modules or None, **kwargs)

    @classmethod
    def load(cls, path: str | PathLike[str], *, model_name: str | None = None, quick_gelu: bool | None = None,
             device: Any = None, dtype: DType = None, mmap: bool | None = None,
             map_location: Any = None) -> ImageEncoder:
        """Read any supported encoder file (pickle, state dict, safetensors) and build it.

        ``map_location`` is an alias of ``device``, as in ``torch.load``.
        """
        device = device if device is not None else map_location
        ckpt = read_checkpoint(path, map_location=device, mmap=mmap)
        return cls.from_checkpoint(ckpt, model_name=model_name, quick_gelu=quick_gelu, device=device,
                                   dtype=dtype)


def image_transforms(arch: VisionArch) -> tuple[Any, Any]:
    """open_clip's (train, eval) transforms for an architecture, as the original encoder had."""
    import open_clip

    return (open_clip.image_transform(arch.image_size, is_train=True),
            open_clip.image_transform(arch.image_size, is_train=False))


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Assign checkpoint tensors into a meta-device CLIP; drop text-side parts the file lacks."""
    for key in TEXT_SIDE_KEYS:
        if key in sd or key not in model.state_dict():
            continue
        owner, _, leaf = key.rpartition(".")
        if owner and not any(k.startswith(owner + ".") for k in sd):
            delattr(model, owner)  # e.g. no ln_final.* at all: drop the whole module
        else:
            del (model.get_submodule(owner) if owner else model)._parameters[leaf]
    not_float = [k for k, t in sd.items() if not t.is_floating_point()]
    if not_float:
        raise ArchitectureMismatchError(
            f"{source}: the weights are not all floating point ({printable(not_float[0])} is "
            f"{sd[not_float[0]].dtype}); an image encoder's are. The file is damaged or holds something else.")
    problem = key_mismatch(sd, model.state_dict(), "the architecture")
    if problem:
        raise ArchitectureMismatchError(
            f"{source}: the weights do not fit the architecture: {problem}. Is this an open_clip ViT "
            "image encoder, and is model_name right?")
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ArchitectureMismatchError(f"{source}: no weights for {leftover[:5]}")
    return model


class ClassificationHead(nn.Linear):
    """task_vectors' ``ClassificationHead``: a linear map, L2-normalising inputs when ``normalize``."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None) -> None:
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size, device="meta", dtype=weights.dtype)
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(weights.detach().clone())
        bias = biases if biases is not None else torch.zeros(output_size, dtype=weights.dtype)
        self.bias = nn.Parameter(bias.detach().clone().to(weights.device))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, normalize: bool | None = None, device: Any = None,
                        dtype: DType = None) -> ClassificationHead:
        """Rebuild from a read checkpoint: weight, bias and the ``normalize`` flag it stored."""
        sd = strip_ddp(checkpoint.state_dict)
        weight, bias = sd.get("weight"), sd.get("bias")
        if weight is None or weight.dim() != 2:
            raise CheckpointError(
                f"{checkpoint.path}: expected a classification head (a 'weight' of shape [classes, "
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
            raise ArchitectureMismatchError(f"{checkpoint.path}: not a classification head this loader can "
                                            f"build: {problem}. The file is damaged or holds something else.")
        stored = checkpoint.attributes.get("normalize", checkpoint.metadata.get("normalize"))
        if normalize is None:
            normalize = stored if stored is not None else True
            if stored is None:
                log.info("%s: no normalize flag stored; using normalize=True as task_vectors did", checkpoint.path)
        if isinstance(normalize, str):
            normalize = normalize.lower() in ("1", "true", "yes")
        head = cls(bool(normalize), weight, bias)
        return place_module(head, device, dtype)

    @classmethod
    def load(cls, path: str | PathLike[str], *, normalize: bool | None = None, device: Any = None,
             dtype: DType = None, map_location: Any = None) -> ClassificationHead:
        """Read a head file (pickled ClassificationHead, state dict or safetensors) and build it."""
        device = device if device is not None else map_location
        return cls.from_checkpoint(read_checkpoint(path, map_location=device), normalize=normalize,
                                   device=device, dtype=dtype)
