"""pytest fixtures that synthesize tiny checkpoints in every form and container.

This project's own ``conftest.py`` loads it with ``pytest_plugins = ["pool.testing"]``. A
downstream project enables it with ``openclip_pool_fixtures = true`` in its pytest ini options (see
`pool.pytest_plugin`), ``-p pool.testing``, or the same ``pytest_plugins`` line (no download, a
few MB in a tmp dir). Fixtures: ``tiny_arch``, ``synth_tree``, ``write_encoder``, ``write_head``,
``pool_golden``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

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


# -- golden outputs for downstream projects ---------------------------------------------------------
@dataclass
class GoldenTree:
    """A synthesized checkpoint tree plus the outputs its original modules compute.

    ``config`` is a pool YAML naming every entry form (path strings in the zip, legacy and
    plain-pickle containers, ``{pickle_path}``, ``{state_dict_path}`` for a torch state dict and a
    safetensors file, a Hydra ``_target_``); ``features[name]`` is what the module behind model
    entry ``name`` computes on ``images`` (eval mode), ``logits[name]`` what head ``name`` computes
    on the features of the encoder of the same task, ``state_dicts[name]`` the encoder's
    ``state_dict()``. ``expected`` holds the same tensors as one safetensors file
    (``images``, ``features.<name>``, ``logits.<name>``).
    """

    tree: synth.SynthTree
    config: Path
    models: dict[str, Any]
    classification_heads: dict[str, Any]
    images: torch.Tensor
    features: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    state_dicts: dict[str, dict[str, torch.Tensor]]
    expected: Path

    @property
    def root(self) -> Path:
        return self.tree.root

    def assert_encoder(self, name: str, encoder: torch.nn.Module, atol: float = 1e-5) -> None:
        """State dict bit for bit (same keys, same order) and features to ``atol``."""
        got, want = encoder.state_dict(), self.state_dicts[name]
        assert list(got) == list(want), f"{name}: state_dict keys differ"
        for key, value in want.items():
            assert torch.equal(got[key].cpu(), value), f"{name}: {key} differs"
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            feats = encoder(self.images)
        encoder.train(was_training)
        torch.testing.assert_close(feats.float().cpu(), self.features[name], atol=atol, rtol=0)

    def assert_head(self, name: str, head: torch.nn.Module, atol: float = 1e-5) -> None:
        """Logits on the task encoder's expected features to ``atol``."""
        with torch.no_grad():
            logits = head(self.features[self._task_model(name)])
        torch.testing.assert_close(logits.float().cpu(), self.logits[name], atol=atol, rtol=0)

    def _task_model(self, head_name: str) -> str:
        return head_name.removesuffix("_pickle_path")


def write_golden_tree(root: str | Path, *, seed: int = 0, batch: int = 2) -> GoldenTree:
    """`synth.write_tree` plus every remaining entry form and the expected outputs.

    The expected outputs come from the original (``src.modeling``-style) modules that were
    pickled, run with the installed open_clip: a loader under test must reproduce them from the
    files alone. (`pool`'s own tests additionally pin the outputs open_clip 2.0.2 computes, with
    golden files written by 2.0.2 itself: tests/data/golden.)
    """
    tree = synth.write_tree(Path(root), seed=seed)
    spec, tasks = tree.arch, tree.tasks
    originals: dict[str, torch.nn.Module] = {"_pretrained_": synth.make_original_encoder(spec, seed=seed)}
    heads: dict[str, torch.nn.Module] = {}
    for i, task in enumerate(tasks):  # the seeds write_tree uses
        originals[task.lower()] = synth.make_original_encoder(spec, seed=seed + i + 1)
        heads[task.lower()] = synth.make_original_head(5 + i, spec.embed_dim, seed=seed + i)
    first = tasks[0].lower()
    originals[f"{first}_state_dict"] = originals[first]
    originals[f"{first}_safetensors"] = originals[first]

    plain = OmegaConf.to_container(OmegaConf.load(tree.config), resolve=True)
    models: dict[str, Any] = dict(plain["models"])
    head_entries: dict[str, Any] = dict(plain["classification_heads"])
    pickled = {k: v for k, v in models.items() if isinstance(v, str) and k in originals}
    for name, path in list(pickled.items()):
        if name == "_pretrained_":
            continue
        models[f"{name}_pickle_path"] = {"pickle_path": path}
        originals[f"{name}_pickle_path"] = originals[name]
        models[f"{name}_hydra"] = {"_target_": "pool.ImageEncoder.load", "path": path}
        originals[f"{name}_hydra"] = originals[name]
    for name, path in list(head_entries.items()):
        head_entries[f"{name}_pickle_path"] = {"pickle_path": path}
        heads[f"{name}_pickle_path"] = heads[name]

    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=generator)
    features, state_dicts = {}, {}
    with torch.no_grad():
        for name, module in originals.items():
            module.eval()
            features[name] = module(images)
            state_dicts[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        logits = {name: head(features[name.removesuffix("_pickle_path")]) for name, head in heads.items()}

    config = tree.root / "pool_all_forms.yaml"
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": head_entries}), config)
    expected = tree.root / "expected.safetensors"
    tensors = {"images": images, **{f"features.{k}": v for k, v in features.items()},
               **{f"logits.{k}": v for k, v in logits.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(expected))
    return GoldenTree(tree, config, models, head_entries, images, features, logits, state_dicts, expected)


@pytest.fixture(scope="session")
def pool_golden(tmp_path_factory: pytest.TempPathFactory) -> GoldenTree:
    """A tiny checkpoint tree in every form and container, with the outputs to expect.

    ``pool_golden.config`` is a pool YAML with every entry form; ``pool_golden.assert_encoder(name,
    encoder)`` / ``assert_head(name, head)`` check what a loader built against the original modules.
    Session-scoped: treat the files as read-only.
    """
    return write_golden_tree(tmp_path_factory.mktemp("pool_golden"))
