"""Synthesize checkpoints in every form the wild has, without any download.

Used by the tests, the CLI's embedded default (`python -m pool verify` with no config) and
downstream projects' fixtures. Encoders are pickled as ``src.modeling.ImageEncoder`` and heads as
``src.modeling.ClassificationHead``, exactly as the task-arithmetic code wrote them, through a
stand-in ``src.modeling`` module that exists only while writing (and is removed afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from omegaconf import OmegaConf
from torch import nn

from .arch import VisionArch, arch_for_name, build_clip

__all__ = [
    "TINY",
    "ENCODER_CONTAINERS",
    "legacy_modeling_module",
    "make_original_encoder",
    "make_original_head",
    "save_module",
    "save_object",
    "write_tree",
    "SynthTree",
]

log = logging.getLogger(__name__)

#: A few-layer ViT at 32 px: big enough to exercise every code path, small enough for tests.
TINY = VisionArch(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0,
                  embed_dim=32, quick_gelu=True, text_context_length=8, text_vocab_size=64,
                  text_width=32)
ENCODER_CONTAINERS = ("zip", "legacy", "pickle")
DEFAULT_TASKS = ("Cars", "DTD", "EuroSAT", "MNIST")


class _OriginalImageEncoder(nn.Module):
    """Mirror of task_vectors' ``src.modeling.ImageEncoder`` (attributes and forward)."""

    def __init__(self, model: nn.Module, train_preprocess: Any, val_preprocess: Any,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = cache_dir

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _OriginalClassificationHead(nn.Linear):
    """Mirror of task_vectors' ``src.modeling.ClassificationHead``."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None) -> None:
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros(output_size))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


for _cls, _name in ((_OriginalImageEncoder, "ImageEncoder"), (_OriginalClassificationHead, "ClassificationHead")):
    _cls.__module__, _cls.__name__, _cls.__qualname__ = "src.modeling", _name, _name


@contextlib.contextmanager
def legacy_modeling_module() -> Iterator[types.ModuleType]:
    """Register a stand-in ``src.modeling`` while pickling, so classes pickle under that name.

    What ``sys.modules`` held under ``src`` and ``src.modeling`` before is restored afterwards.

    Yields:
        The stand-in ``src.modeling`` module (its ``ImageEncoder`` and ``ClassificationHead``).
    """
    saved = {k: sys.modules.get(k) for k in ("src", "src.modeling")}
    src = types.ModuleType("src")
    modeling = types.ModuleType("src.modeling")
    modeling.ImageEncoder = _OriginalImageEncoder
    modeling.ClassificationHead = _OriginalClassificationHead
    src.modeling = modeling
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    try:
        yield modeling
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def make_original_encoder(arch: VisionArch = TINY, seed: int = 0) -> nn.Module:
    """An ``src.modeling.ImageEncoder`` like the published ones, with random weights.

    CLIP with its text transformer deleted, open_clip transforms attached, random weights from
    ``seed``.

    Args:
        arch: the architecture (default `TINY`, a few-layer ViT at 32 px).
        seed: the random weights' seed: the same seed gives the same weights.

    Returns:
        The encoder, an instance of the stand-in ``src.modeling.ImageEncoder``.

    Raises:
        ArchitectureMismatchError: open_clip cannot build ``arch``.

    Example:
        >>> make_original_encoder(seed=1).model.visual.conv1.weight.shape
        torch.Size([128, 3, 8, 8])
    """
    import open_clip  # lazy: importing open_clip takes seconds; `import pool.synth` stays light

    model = build_clip(arch, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            fresh = torch.randn(param.shape, generator=generator)
            if param.dim() > 1:
                fresh *= 0.5 / param.shape[-1] ** 0.5
            elif param.dim() == 1 and param.shape[0] == arch.width:
                fresh = 1.0 + 0.1 * fresh
            else:
                fresh *= 0.1
            param.copy_(fresh)
    train = open_clip.image_transform(arch.image_size, is_train=True)
    val = open_clip.image_transform(arch.image_size, is_train=False)
    return _OriginalImageEncoder(model, train, val, cache_dir=None)


def make_original_head(num_classes: int, embed_dim: int, seed: int = 0,
                       normalize: bool = True) -> nn.Module:
    """An ``src.modeling.ClassificationHead`` with random weights and bias.

    Args:
        num_classes: the head's outputs.
        embed_dim: its inputs (the encoder's embedding size).
        seed: the random weights' seed.
        normalize: the head's ``normalize`` flag.

    Returns:
        The head, an instance of the stand-in ``src.modeling.ClassificationHead``.

    Example:
        >>> make_original_head(5, 32).weight.shape
        torch.Size([5, 32])
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    weights = torch.randn(num_classes, embed_dim, generator=generator)
    biases = torch.randn(num_classes, generator=generator) * 0.1
    return _OriginalClassificationHead(normalize, weights, biases)


def save_object(obj: Any, target: str | Path | BinaryIO, container: str) -> Any:
    """Write any object the ways the wild did: ``zip`` / ``legacy`` torch.save, or a plain ``pickle``.

    A plain ``pickle`` is protocol 4; ``pickle0`` ... ``pickle5`` name one. ``target`` is a path
    (folders are created) or a binary file object. Returns ``target``.

    Args:
        obj: what to write (modules pickle as ``src.modeling`` classes).
        target: a file path or a binary file object.
        container: ``"zip"``, ``"legacy"``, ``"pickle"`` or ``"pickle0"`` ... ``"pickle5"``.

    Returns:
        ``target`` (as a `Path` when it was a string).

    Raises:
        ValueError: ``container`` is none of those.
    """
    if container == "pickle" or (container.startswith("pickle") and container[6:].isdigit()):
        protocol = int(container[6:] or 4)
    elif container not in ("zip", "legacy"):
        raise ValueError(f"unknown container {container!r}; expected zip, legacy, pickle or pickle0-5")
    if isinstance(target, (str, Path)):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
    # A caller's own src.modeling (a test's stand-in classes) stays; else ours for the originals.
    modeling = contextlib.nullcontext() if "src.modeling" in sys.modules else legacy_modeling_module()
    with modeling, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        if container in ("zip", "legacy"):
            torch.save(obj, target, _use_new_zipfile_serialization=container == "zip")
        elif isinstance(target, Path):
            with open(target, "wb") as f:
                pickle.dump(obj, f, protocol=protocol)
        else:
            pickle.dump(obj, target, protocol=protocol)
    return target


def save_module(module: nn.Module, path: str | Path, container: str) -> Path:
    """Write a whole module the way the wild did: ``zip`` / ``legacy`` torch.save, or ``pickle``.

    Args:
        module: the module (`make_original_encoder`, `make_original_head`).
        path: the file to write (its folders are created).
        container: as for `save_object`.

    Returns:
        ``path``, as a `Path`.

    Raises:
        ValueError: ``container`` is not known.
    """
    return save_object(module, Path(path), container)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path, fmt: str = "torch") -> Path:
    """Write a state dict as torch zip (``torch``) or ``safetensors``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        safetensors.torch.save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


@dataclass
class SynthTree:
    """What `write_tree` wrote: the root, the pool config and each file by role.

    Attributes:
        root: the tree's root folder.
        config: the pool config, ``root/pool.yaml``.
        arch: the architecture of every encoder.
        model_name: its open_clip name, or None for the tiny default.
        files: each file by role: ``_pretrained_``, a task (``cars``), ``head_<task>``,
            ``<task>_state_dict`` and ``<task>_safetensors`` for the first task.
        tasks: the task names, as given.
    """

    root: Path
    config: Path
    arch: VisionArch
    model_name: str | None
    files: dict[str, Path]
    tasks: tuple[str, ...]


def write_tree(root: str | Path, *, arch: VisionArch | str = TINY, tasks: Sequence[str] = DEFAULT_TASKS,
               num_classes: int = 5, seed: int = 0) -> SynthTree:
    """Write a checkpoint tree in the real layout, every form represented, plus a pool config.

    ``root/<ARCH>/zeroshot.pt`` (zip), ``root/<ARCH>/<Task>/finetuned.pt`` cycling through the zip,
    legacy and plain-pickle containers, a state-dict file and a safetensors file for the first
    task, and ``root/<ARCH>/head_<Task>.pt`` heads; ``root/pool.yaml`` points at all of them.
    ``<ARCH>`` is the model name, or ``tiny``. The config names every file by its absolute path, so
    it works from any working directory (pool resolves relative paths against the working
    directory, not the config's folder); a tree that is moved needs writing again.

    Args:
        root: the folder to write in (created if needed; existing files are overwritten).
        arch: a `VisionArch` or an open_clip name (default `TINY`).
        tasks: the task names (folder names; pool names are their lower-case forms).
        num_classes: the first task's head's classes; each next task's head has one more.
        seed: the random weights' seed.

    Returns:
        The `SynthTree`.

    Raises:
        ConfigError: ``arch`` is a name that is no open_clip ViT config this loader can build.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tree = write_tree(tmp, tasks=["Cars"])
        ...     sorted(tree.files)
        ['_pretrained_', 'cars', 'cars_safetensors', 'cars_state_dict', 'head_cars']
    """
    model_name = arch if isinstance(arch, str) else None
    spec = arch_for_name(arch) if isinstance(arch, str) else arch
    root = Path(root).expanduser().absolute()  # the config's paths work from any working directory
    arch_dir = root / (model_name or "tiny")
    files: dict[str, Path] = {}
    pretrained = make_original_encoder(spec, seed=seed)
    files["_pretrained_"] = save_module(pretrained, arch_dir / "zeroshot.pt", "zip")
    models: dict[str, Any] = {"_pretrained_": str(files["_pretrained_"])}
    heads: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        encoder = make_original_encoder(spec, seed=seed + i + 1)
        container = ENCODER_CONTAINERS[i % len(ENCODER_CONTAINERS)]
        key = task.lower()
        files[key] = save_module(encoder, arch_dir / task / "finetuned.pt", container)
        entry: Any = str(files[key])
        if model_name:
            entry = {"model_name": model_name, "pickle_path": str(files[key])}
        models[key] = entry
        head = make_original_head(num_classes + i, spec.embed_dim, seed=seed + i)
        files[f"head_{key}"] = save_module(head, arch_dir / f"head_{task}.pt",
                                           "pickle" if i % 2 else "zip")
        heads[key] = str(files[f"head_{key}"])
    if tasks:  # the state-dict forms of the first task's weights
        first = tasks[0].lower()
        encoder = make_original_encoder(spec, seed=seed + 1)
        files[f"{first}_state_dict"] = save_state_dict(encoder.state_dict(), arch_dir / tasks[0] / "finetuned_state_dict.pt")
        files[f"{first}_safetensors"] = save_state_dict(encoder.state_dict(), arch_dir / tasks[0] / "finetuned.safetensors", "safetensors")
        name = model_name or "custom"
        models[f"{first}_state_dict"] = {"model_name": name, "state_dict_path": str(files[f"{first}_state_dict"])}
        models[f"{first}_safetensors"] = {"model_name": name, "state_dict_path": str(files[f"{first}_safetensors"])}
        if model_name is None:  # a tiny arch has no open_clip name: describe it instead
            for entry in (models[f"{first}_state_dict"], models[f"{first}_safetensors"]):
                entry.pop("model_name")
    config = root / "pool.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads}), config)
    log.info("wrote a %s checkpoint tree with %d models under %s", model_name or "tiny", len(models), root)
    return SynthTree(root, config, spec, model_name, files, tuple(tasks))
