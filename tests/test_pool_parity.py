"""FusionBench ``BaseModelPool`` parity of the core `OpenCLIPVisionModelPool`, with no fusion_bench
installed (issue 10): save_model, config / to_yaml / from_yaml, the model-table helpers, dataset
generators, task vectors, and FusionBench's extra arguments never raising."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pool import (
    ArchitectureMismatchError,
    ClassificationHead,
    ConfigError,
    ImageEncoder,
    OpenCLIPVisionModelPool,
)
from pool.checkpoint import read_checkpoint


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def pool(synth_tree) -> OpenCLIPVisionModelPool:
    return OpenCLIPVisionModelPool.from_config(synth_tree.config)


# -- save_model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, container", [("merged.safetensors", "safetensors"), ("merged.pt", "zip"),
                                              ("merged.bin", "zip"), ("merged", "safetensors")])
def test_save_model_loads_back_through_every_form(pool, tmp_path, name, container):
    encoder = pool.load_model("cars")
    path = tmp_path / name
    assert pool.save_model(encoder, path) == path
    assert read_checkpoint(path).container == container
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left
    for entry in (str(path), {"pickle_path": str(path)}, {"state_dict_path": str(path)}):
        back = OpenCLIPVisionModelPool(models={"m": entry}).load_model("m")
        assert_same_weights(back, encoder)
        assert back.arch == encoder.arch
    # never a pickled module: no global beyond torch's rebuild functions
    assert not [g for g in read_checkpoint(path).globals if "ImageEncoder" in str(g) or "open_clip" in str(g)]


def test_save_model_keeps_the_activation_and_a_heads_flag(pool, tmp_path):
    from dataclasses import replace

    encoder = pool.load_model("cars")
    gelu = ImageEncoder.from_state_dict(encoder.state_dict(), quick_gelu=False)
    assert gelu.arch == replace(encoder.arch, quick_gelu=False)
    pool.save_model(gelu, tmp_path / "gelu.safetensors")
    assert ImageEncoder.load(tmp_path / "gelu.safetensors").arch.quick_gelu is False
    head = ClassificationHead(False, torch.randn(4, 32), torch.randn(4))
    pool.save_model(head, tmp_path / "head.safetensors")
    back = OpenCLIPVisionModelPool(models={}, classification_heads={"h": str(tmp_path / "head.safetensors")})
    loaded = back.load_classification_head("h")
    assert loaded.normalize is False and torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)


def test_save_model_is_atomic_and_names_a_bad_destination(pool, tmp_path, monkeypatch):
    from pool.errors import CorruptCheckpointError

    encoder = pool.load_model("cars")
    target = tmp_path / "merged.safetensors"
    target.write_bytes(b"the previous merge")

    def broken_read(*args, **kwargs):
        raise CorruptCheckpointError("read back failed")

    monkeypatch.setattr("pool.writer._read_back", broken_read)  # the writer's read-back of its file
    with pytest.raises(CorruptCheckpointError):
        pool.save_model(encoder, target)
    assert target.read_bytes() == b"the previous merge" and sorted(os.listdir(tmp_path)) == ["merged.safetensors"]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="is a folder"):
        pool.save_model(encoder, tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        pool.save_model(encoder, tmp_path / "missing" / "m.safetensors")


def test_save_model_ignores_fusion_bench_arguments(pool, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="pool"):
        pool.save_model(pool.load_model("cars"), tmp_path / "m.pt", "positional", save_tokenizer=True)
    assert (tmp_path / "m.pt").is_file() and "ignoring arguments" in caplog.text


# -- config round trips ------------------------------------------------------------------------------------
def test_config_to_yaml_from_yaml_round_trip(synth_tree, tmp_path):
    original = OpenCLIPVisionModelPool.from_config(
        synth_tree.config, test_datasets={"pets": "some/local/folder"}, device="cpu", dtype="float32")
    path = tmp_path / "pool.yaml"
    original.to_yaml(path)
    written = OmegaConf.load(path)
    assert written._target_ == "pool.modelpool.OpenCLIPVisionModelPool"
    back = OpenCLIPVisionModelPool.from_yaml(path)
    assert back.all_model_names == original.all_model_names
    assert back.classification_head_names == original.classification_head_names
    assert back.test_dataset_names == ["pets"] and back.device == "cpu" and back.dtype == "float32"
    assert OmegaConf.to_container(back.config) == OmegaConf.to_container(original.config)
    assert_same_weights(back.load_model("dtd"), original.load_model("dtd"))
    # Hydra instantiates the same config
    from hydra.utils import instantiate

    assert instantiate(OmegaConf.load(path), _recursive_=False).all_model_names == original.all_model_names
    # a FusionBench-style file with the pool under `modelpool:`
    OmegaConf.save(OmegaConf.create({"modelpool": OmegaConf.load(path)}), tmp_path / "program.yaml")
    assert OpenCLIPVisionModelPool.from_yaml(tmp_path / "program.yaml").all_model_names == original.all_model_names


def test_to_yaml_refuses_module_instances(tmp_path, pool):
    pool.add_model("live", pool.load_model("cars"))
    assert pool.has_instance_models
    with pytest.raises(ConfigError, match="models.live"):
        pool.to_yaml(tmp_path / "pool.yaml")
    assert not (tmp_path / "pool.yaml").exists()


def test_from_config_applies_overrides(synth_tree):
    pool = OpenCLIPVisionModelPool.from_config(synth_tree.config, overrides=["device=cpu", "dtype=bfloat16"])
    assert pool.device == "cpu" and pool.dtype == "bfloat16"
    assert pool.load_model("cars").model.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="cannot apply overrides"):
        OpenCLIPVisionModelPool.from_config(synth_tree.config, overrides=["not an override"])


# -- the model table ------------------------------------------------------------------------------------------
def test_model_table_helpers(pool, synth_tree):
    assert pool.get_model_path("cars") == str(synth_tree.files["cars"])
    config = pool.get_model_config("cars_safetensors")
    assert config == {"state_dict_path": str(synth_tree.files["cars_safetensors"])}
    config["state_dict_path"] = "changed"  # a copy: the pool is unchanged
    assert pool.get_model_config("cars_safetensors")["state_dict_path"] != "changed"
    assert OpenCLIPVisionModelPool.is_special_model("_merged_") and not pool.is_special_model("cars")
    assert not pool.has_merged and not pool.has_instance_models
    pool.add_model("_merged_", str(synth_tree.files["dtd"]))
    assert pool.has_merged and "_merged_" not in pool.model_names and "_merged_" in pool.all_model_names
    with pytest.raises(ConfigError, match="already has a model named 'cars'"):
        pool.add_model("cars", str(synth_tree.files["dtd"]))
    with pytest.raises(ConfigError, match="cannot tell how to load"):
        pool.add_model("odd", 42)
    with pytest.raises(ConfigError, match="unknown models entry 'nope'"):
        pool.get_model_config("nope")
    hydra = OpenCLIPVisionModelPool(models={"h": {"_target_": "pool.ImageEncoder.load", "path": "x.pt"}})
    with pytest.raises(ConfigError, match="no checkpoint file"):
        hydra.get_model_path("h")


def test_task_vectors(pool):
    pretrained, vectors = pool.load_pretrained_model_and_task_vectors()
    base = pretrained.state_dict()
    assert len(vectors) == len(pool.model_names)
    cars = pool.load_model("cars").state_dict()
    first = vectors[pool.model_names.index("cars")]
    assert list(first) == list(base)
    assert all(torch.equal(first[k], cars[k] - base[k]) for k in base)


def test_task_vectors_refuse_a_model_of_another_architecture(synth_tree, write_encoder):
    from dataclasses import replace

    from pool import synth

    other, _ = write_encoder("zip", arch=replace(synth.TINY, width=96, heads=2))
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": str(synth_tree.files["_pretrained_"]), "x": str(other)})
    with pytest.raises(ArchitectureMismatchError, match="models.x"):
        pool.load_pretrained_model_and_task_vectors()


def test_fusion_bench_arguments_never_raise(pool, caplog):
    with caplog.at_level(logging.DEBUG, logger="pool"):
        a = pool.load_model("cars", "positional", weights_only=True, torch_dtype="bfloat16")
        h = pool.load_classification_head("cars", weights_only=False)
        p = pool.load_pretrained_model(weights_only=True)
    assert a.model.visual.conv1.weight.dtype == torch.bfloat16  # torch_dtype is dtype
    assert isinstance(h, ClassificationHead) and isinstance(p, ImageEncoder)
    assert caplog.text.count("ignoring arguments") >= 3


# -- datasets ---------------------------------------------------------------------------------------------------
def test_dataset_generators_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "pets" / split / label
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    pool = OpenCLIPVisionModelPool(models={}, train_datasets={"pets": str(tmp_path / "pets")},
                                   test_datasets={"pets": str(tmp_path / "pets"), "again": str(tmp_path / "pets")})
    assert pool.has_train_dataset and pool.has_test_dataset and not pool.has_val_dataset
    assert [len(d) for d in pool.train_datasets()] == [2]
    assert [len(d) for d in pool.test_datasets()] == [2, 2]
    assert list(pool.val_datasets()) == []
    assert len(pool.load_test_dataset("pets", "extra", keep_in_memory=True)) == 2


def test_paths_written_by_save_model_are_plain_files(pool, tmp_path):
    path = pool.save_model(pool.load_model("cars"), tmp_path / "m.safetensors")
    assert isinstance(path, Path) and path.is_file() and path.stat().st_size > 0


def test_save_model_refuses_a_torch_file_that_would_lose_settings(pool, tmp_path):
    from dataclasses import replace

    encoder = pool.load_model("cars")
    gelu = ImageEncoder.from_state_dict(encoder.state_dict(), quick_gelu=False)
    with pytest.raises(ConfigError, match=r"activation \(GELU\).*\.safetensors"):
        pool.save_model(gelu, tmp_path / "gelu.pt")
    head = ClassificationHead(False, torch.randn(4, 32), torch.randn(4))
    with pytest.raises(ConfigError, match="normalize=False"):
        pool.save_model(head, tmp_path / "head.pt")
    assert list(tmp_path.iterdir()) == []
    pool.save_model(encoder, tmp_path / "ok.pt")  # QuickGELU, default heads: nothing lost
    assert ImageEncoder.load(tmp_path / "ok.pt").arch == replace(encoder.arch)


def test_config_tells_hydra_not_to_build_the_entries(tmp_path, synth_tree):
    from hydra.utils import instantiate

    pool = OpenCLIPVisionModelPool(models={"h": {"_target_": "pool.ImageEncoder.load",
                                                 "path": str(synth_tree.files["cars"])}})
    assert pool.config._recursive_ is False
    again = instantiate(pool.config)
    assert not again.has_instance_models and again.get_model_config("h")["_target_"] == "pool.ImageEncoder.load"


def test_hydra_composition_errors_are_config_errors(tmp_path, synth_tree):
    from hydra import initialize_config_dir

    (tmp_path / "modelpool").mkdir()
    OmegaConf.save(OmegaConf.load(synth_tree.config), tmp_path / "modelpool" / "mine.yaml")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        pool = OpenCLIPVisionModelPool.from_config("modelpool/mine", overrides=["device=cpu"])
        assert pool.device == "cpu" and pool.all_model_names == list(OmegaConf.load(synth_tree.config).models.keys())
        with pytest.raises(ConfigError, match="Hydra could not compose"):
            OpenCLIPVisionModelPool.from_config("modelpool/missing")
