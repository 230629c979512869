"""FusionBench integration (issue 10): `pool.fusion_bench.OpenCLIPVisionModelPool` is a FusionBench
``BaseModelPool``; SimpleAverage, TaskArithmetic and TIES (Python API) and the ``fusion_bench`` CLI
run on it, and every merge equals one computed here by hand, in float32.

The tree: ``$POOL_FUSION_TREE`` when set (``nox -s fusion_bench`` writes one with open_clip 2.0.2
itself: zip, legacy and plain-pickle containers, tests/golden/make_task_tree.py), else a tiny tree
synthesized here in the same layout. Needs fusion-bench 0.2.33 (Python 3.12+); the tests that the
import fails clearly run everywhere. Evaluation needs hub datasets: not run (offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool, synth

HAS_FUSION_BENCH = sys.version_info >= (3, 12)
if HAS_FUSION_BENCH:
    try:
        import fusion_bench  # noqa: F401
    except ImportError:
        HAS_FUSION_BENCH = False

needs_fusion_bench = pytest.mark.skipif(not HAS_FUSION_BENCH,
                                        reason="fusion-bench 0.2.33 is not installed (it needs Python 3.12+)")
TASKS = ("Cars", "DTD")


# -- the tree ------------------------------------------------------------------------------------------
def write_tree(root: Path) -> Path:
    """zeroshot.pt (zip) + Cars/finetuned.pt (legacy) + DTD/finetuned.pt (plain pickle) + heads, with
    distinct weights; returns the folder holding them (the shipped YAML's ``ViT-B-32`` folder role)."""
    folder = root / "tiny"
    synth.save_module(synth.make_original_encoder(seed=0), folder / "zeroshot.pt", "zip")
    for i, (task, container) in enumerate(zip(TASKS, ("legacy", "pickle"), strict=True)):
        synth.save_module(synth.make_original_encoder(seed=i + 1), folder / task / "finetuned.pt", container)
        synth.save_module(synth.make_original_head(5 + i, synth.TINY.embed_dim, seed=i),
                          folder / f"head_{task}.pt", "zip" if i == 0 else "pickle")
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    given = os.environ.get("POOL_FUSION_TREE")
    if given:
        return Path(given).absolute()
    return write_tree(tmp_path_factory.mktemp("fusion_tree"))


def pool_config(tree: Path) -> dict:
    """The shape of FusionBench's shipped ViT-B-32_TA_cars_dtd.yaml, on our tree."""
    return {
        "models": {"_pretrained_": {"pickle_path": str(tree / "zeroshot.pt")},
                   "cars": {"pickle_path": str(tree / "Cars" / "finetuned.pt")},
                   "dtd": str(tree / "DTD" / "finetuned.pt")},
        "classification_heads": {"cars": str(tree / "head_Cars.pt"), "dtd": str(tree / "head_DTD.pt")},
    }


def states(tree: Path) -> tuple[dict, list[dict]]:
    base = ImageEncoder.load(tree / "zeroshot.pt").state_dict()
    tasks = [ImageEncoder.load(tree / task / "finetuned.pt").state_dict() for task in TASKS]
    return base, tasks


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key].detach().cpu(), value), key


# -- merges by hand --------------------------------------------------------------------------------------
def hand_average(tasks: list[dict]) -> dict:
    return {k: sum(t[k] for t in tasks) / len(tasks) for k in tasks[0]}


def hand_task_arithmetic(base: dict, tasks: list[dict], scale: float) -> dict:
    out = {}
    for k in base:
        vector = None
        for t in tasks:
            vector = t[k] - base[k] if vector is None else vector + (t[k] - base[k])
        out[k] = base[k] + vector * scale
    return out


