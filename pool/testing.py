"""pytest fixtures that synthesize tiny checkpoints in every form and container.

This project's own ``conftest.py`` loads it with ``pytest_plugins = ["pool.testing"]``; a
downstream project can do the same to get the fixtures (no download, a few MB in a tmp dir).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from . import synth
from .arch import VisionArch


@pytest.fixture(scope="session")
def tiny_arch() -> VisionArch:
    """The tiny ViT used across the fixtures (32 px, 2 layers, width 128)."""
    return synth.TINY


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthTree:
    """A checkpoint tree in the real layout (zeroshot, fine-tuned tasks in every container,
    state-dict and safetensors forms, heads) with its ``pool.yaml``. Session-scoped: read only."""
    return synth.write_tree(tmp_path_factory.mktemp("synth_tree"))


@pytest.fixture()
def write_encoder(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: ``write_encoder(container, arch=TINY, seed=0)`` -> (path, original module)."""

    def make(container: str = "zip", arch: VisionArch = synth.TINY, seed: int = 0,
             name: str | None = None) -> tuple[Path, torch.nn.Module]:
        module = synth.make_original_encoder(arch, seed=seed)
        path = tmp_path / (name or f"encoder_{seed}.{container}.pt")
        if container in synth.ENCODER_CONTAINERS:
            synth.save_module(module, path, container)
        else:
            synth.save_state_dict(module.state_dict(), path, "safetensors" if container == "safetensors" else "torch")
        return path, module

    return make


@pytest.fixture()
def write_head(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: ``write_head(container, num_classes=5, embed_dim=32, normalize=True)``."""

    def make(container: str = "zip", num_classes: int = 5, embed_dim: int = synth.TINY.embed_dim,
             normalize: bool = True, seed: int = 0) -> tuple[Path, torch.nn.Module]:
        head = synth.make_original_head(num_classes, embed_dim, seed=seed, normalize=normalize)
        path = tmp_path / f"head_{seed}.{container}.pt"
        synth.save_module(head, path, container)
        return path, head

    return make
