"""Dataset entries: local directories (imagefolder and save_to_disk), Hydra configs, offline hub names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pool import ConfigError, DatasetError, OpenCLIPVisionModelPool


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture()
def imagefolder(tmp_path):
    """train/{cat,dog} with 3 images each, test/{cat,dog} with 1 each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for split, count in (("train", 3), ("test", 1)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def saved_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:3], "label": [0, 1, 0]}),
        "validation": datasets.Dataset.from_dict({"image": images[3:4], "label": [1]}),
        "test": datasets.Dataset.from_dict({"image": images[4:], "label": [0]}),
    })
    path = tmp_path / "saved"
    dd.save_to_disk(str(path))
    return path


def test_string_entries_load_local_directories_by_split(imagefolder, saved_dataset):
    pool = OpenCLIPVisionModelPool(
        models={},
        train_datasets={"pets": str(imagefolder), "saved": str(saved_dataset)},
        val_datasets={"saved": str(saved_dataset)},
        test_datasets={"pets": str(imagefolder), "saved": str(saved_dataset)},
    )
    assert pool.train_dataset_names == ["pets", "saved"]
    assert pool.val_dataset_names == ["saved"]
    train = pool.load_train_dataset("pets")
    assert len(train) == 6 and sorted(set(train["label"])) == [0, 1]
    assert len(pool.load_test_dataset("pets")) == 2
    assert pool.load_train_dataset("saved")["label"] == [0, 1, 0]
    assert pool.load_val_dataset("saved")["label"] == [1]
    assert len(pool.load_test_dataset("saved")) == 1


def test_hydra_dataset_config(saved_dataset):
    pool = OpenCLIPVisionModelPool(
        models={},
        test_datasets={"saved": {"_target_": "datasets.load_from_disk", "dataset_path": str(saved_dataset)}},
    )
    loaded = pool.load_test_dataset("saved")
    assert set(loaded) == {"train", "validation", "test"}


def test_hub_name_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pool = OpenCLIPVisionModelPool(models={}, test_datasets={"sun397": "tanganke/sun397"})
    with pytest.raises(DatasetError) as err:
        pool.load_test_dataset("sun397")
    message = str(err.value)
    assert "test_datasets.sun397" in message
    assert "tanganke/sun397" in message and "hub" in message and "could not be reached" in message
    assert "save_to_disk" in message


def test_unknown_dataset_lists_known(imagefolder):
    pool = OpenCLIPVisionModelPool(models={}, train_datasets={"pets": str(imagefolder)})
    with pytest.raises(ConfigError, match="train_datasets are: pets"):
        pool.load_train_dataset("cars")
