"""OpenCLIPVisionModelPool: every configuration form, special names, heads, options and errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from pool import (
    ArchitectureMismatchError,
    ClassificationHead,
    ConfigError,
    ImageEncoder,
    OpenCLIPVisionModelPool,
)
from pool.errors import CheckpointNotFoundError
from pool.synth import TINY, make_original_encoder, save_state_dict

IMAGES = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(0))


def assert_same_encoder(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    """Bit-identical state dict (same keys, same order) and identical features."""
    got, want = loaded.state_dict(), original.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), original(IMAGES))


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_pickle_path_string(write_encoder, container):
    path, original = write_encoder(container)
    pool = OpenCLIPVisionModelPool(models={"task": str(path)})
    encoder = pool.load_model("task")
    assert isinstance(encoder, ImageEncoder)
    assert_same_encoder(encoder, original)


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_model_name_and_pickle_path_without_a_registry_name(write_encoder, container):
    path, original = write_encoder(container)
    pool = OpenCLIPVisionModelPool(models={"task": {"pickle_path": str(path)}})
    assert_same_encoder(pool.load_model("task"), original)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_state_dict_path(write_encoder, fmt):
    path, original = write_encoder(fmt)
    pool = OpenCLIPVisionModelPool(models={"task": {"state_dict_path": str(path)}})
    assert_same_encoder(pool.load_model("task"), original)


def _clip_keys(original):
    return {k.removeprefix("model."): v for k, v in original.state_dict().items()}


@pytest.mark.parametrize(
    "layout",
    ["bare_clip", "wrapped_module_prefix", "full_clip_with_text_transformer"],
)
def test_state_dict_key_layouts_normalise_to_encoder_keys(tmp_path, layout):
    original = make_original_encoder(TINY, seed=3)
    state = _clip_keys(original)
    if layout == "wrapped_module_prefix":
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif layout == "full_clip_with_text_transformer":
        state = dict(state)
        state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * TINY.text_width, TINY.text_width)
        state["transformer.resblocks.0.ln_1.weight"] = torch.ones(TINY.text_width)
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    pool = OpenCLIPVisionModelPool(models={"task": {"state_dict_path": str(path)}})
    assert_same_encoder(pool.load_model("task"), original)


def test_visual_only_state_dict_keeps_exactly_its_keys(tmp_path):
    original = make_original_encoder(TINY, seed=4)
    visual = {k: v for k, v in original.state_dict().items() if k.startswith("model.visual.")}
    path = save_state_dict(visual, tmp_path / "visual.safetensors", "safetensors")
    encoder = OpenCLIPVisionModelPool(models={"v": {"state_dict_path": str(path)}}).load_model("v")
    assert sorted(encoder.state_dict()) == sorted(visual)
    with torch.no_grad():
        assert torch.equal(encoder(IMAGES), original(IMAGES))


def test_hydra_target_and_module_instance(write_encoder):
    path, original = write_encoder("zip")
    instance = ImageEncoder.load(path)
    pool = OpenCLIPVisionModelPool(models={
        "hydra": {"_target_": "pool.ImageEncoder.load", "path": str(path)},
        "instance": instance,
    })
    assert_same_encoder(pool.load_model("hydra"), original)
    assert pool.load_model("instance") is instance


def test_special_names_and_iteration(synth_tree):
    pool = OpenCLIPVisionModelPool.from_config(synth_tree.config)
    assert pool.has_pretrained
    assert "_pretrained_" in pool.all_model_names
    assert "_pretrained_" not in pool.model_names
    assert len(pool) == len(pool.model_names) == len(pool.all_model_names) - 1
    pretrained = pool.load_pretrained_model()
    assert torch.equal(pool.load_pretrained_or_first_model().state_dict()["model.visual.proj"],
                       pretrained.state_dict()["model.visual.proj"])
    names = []
    previous = None
    for name, encoder in pool.named_models():
        if previous is not None:
            gc.collect()
            assert previous() is None, "the pool kept an earlier model alive"
        previous = weakref.ref(encoder)
        names.append(name)
        del encoder
    assert names == pool.model_names
    assert sum(1 for _ in pool.models()) == len(pool)


def test_first_model_when_no_pretrained(write_encoder):
    path, original = write_encoder("zip")
    pool = OpenCLIPVisionModelPool(models={"only": str(path)})
    assert not pool.has_pretrained
    assert_same_encoder(pool.load_pretrained_or_first_model(), original)
    with pytest.raises(ConfigError, match="no _pretrained_"):
        pool.load_pretrained_model()


def test_dtype_and_device_options(write_encoder):
    path, _ = write_encoder("zip")
    pool = OpenCLIPVisionModelPool(models={"a": str(path)}, dtype="bfloat16")
    encoder = pool.load_model("a")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    encoder32 = pool.load_model("a", dtype=torch.float32, map_location="cpu")
    assert {p.dtype for p in encoder32.parameters()} == {torch.float32}
    assert {p.device.type for p in encoder32.parameters()} == {"cpu"}


def test_entry_options_set_dtype(write_encoder, write_head):
    path, _ = write_encoder("zip")
    head_path, _ = write_head("pickle")
    pool = OpenCLIPVisionModelPool(models={"a": {"pickle_path": str(path), "dtype": "float16"}},
                                   classification_heads={"a": {"pickle_path": str(head_path), "dtype": "bf16"}})
    assert {p.dtype for p in pool.load_model("a").parameters()} == {torch.float16}
    assert pool.load_classification_head("a").weight.dtype == torch.bfloat16
    assert pool.load_classification_head("a", dtype="float32").weight.dtype == torch.float32


def test_loaded_encoder_has_no_meta_tensors_and_copies(write_encoder):
    path, original = write_encoder("legacy")
    encoder = ImageEncoder.load(path)
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    clone = copy.deepcopy(encoder)
    assert_same_encoder(clone, original)
    half = clone.to(torch.bfloat16)
    with torch.no_grad():
        assert half(IMAGES.bfloat16()).dtype == torch.bfloat16


def test_quick_gelu_follows_the_pickle_and_explicit_config(tmp_path, write_encoder):
    from dataclasses import replace

    gelu_arch = replace(TINY, quick_gelu=False)
    pickle_path, gelu_original = write_encoder("zip", arch=gelu_arch, name="gelu.pt")
    encoder = OpenCLIPVisionModelPool(models={"g": str(pickle_path)}).load_model("g")
    assert encoder.arch.quick_gelu is False
    assert_same_encoder(encoder, gelu_original)
    # A state dict records no activation: the default is QuickGELU (the OpenAI setting) ...
    sd_path = save_state_dict(gelu_original.state_dict(), tmp_path / "gelu_sd.pt")
    default = OpenCLIPVisionModelPool(models={"g": {"state_dict_path": str(sd_path)}}).load_model("g")
    assert default.arch.quick_gelu is True
    with torch.no_grad():
        assert not torch.allclose(default(IMAGES), gelu_original(IMAGES), atol=1e-4)
    # ... and a config can say otherwise explicitly.
    explicit = OpenCLIPVisionModelPool(
        models={"g": {"state_dict_path": str(sd_path), "quick_gelu": False}}).load_model("g")
    assert_same_encoder(explicit, gelu_original)


def test_heads_in_every_form(write_head, synth_tree):
    zip_path, original = write_head("zip", normalize=True)
    pickle_path, original_plain = write_head("pickle", normalize=False, seed=1)
    instance = ClassificationHead(True, torch.randn(3, TINY.embed_dim))
    pool = OpenCLIPVisionModelPool(
        models={},
        classification_heads={
            "zip": str(zip_path),
            "plain": {"pickle_path": str(pickle_path)},
            "hydra": {"_target_": "pool.ClassificationHead.load", "path": str(zip_path)},
            "instance": instance,
        },
    )
    features = torch.randn(4, TINY.embed_dim)
    for name, want in (("zip", original), ("plain", original_plain), ("hydra", original)):
        head = pool.load_classification_head(name)
        assert isinstance(head, ClassificationHead)
        assert head.normalize is want.normalize
        with torch.no_grad():
            assert torch.equal(head(features), want(features)), name
    assert pool.load_classification_head("instance") is instance
    assert pool.classification_head_names == ["zip", "plain", "hydra", "instance"]


def test_head_that_does_not_fit_its_encoder_is_an_error(write_encoder, write_head):
    enc_path, _ = write_encoder("zip")
    head_path, _ = write_head("zip", embed_dim=TINY.embed_dim + 8)
    pool = OpenCLIPVisionModelPool(models={"t": str(enc_path)}, classification_heads={"t": str(head_path)})
    with pytest.raises(ArchitectureMismatchError, match=r"takes 40-dim features .* produces 32-dim"):
        pool.load_model_and_head("t")


def test_unknown_entry_lists_known_names(synth_tree):
    pool = OpenCLIPVisionModelPool.from_config(synth_tree.config)
    with pytest.raises(ConfigError) as err:
        pool.load_model("sun397")
    assert "sun397" in str(err.value) and "cars" in str(err.value) and "dtd" in str(err.value)
    with pytest.raises(ConfigError, match="classification_heads are: cars"):
        pool.load_classification_head("sun397")


def test_missing_file_names_entry_path_and_neighbours(tmp_path, monkeypatch, write_encoder):
    path, _ = write_encoder("zip", name="finetuned.pt")
    monkeypatch.chdir(tmp_path)
    pool = OpenCLIPVisionModelPool(models={"cars": "finetunde.pt"})
    with pytest.raises(CheckpointNotFoundError) as err:
        pool.load_model("cars")
    message = str(err.value)
    assert "models.cars" in message
    assert str(tmp_path / "finetunde.pt") in message  # the absolute path tried
    assert "finetuned.pt" in message  # what is beside it
    assert isinstance(err.value, FileNotFoundError)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch, write_encoder):
    path, original = write_encoder("zip", name="enc.pt")
    monkeypatch.chdir(tmp_path)
    pool = OpenCLIPVisionModelPool(models={"a": "enc.pt", "b": {"pickle_path": "./enc.pt"}})
    assert_same_encoder(pool.load_model("a"), original)
    assert_same_encoder(pool.load_model("b"), original)


def test_processors_without_loading_weights(synth_tree, monkeypatch):
    pool = OpenCLIPVisionModelPool.from_config(synth_tree.config)

    def refuse(*args, **kwargs):
        raise AssertionError("processors must not build an encoder")

    monkeypatch.setattr(ImageEncoder, "from_state_dict", refuse)
    monkeypatch.setattr("pool.loading.build_clip", refuse)  # every encoder build goes through it
    train, test = pool.train_processor, pool.test_processor
    assert "RandomResizedCrop" in repr(train) and "CenterCrop" in repr(test)
    assert f"size=({TINY.image_size}, {TINY.image_size})" in repr(train)


def test_processors_from_model_name_read_no_file(tmp_path):
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": {"model_name": "ViT-B-16",
                                                            "pickle_path": str(tmp_path / "absent.pt")}})
    assert "size=(224, 224)" in repr(pool.train_processor)


def test_config_interpolation_and_hydra_instantiation(synth_tree, tmp_path):
    from hydra.utils import instantiate

    root = synth_tree.root / "tiny"
    yaml = tmp_path / "pool.yaml"
    yaml.write_text(
        "_target_: pool.OpenCLIPVisionModelPool\n"
        "_recursive_: false\n"
        f"model_dir: {root}\n"
        "models:\n"
        "  _pretrained_: ${..model_dir}/zeroshot.pt\n"
        "  cars: ${model_dir}/Cars/finetuned.pt\n"
        "  dtd:\n"
        "    pickle_path: ${...model_dir}/DTD/finetuned.pt\n"
        "classification_heads:\n"
        "  cars: ${..model_dir}/head_Cars.pt\n"
    )
    from_yaml = OpenCLIPVisionModelPool.from_config(yaml)
    instantiated = instantiate(OmegaConf.load(yaml))
    assert isinstance(instantiated, OpenCLIPVisionModelPool)
    for pool in (from_yaml, instantiated):
        assert pool.model_names == ["cars", "dtd"]
        want = ImageEncoder.load(root / "DTD" / "finetuned.pt").state_dict()
        got = pool.load_model("dtd").state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert pool.load_classification_head("cars").in_features == TINY.embed_dim


def test_bad_config_forms_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot tell how to load"):
        OpenCLIPVisionModelPool(models={"x": {"path": "a.pt"}}).load_model("x")
    with pytest.raises(ConfigError, match="unknown keys"):
        OpenCLIPVisionModelPool(models={"x": {"pickle_path": "a.pt", "colour": 1}}).load_model("x")
    with pytest.raises(ConfigError, match="not found"):
        OpenCLIPVisionModelPool.from_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="is not an open_clip ViT"):
        _ = OpenCLIPVisionModelPool(models={"x": {"model_name": "ViT-Q-99", "pickle_path": "a.pt"}}).train_processor


def test_model_names_follow_the_openai_activation_rules():
    from pool.arch import arch_for_name

    assert arch_for_name("ViT-B-32").quick_gelu is True  # OpenAI weights: QuickGELU
    assert arch_for_name("ViT-B-32-quickgelu").quick_gelu is True
    assert arch_for_name("ViT-B-32__pretrained__openai").quick_gelu is True
    assert arch_for_name("ViT-B-32__pretrained__laion2b_s34b_b79k").quick_gelu is False  # LAION: GELU
    assert arch_for_name("ViT-B-32", quick_gelu=False).quick_gelu is False
    assert arch_for_name("ViT-L-14").shapes() == arch_for_name("ViT-L-14__pretrained__openai").shapes()
    with pytest.raises(ConfigError, match="ViT-B-33"):
        arch_for_name("ViT-B-33__pretrained__openai")


# -- a misspelled section is refused, not silently dropped (issue 11) ------------------------------
@pytest.mark.parametrize("wrong,right", [("classification_head", "classification_heads"), ("modles", "models"),
                                         ("test_dataset", "test_datasets")])
def test_a_misspelled_section_names_the_key_and_the_fix(synth_tree, tmp_path, wrong, right):
    import subprocess
    import sys

    config = OmegaConf.to_container(OmegaConf.load(synth_tree.config))
    config[wrong] = config.pop(right, {"x": "y"})
    path = tmp_path / "misspelled.yaml"
    path.write_text(OmegaConf.to_yaml(config))
    with pytest.raises(ConfigError, match=f"unknown key '{wrong}'; did you mean '{right}'"):
        OpenCLIPVisionModelPool.from_config(path)
    with pytest.raises(ConfigError, match=f"did you mean '{right}'"):
        OpenCLIPVisionModelPool(**{"models": {}, wrong: {}})
    run = subprocess.run([sys.executable, "-m", "pool", "verify", str(path)], capture_output=True, text=True)
    assert run.returncode == 2 and wrong in run.stderr, (run.returncode, run.stderr)


def test_extra_keys_for_interpolation_are_kept(synth_tree):
    config = OmegaConf.to_container(OmegaConf.load(synth_tree.config))
    config["root"] = "somewhere"
    pool = OpenCLIPVisionModelPool.from_config(config)
    assert pool.extra["root"] == "somewhere"


@pytest.mark.parametrize("spelled, quick", [("false", False), ("False", False), ("true", True), ("no", False)])
def test_boolean_options_spelled_as_strings(synth_tree, spelled, quick):
    pool = OpenCLIPVisionModelPool(models={"a": {"pickle_path": str(synth_tree.files["cars"]),
                                                 "quick_gelu": spelled}})
    assert pool.load_model("a").arch.quick_gelu is quick


@pytest.mark.parametrize("entry, message", [
    ({"pickle_path": "x.pt", "quick_gelu": "maybe"}, "quick_gelu: 'maybe' is not true or false"),
    ({"pickle_path": "x.pt", "model_name": 5}, "model_name: 5 is not an open_clip model name"),
])
def test_mistyped_options_are_config_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        OpenCLIPVisionModelPool(models={"a": entry}).load_model("a")


def test_a_config_that_is_no_mapping_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level is a ListConfig"):
        OpenCLIPVisionModelPool.from_config(path)


def test_heads_come_from_the_open_clip_config_the_shapes_match(tmp_path, monkeypatch):
    """ViT-H-14 and larger have heads of width 80 or 88, not 64: a state dict cannot tell, the
    open_clip config of its shapes can (a tiny config of that kind stands in for them here)."""
    from dataclasses import replace

    import open_clip

    from pool import synth
    from pool.arch import names as arch_names

    config = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 320, "head_width": 80, "patch_size": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-h80", config)
    arch_names._registry.cache_clear()
    try:
        spec = replace(synth.TINY, width=320, heads=4, layers=1, patch_size=16, text_width=32)
        state = synth.make_original_encoder(spec, seed=0).state_dict()
        encoder = ImageEncoder.from_state_dict(state)
        assert encoder.model_name == "tiny-h80" and encoder.arch.heads == 4  # not 320 // 64 = 5
    finally:
        arch_names._registry.cache_clear()
