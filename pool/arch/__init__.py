"""Architectures: what a ViT checkpoint's weights say it is, and building it without waste.

One module per job; this package is their public face (``from pool.arch import ...``):

* `pool.arch.spec`: `VisionArch`, the architecture as frozen data;
* `pool.arch.infer`: `infer_arch` reads patch size, width, layers, image size, MLP ratio and
  embedding size from the tensor shapes (head count and activation from a pickled module's records);
* `pool.arch.names`: open_clip's configs by name (`arch_for_name`, `name_for_arch`,
  `default_quick_gelu`, `known_architectures`) and `check_arch`;
* `pool.arch.recorded`: what a file's metadata records (`recorded_quick_gelu`, `recorded_heads`);
* `pool.arch.build`: `build_clip` constructs the open_clip ``CLIP`` on the meta device, so no time
  goes into initialising weights that are about to be replaced; `image_transforms`.
"""

from __future__ import annotations

from .build import build_clip, image_transforms
from .infer import infer_arch
from .names import (
    OPENAI_MODEL_NAMES,
    arch_for_name,
    check_arch,
    default_quick_gelu,
    known_architectures,
    name_for_arch,
)
from .recorded import HEADS_METADATA, QUICK_GELU_METADATA, recorded_heads, recorded_quick_gelu
from .spec import VisionArch

__all__ = [
    "VisionArch",
    "OPENAI_MODEL_NAMES",
    "arch_for_name",
    "infer_arch",
    "build_clip",
    "image_transforms",
    "check_arch",
    "name_for_arch",
    "default_quick_gelu",
    "known_architectures",
    "recorded_quick_gelu",
    "QUICK_GELU_METADATA",
    "HEADS_METADATA",
    "recorded_heads",
]
