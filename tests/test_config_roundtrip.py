"""Pool configs read and written back (issue 23, item 10): YAML errors that read as one line,
"did you mean" inside entries, ``config`` keeping FusionBench's ``_usage_`` / ``_version_`` and
null sections, and overrides that land where something reads them (or are refused)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pool import ConfigError, OpenCLIPVisionModelPool
from pool.cli import main


# -- 10a: a YAML error is one readable line, still terminal-safe --------------------------------------
def test_a_yaml_error_names_the_problem_and_its_position_without_escapes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a: [1, 2\n  b: 3\n")
    with pytest.raises(ConfigError) as caught:
        OpenCLIPVisionModelPool.from_config(bad)
    text = str(caught.value)
    assert "\n" not in text and "\\n" not in text, text
    assert "line 3, column 4: expected ',' or ']', but got ':'" in text, text
    assert "(while parsing a flow sequence at line 2, column 6)" in text, text
    assert "<unicode string>" not in text
    assert main(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\\n" not in err and "line 3, column 4" in " ".join(err.split()), err


def test_a_yaml_error_about_a_control_character_stays_terminal_safe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"models:\n  a: \x1b[2Jx\n")
    with pytest.raises(ConfigError) as caught:
        OpenCLIPVisionModelPool.from_config(bad)
    assert "\n" not in str(caught.value) and "line 2" in str(caught.value), str(caught.value)
    assert main(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "line 2" in err, err


# -- 10b: did you mean, inside an entry --------------------------------------------------------------------
@pytest.mark.parametrize("entry, wrong, right", [
    ({"model_nme": "ViT-B-32", "pickle_path": "a.pt"}, "model_nme", "model_name"),
    ({"model_name": "ViT-B-32", "pickle_pth": "a.pt"}, "pickle_pth", "pickle_path"),
    ({"state_dict_pth": "a.pt"}, "state_dict_pth", "state_dict_path"),
    ({"state_dict_path": "a.pt", "normalise": False}, "normalise", "normalize"),
    ({"pickle_path": "a.pt", "quickgelu": True}, "quickgelu", "quick_gelu"),
])
@pytest.mark.parametrize("section", ["models", "classification_heads"])
def test_a_misspelled_entry_key_names_the_key_and_the_fix(tmp_path, entry, wrong, right, section):
    path = tmp_path / "pool.yaml"
    path.write_text(OmegaConf.to_yaml({"models": {}, section: {"cars": entry}}))
    message = f"{section}.cars: unknown key '{wrong}'; did you mean '{right}'?"
    with pytest.raises(ConfigError, match=message) as caught:
        OpenCLIPVisionModelPool.from_config(path)
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigError, match=message):
        OpenCLIPVisionModelPool(**{section: {"cars": entry}})
    if section == "models":
        with pytest.raises(ConfigError, match=f"unknown key '{wrong}'; did you mean '{right}'"):
            OpenCLIPVisionModelPool(models={}).add_model("cars", entry)


def test_entry_keys_that_are_no_near_miss_keep_todays_errors():
    pool = OpenCLIPVisionModelPool(models={"x": {"pickle_path": "a.pt", "colour": 1}, "y": {"path": "a.pt"},
                                           "h": {"_target_": "pool.ImageEncoder.load", "pth": "a.pt"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        pool.load_model("x")
    with pytest.raises(ConfigError, match="cannot tell how to load"):
        pool.load_model("y")


# -- 10c: config writes back _usage_, _version_ and null sections ------------------------------------------
FUSION_BENCH_STYLE = {
    "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
    "_recursive_": False,
    "_usage_": "merge ViT-B-32 fine-tunes",
    "_version_": "0.2.33",
    "model_dir": "/ckpt",
    "models": {"_pretrained_": "${model_dir}/zeroshot.pt", "cars": {"pickle_path": "${model_dir}/cars.pt"}},
    "classification_heads": None,
    "train_datasets": None,
    "test_datasets": {"cars": "some/folder"},
}


def test_config_round_trips_underscore_keys_and_null_sections(tmp_path):
    pool = OpenCLIPVisionModelPool.from_config(FUSION_BENCH_STYLE)
    written = OmegaConf.to_container(pool.config)
    assert written["_usage_"] == "merge ViT-B-32 fine-tunes" and written["_version_"] == "0.2.33"
    assert written["classification_heads"] is None and written["train_datasets"] is None
    assert "val_datasets" not in written  # absent stays absent
    assert written["test_datasets"] == {"cars": "some/folder"}
    assert written["_target_"] == "pool.modelpool.OpenCLIPVisionModelPool" and written["_recursive_"] is False
    expected = {k: v for k, v in FUSION_BENCH_STYLE.items() if k not in ("_target_", "_recursive_", "models")}
    assert {k: v for k, v in written.items() if k in expected} == expected
    # and again, through a config, YAML and Hydra
    again = OpenCLIPVisionModelPool.from_config(pool.config)
    assert OmegaConf.to_container(again.config) == written
    pool.to_yaml(tmp_path / "pool.yaml")
    assert OmegaConf.to_container(OpenCLIPVisionModelPool.from_yaml(tmp_path / "pool.yaml").config) == written
    from hydra.utils import instantiate

    hydra = instantiate(OmegaConf.load(tmp_path / "pool.yaml"), _recursive_=False)
    assert hydra.extra["_usage_"] == "merge ViT-B-32 fine-tunes"


def test_a_null_section_that_gains_entries_writes_them():
    pool = OpenCLIPVisionModelPool.from_config({"models": None, "classification_heads": None})
    assert OmegaConf.to_container(pool.config)["models"] is None
    pool.add_model("cars", "cars.pt")
    assert OmegaConf.to_container(pool.config)["models"] == {"cars": "cars.pt"}


def test_hydra_keys_are_never_kept_as_extra():
    pool = OpenCLIPVisionModelPool(models={}, _target_="x.Y", _convert_="all", _usage_="u")
    assert pool.extra == {"_usage_": "u"}


# -- 10d: overrides land where something reads them ---------------------------------------------------------
def test_an_override_of_a_key_nothing_reads_is_refused_naming_the_keys():
    config = {"model_dir": "/ckpt", "models": {"_pretrained_": "${model_dir}/zeroshot.pt"}}
    with pytest.raises(ConfigError, match=r"'modelpool\.model_dir=/x' sets 'modelpool'.*model_dir, models.*"
                                          r"drop the 'modelpool\.' prefix: 'model_dir=/x'"):
        OpenCLIPVisionModelPool.from_config(config, overrides=["modelpool.model_dir=/x"])
    with pytest.raises(ConfigError, match=r"'modl_dir=/x'.*did you mean 'model_dir'\?.*'\+modl_dir=/x'"):
        OpenCLIPVisionModelPool.from_config(config, overrides=["modl_dir=/x"])
    # what the pool reads, keys the config has, and +key=value all apply
    pool = OpenCLIPVisionModelPool.from_config(config, overrides=["model_dir=/other", "device=cpu", "+note=hi",
                                                                  "models.cars=/c.pt"])
    assert str(pool.entry("_pretrained_").path) == "/other/zeroshot.pt" and pool.device == "cpu"
    assert pool.extra["note"] == "hi" and pool.all_model_names == ["_pretrained_", "cars"]


def test_a_fusion_bench_program_file_takes_modelpool_overrides(tmp_path):
    program = tmp_path / "program.yaml"
    program.write_text(OmegaConf.to_yaml({
        "method": {"name": "task_arithmetic"},
        "modelpool": {"model_dir": "/ckpt", "models": {"_pretrained_": "${..model_dir}/zeroshot.pt"}}}))
    pool = OpenCLIPVisionModelPool.from_config(program, overrides=["modelpool.model_dir=/moved"])
    assert str(pool.entry("_pretrained_").path) == "/moved/zeroshot.pt"
    with pytest.raises(ConfigError, match=r"the pool is under modelpool:, so write 'modelpool\.model_dir=/x'"):
        OpenCLIPVisionModelPool.from_config(program, overrides=["model_dir=/x"])
    assert OpenCLIPVisionModelPool.from_yaml(program).all_model_names == ["_pretrained_"]


def test_a_hydra_config_name_refuses_an_override_nothing_reads(tmp_path):
    from hydra import initialize_config_dir

    (tmp_path / "modelpool").mkdir()
    OmegaConf.save(OmegaConf.create({"model_dir": "/ckpt", "models": {"_pretrained_": "${..model_dir}/z.pt"}}),
                   tmp_path / "modelpool" / "mine.yaml")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        with pytest.raises(ConfigError, match=r"drop the 'modelpool\.' prefix: 'model_dir=/x'"):
            OpenCLIPVisionModelPool.from_config("modelpool/mine", overrides=["modelpool.model_dir=/x"])
        pool = OpenCLIPVisionModelPool.from_config("modelpool/mine", overrides=["model_dir=/x", "device=cpu"])
        assert str(pool.entry("_pretrained_").path) == "/x/z.pt" and pool.device == "cpu"