def hand_ties(base: dict, tasks: list[dict], scale: float, keep: float) -> dict:
    """TIES (Yadav et al. 2023): keep each task vector's top ``keep`` fraction by magnitude, elect
    a sign per parameter by the summed trimmed vectors, sum the entries that agree with it."""
    keys = sorted(base)
    flat_base = torch.cat([base[k].reshape(-1) for k in keys])
    vectors = torch.vstack([torch.cat([t[k].reshape(-1) for k in keys]) for t in tasks]) - flat_base
    n = vectors.shape[1]
    kth = vectors.abs().kthvalue(n - int(n * keep), dim=1, keepdim=True).values
    trimmed = vectors * (vectors.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    merged = flat_base + scale * (trimmed * agree).sum(dim=0)
    out, start = OrderedDict(), 0
    for k in keys:
        size = base[k].numel()
        out[k] = merged[start:start + size].reshape(base[k].shape)
        start += size
    return {k: out[k] for k in base}


# -- import errors (everywhere) ----------------------------------------------------------------------------
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the error for Pythons older than 3.12")
def test_import_on_old_python_says_what_is_needed():
    with pytest.raises(ImportError, match=r"needs Python 3\.12 or newer.*typing\.override"):
        import pool.fusion_bench  # noqa: F401


def test_import_without_fusion_bench_says_how_to_install(tmp_path):
    """A fusion_bench that cannot import (here: a stub package raising) gives our message."""
    stub = tmp_path / "fusion_bench"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('stub: not installed')\n")
    code = ("import sys; sys.version_info >= (3, 12) or sys.exit(3)\n"
            "import pool.fusion_bench\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("Python < 3.12: the version error comes first (tested above)")
    assert proc.returncode == 1
    assert 'pip install "openclip-pool[fusion-bench]"' in proc.stderr and "stub: not installed" in proc.stderr


def test_import_pool_never_imports_fusion_bench():
    code = "import sys, pool; pool.OpenCLIPVisionModelPool; print('fusion_bench' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# -- with fusion_bench ------------------------------------------------------------------------------------
@needs_fusion_bench
def test_it_is_a_fusion_bench_model_pool(tree):
    from fusion_bench.compat.modelpool import to_modelpool
    from fusion_bench.modelpool import BaseModelPool

    from pool.fusion_bench import OpenCLIPVisionModelPool as FBPool

    modelpool = FBPool(**pool_config(tree))
    assert isinstance(modelpool, BaseModelPool) and isinstance(modelpool, OpenCLIPVisionModelPool)
    assert to_modelpool(modelpool) is modelpool
    assert modelpool.model_names == ["cars", "dtd"] and modelpool.has_pretrained and len(modelpool) == 2
    assert "cars" in modelpool and modelpool.is_special_model("_pretrained_")
    # FusionBench passes extra arguments to load_*; they never raise
    encoder = modelpool.load_model("cars", weights_only=True)
    assert isinstance(encoder, ImageEncoder)
    head = modelpool.load_classification_head("dtd", "extra", weights_only=True)
    assert torch.equal(head.weight, ClassificationHead.load(tree / "head_DTD.pt").weight)


@needs_fusion_bench
def test_simple_average_task_arithmetic_and_ties_equal_hand_merges(tree):
    from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm

    from pool.fusion_bench import OpenCLIPVisionModelPool as FBPool

    base, tasks = states(tree)
    merged = SimpleAverageAlgorithm().run(FBPool(**pool_config(tree)))
    assert_state_equal(merged, hand_average(tasks))
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(FBPool(**pool_config(tree)))
    assert_state_equal(merged, hand_task_arithmetic(base, tasks, 0.3))
    merged = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum").run(
        FBPool(**pool_config(tree)))
    expected = hand_ties(base, tasks, 0.3, 0.2)
    got = merged.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@needs_fusion_bench
def test_the_fusion_bench_cli_runs_on_the_shipped_yaml_and_saves_a_loadable_merge(tree, tmp_path):
    """``fusion_bench method=task_arithmetic modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA_cars_dtd
    modelpool._target_=pool.fusion_bench.OpenCLIPVisionModelPool taskpool=dummy ...``: FusionBench's
    own YAML, only the target and the checkpoint folder overridden."""
    out = tmp_path / "merged.safetensors"
    # the shipped YAML reads <model_dir>/ViT-B-32/{zeroshot.pt,Cars/finetuned.pt,DTD/finetuned.pt,head_*.pt}
    model_dir = tmp_path / "checkpoints"
    model_dir.mkdir()
    (model_dir / "ViT-B-32").symlink_to(tree, target_is_directory=True)
    args = [sys.executable, "-m", "fusion_bench.scripts.cli", "method=task_arithmetic",
            "method.scaling_factor=0.3", "modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA_cars_dtd",
            "modelpool._target_=pool.fusion_bench.OpenCLIPVisionModelPool", f"modelpool.model_dir={model_dir}",
            # the shipped entries say model_name: ViT-B-32; our tree is tiny: infer it from the weights
            "~modelpool.models._pretrained_.model_name", "~modelpool.models.stanford-cars.model_name",
            "~modelpool.models.dtd.model_name", "taskpool=dummy", f"merged_model_save_path={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base, tasks = states(tree)
    expected = hand_task_arithmetic(base, tasks, 0.3)
    # what the CLI saved loads back through every form of the pool, equal to the hand merge
    for entry in (str(out), {"state_dict_path": str(out)}, {"pickle_path": str(out)}):
        assert_state_equal(OpenCLIPVisionModelPool(models={"merged": entry}).load_model("merged"), expected)


@needs_fusion_bench
def test_fusion_bench_evaluation_needs_the_hub():
    pytest.skip("evaluating a merge (taskpool=OpenCLIPVisionModelTaskPool) downloads datasets from the "
                "Hugging Face hub; these tests run offline")


@needs_fusion_bench
def test_from_config_takes_fusion_bench_overrides(tree, tmp_path):
    from pool.fusion_bench import OpenCLIPVisionModelPool as FBPool

    config = tmp_path / "pool.yaml"
    OmegaConf.save(OmegaConf.create({"_target_": "pool.fusion_bench.OpenCLIPVisionModelPool", **pool_config(tree)}),
                   config)
    modelpool = FBPool.from_config(str(config), overrides=["device=cpu", f"models.extra={tree / 'zeroshot.pt'}"])
    assert isinstance(modelpool, FBPool) and modelpool.all_model_names == ["_pretrained_", "cars", "dtd", "extra"]
    assert modelpool.device == "cpu"


# -- FusionBench's own transformers pool on a converted folder (issue 24) ------------------------------------
@needs_fusion_bench
def test_fusion_bench_clip_vision_model_pool_loads_a_converted_folder_and_its_processor(tmp_path):
    """FusionBench's ``CLIPVisionModelPool`` (transformers models) takes a folder ``convert --to hf``
    wrote as a model and as its processor: ``load_processor()`` gives a CLIPProcessor whose tokenizer
    gives open_clip's ids and whose images are the encoder's own transform's, and ``load_model`` gives
    a CLIPVisionModel that, with the folder's projection, computes the encoder's features."""
    import numpy as np
    import open_clip
    from fusion_bench.modelpool import CLIPVisionModelPool
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import CLIPProcessor, CLIPVisionModel

    from pool.convert import convert_to_hf

    src = synth.save_module(synth.make_original_encoder(seed=0), tmp_path / "enc.pt", "zip")
    folder = tmp_path / "hf"
    convert_to_hf(src, folder)
    fb_pool = CLIPVisionModelPool(OmegaConf.create({"_pretrained_": str(folder)}), processor=str(folder))

    processor = fb_pool.load_processor()
    assert isinstance(processor, CLIPProcessor)
    texts = ["a photo of a Boeing 737-800, a type of aircraft.", "itap of a 7."]
    expected = [row[:row.index(49407) + 1] for row in open_clip.tokenize(texts).tolist()]
    assert processor.tokenizer(texts)["input_ids"] == expected

    model = fb_pool.load_model("_pretrained_")
    assert isinstance(model, CLIPVisionModel)
    encoder = ImageEncoder.load(src).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], encoder.val_preprocess(image), atol=1e-6, rtol=0)
    projection = load_file(str(folder / "model.safetensors"))["visual_projection.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values=pixels).pooler_output @ projection.T, encoder(pixels),
                                   atol=1e-5, rtol=0)
