"""The example configuration of the original OpenCLIPVisionModelPool documentation loads verbatim.

It names real architectures (ViT-B-16, ViT-B-32), so this test writes real-size checkpoints with
random weights (about 0.9 GB in a temporary directory, a few seconds) in the published layout.
Its ``state_dict_path`` points at a pickled encoder: the reader handles that.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pool import ArchitectureMismatchError, ImageEncoder, OpenCLIPVisionModelPool
from pool.arch import arch_for_name
from pool.synth import make_original_encoder, make_original_head, save_module

SEED = Path(__file__).parent / "data" / "seed_example.yaml"
SHARED_SEED = Path(__file__).parents[2] / "shared" / "SEED_EXAMPLE.yaml"
ROOT = Path(".cache/task_vectors_checkpoints")


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    """A working directory holding the layout the example names, with real-size checkpoints."""
    work = tmp_path_factory.mktemp("seed")
    originals = {}
    for arch_name, task, seed in (("ViT-B-16", "Cars", 1), ("ViT-B-32", "DTD", 2)):
        encoder = make_original_encoder(arch_for_name(arch_name), seed=seed)
        save_module(encoder, work / ROOT / arch_name / task / "finetuned.pt", "zip")
        head = make_original_head(10, 512, seed=seed)
        save_module(head, work / ROOT / f"head_{task}.pt", "pickle" if seed == 1 else "zip")
        originals[arch_name] = {k: v.clone() for k, v in encoder.state_dict().items()}
        originals[f"head_{task}"] = head
        del encoder
    shutil.copy(SEED, work / "pool.yaml")
    return work, originals


def test_committed_copy_matches_the_shared_example():
    if not SHARED_SEED.exists():
        pytest.skip(f"{SHARED_SEED} is not beside this checkout")
    assert SEED.read_text() == SHARED_SEED.read_text()


def test_seed_example_loads_verbatim(seed_dir, monkeypatch):
    work, originals = seed_dir
    monkeypatch.chdir(work)
    pool = OpenCLIPVisionModelPool.from_config("pool.yaml")
    assert pool.model_names == ["vit_b16", "vit_b32"]
    for name, arch_name in (("vit_b16", "ViT-B-16"), ("vit_b32", "ViT-B-32")):
        encoder = pool.load_model(name)
        assert encoder.model_name == arch_name
        assert encoder.arch.quick_gelu is True
        got, want = encoder.state_dict(), originals[arch_name]
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        del encoder
    for name, task in (("cars_head", "Cars"), ("dtd_head", "DTD")):
        head = pool.load_classification_head(name)
        assert torch.equal(head.weight, originals[f"head_{task}"].weight)
        assert head.normalize is True
    assert "size=(224, 224)" in repr(pool.test_processor)


def test_b16_weights_configured_as_b32_say_what_they_are(seed_dir, monkeypatch):
    work, _ = seed_dir
    monkeypatch.chdir(work)
    path = ROOT / "ViT-B-16" / "Cars" / "finetuned.pt"
    pool = OpenCLIPVisionModelPool(models={"cars": {"model_name": "ViT-B-32", "pickle_path": str(path)}})
    with pytest.raises(ArchitectureMismatchError) as err:
        pool.load_model("cars")
    message = str(err.value)
    assert "weights are ViT-B-16 (patch 16, width 768, 12 layers" in message
    assert "config says ViT-B-32 (patch 32" in message
    assert str(path) in message and "models.cars" in message


def test_bare_path_infers_the_architecture(seed_dir, monkeypatch):
    work, _ = seed_dir
    monkeypatch.chdir(work)
    encoder = ImageEncoder.load(ROOT / "ViT-B-32" / "DTD" / "finetuned.pt")
    assert encoder.model_name == "ViT-B-32"
    assert encoder.arch == arch_for_name("ViT-B-32")
