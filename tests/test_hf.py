"""Hugging Face transformers interop (issue 14): open_clip ViT <-> CLIPVisionModelWithProjection.

Both directions give equal outputs: <= 1e-5 on tiny models, <= 1e-4 at the real ViT-B-32 size;
the open_clip 2.0.2 goldens converted to transformers give 2.0.2's own features. A transformers
folder is a pool entry (path string, {pickle_path | state_dict_path: folder}, with model_name),
task vectors line up whichever format each model came in, and verify accepts a mixed pool. All
offline: random-init configs, no hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pool import (
    ArchitectureMismatchError,
    CorruptCheckpointError,
    ImageEncoder,
    OpenCLIPVisionModelPool,
    synth,
)
from pool.checkpoint import read_checkpoint, sniff_container
from pool.cli import main
from pool.convert import convert_file, convert_to_hf

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra pool[hf]")
if not transformers.utils.is_torch_available():  # this transformers refuses this torch (too old for it)
    pytest.skip(f"transformers {transformers.__version__} does not run with torch {torch.__version__}",
                allow_module_level=True)
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_ARCHS = ("tiny-vit-quickgelu", "tiny-vit-gelu", "tiny-vit-w128-p4-quickgelu")


def hf_config(quick_gelu: bool = True, **overrides) -> CLIPVisionConfig:
    values = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=24, hidden_act="quick_gelu" if quick_gelu else "gelu")
    values.update(overrides)
    return CLIPVisionConfig(**values)


def random_hf(config: CLIPVisionConfig, seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms start at 1/0)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def images(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def embeds(model: CLIPVisionModelWithProjection, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).image_embeds


def features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad():
        return encoder(x)


# -- pool -> transformers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_convert_to_hf_gives_equal_image_embeds(tmp_path, quick_gelu):
    arch = replace(synth.TINY, quick_gelu=quick_gelu)
    src = synth.save_module(synth.make_original_encoder(arch, seed=3), tmp_path / "enc.pt", "legacy")
    res = convert_to_hf(src, tmp_path / "hf")
    assert res.ok and sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
        "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    ours = ImageEncoder.load(src)
    x = images(arch.image_size)
    torch.testing.assert_close(embeds(hf, x), features(ours, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", GOLDEN_ARCHS)
def test_open_clip_2_0_2_goldens_converted_to_hf_give_the_golden_features(tmp_path, arch):
    expected = load_file(str(GOLDEN / f"expected_{arch}.safetensors"))
    convert_to_hf(GOLDEN / f"enc_{arch}.zip.pt", tmp_path / "hf")
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(embeds(hf, expected["input"]), expected["features"], atol=1e-5, rtol=0)


def test_convert_to_hf_refuses_an_existing_folder_and_a_head(tmp_path, write_encoder, write_head):
    src, _ = write_encoder("zip")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    code = main(["convert", str(src), str(tmp_path / "full"), "--to", "hf"])
    assert code == 2 and (tmp_path / "full" / "x").read_text() == "keep"
    head, _ = write_head("zip")
    assert main(["convert", str(head), str(tmp_path / "h"), "--to", "hf"]) == 1


# -- transformers -> pool -----------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_a_transformers_folder_is_a_pool_entry_in_every_form(tmp_path, quick_gelu):
    hf = random_hf(hf_config(quick_gelu), seed=1)
    hf.save_pretrained(tmp_path / "hf")
    x = images(32)
    want = embeds(hf, x)
    folder = str(tmp_path / "hf")
    assert sniff_container(folder) == "hf" and read_checkpoint(folder).container == "hf"
    pool = OpenCLIPVisionModelPool(models={"a": folder, "b": {"pickle_path": folder},
                                           "c": {"state_dict_path": folder, "quick_gelu": quick_gelu}})
    for name in ("a", "b", "c"):
        encoder = pool.load_model(name)
        assert encoder.arch.quick_gelu is quick_gelu and encoder.arch.heads == 2
        torch.testing.assert_close(features(encoder, x), want, atol=1e-5, rtol=0)


def test_a_whole_clip_model_folder_reads_as_its_vision_tower_with_the_pickle_keys(tmp_path, write_encoder):
    config = CLIPConfig(vision_config=hf_config().to_dict(),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, max_position_embeddings=8, vocab_size=100,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    x = images(32)
    with torch.no_grad():  # what get_image_features computes (its return type varies across versions)
        want = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
    encoder = ImageEncoder.load(tmp_path / "clip")
    torch.testing.assert_close(features(encoder, x), want, atol=1e-5, rtol=0)
    # the text-side pieces a pickled ImageEncoder keeps come along: the same key set
    pickled, _ = write_encoder("zip")
    assert set(encoder.state_dict()) == set(ImageEncoder.load(pickled).state_dict())


def test_convert_hf_folder_to_pool_safetensors(tmp_path):
    hf = random_hf(hf_config(False), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    res = convert_file(tmp_path / "hf", tmp_path / "out.safetensors")
    assert res.kind == "encoder" and res.quick_gelu is False
    x = images(32)
    torch.testing.assert_close(features(ImageEncoder.load(tmp_path / "out.safetensors"), x), embeds(hf, x),
                               atol=1e-5, rtol=0)


def test_real_size_vit_b_32_both_ways(tmp_path):
    """Random weights at the real ViT-B-32 size: <= 1e-4 both ways."""
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu")
    hf = random_hf(config, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    x = images(224, n=2)
    want = embeds(hf, x)
    ours = ImageEncoder.load(tmp_path / "hf", model_name="ViT-B-32")
    assert ours.model_name == "ViT-B-32" and ours.arch.quick_gelu
    torch.testing.assert_close(features(ours, x), want, atol=1e-4, rtol=0)
    del hf
    convert_to_hf(tmp_path / "hf", tmp_path / "back")  # and out again: the same tensors
    again = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(embeds(again, x), want, atol=1e-4, rtol=0)


# -- task vectors and verify across formats -----------------------------------------------------------------------
def test_task_vectors_line_up_whichever_format_each_model_came_in(tmp_path):
    base = synth.save_module(synth.make_original_encoder(seed=0), tmp_path / "zeroshot.pt", "zip")
    tuned = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "tuned.pt", "pickle")
    convert_to_hf(tuned, tmp_path / "tuned_hf")
    convert_to_hf(base, tmp_path / "zeroshot_hf")
    pickles = OpenCLIPVisionModelPool(models={"_pretrained_": str(base), "t": str(tuned)})
    mixed = OpenCLIPVisionModelPool(models={"_pretrained_": str(base), "t": str(tmp_path / "tuned_hf")})
    hf_only = OpenCLIPVisionModelPool(models={"_pretrained_": str(tmp_path / "zeroshot_hf"), "t": str(tmp_path / "tuned_hf")})
    (_, [want]), (_, [got]), (_, [hf_vector]) = (p.load_pretrained_model_and_task_vectors()
                                                  for p in (pickles, mixed, hf_only))
    visual = [k for k in want if k.startswith("model.visual.")]
    assert sorted(got) == sorted(visual) == sorted(hf_vector)
    for key in visual:
        assert torch.equal(got[key], want[key]) and torch.equal(hf_vector[key], want[key]), key


def test_verify_accepts_a_pool_mixing_transformers_folders_and_pickles(tmp_path, capsys):
    base = synth.save_module(synth.make_original_encoder(seed=0), tmp_path / "zeroshot.pt", "zip")
    tuned = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "tuned.pt", "legacy")
    convert_to_hf(tuned, tmp_path / "tuned_hf")
    config = tmp_path / "pool.yaml"
    config.write_text(f"models:\n  _pretrained_: {base}\n  pickled: {tuned}\n  hf: {tmp_path / 'tuned_hf'}\n"
                      f"  hf_named: {{pickle_path: {tmp_path / 'tuned_hf'}}}\n")
    code = main(["verify", str(config), "--integrity", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"]
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["hf"]["container"] == "hf" and entries["hf"]["integrity"]["checked"]
    assert entries["hf"]["task_vector"]["l2_norm"] == pytest.approx(entries["hf_named"]["task_vector"]["l2_norm"])


# -- what is refused -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, error, message", [
    ({"hidden_act": "gelu_new"}, ArchitectureMismatchError, "hidden_act='gelu_new'"),
    ({"layer_norm_eps": 1e-6}, ArchitectureMismatchError, "layer_norm_eps=1e-06"),
])
def test_configs_open_clip_cannot_compute_are_refused(tmp_path, change, error, message):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(error, match=message):
        ImageEncoder.load(tmp_path / "hf")


def test_broken_folders_are_corrupt_checkpoints(tmp_path):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "model-00001-of-00002.safetensors")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CorruptCheckpointError, match="sharded model"):
        read_checkpoint(tmp_path / "hf")


def test_reading_and_writing_folders_needs_no_transformers(tmp_path):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    code = ("import sys; sys.modules['transformers'] = None  # any import of it now fails\n"
            "from pool import ImageEncoder; from pool.convert import convert_to_hf\n"
            f"e = ImageEncoder.load({str(tmp_path / 'hf')!r}); convert_to_hf({str(tmp_path / 'hf')!r}, "
            f"{str(tmp_path / 'out')!r}); print(e.arch.heads)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr


# -- preprocessing -------------------------------------------------------------------------------------------------
def test_clip_image_processor_matches_open_clip_transforms_closely(tmp_path):
    """The written preprocessor_config.json makes CLIPImageProcessor do what the encoder's own
    open_clip eval transform does (resize the short side bicubic, center crop, normalise). The
    remaining difference is resampling arithmetic; README.md reports it (measured here)."""
    arch = replace(synth.TINY, image_size=224, patch_size=32)
    src = synth.save_module(synth.make_original_encoder(arch, seed=0), tmp_path / "enc.pt", "zip")
    convert_to_hf(src, tmp_path / "hf")
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    transform = ImageEncoder.load(src).val_preprocess
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in ((224, 224), (300, 200), (640, 480), (97, 151)):
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        ours = transform(image)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 224, 224)
        worst = max(worst, float((ours - theirs).abs().max()))
    # at most 2 grey levels (0.028 after normalisation) where resizing happens, 0 where it does not:
    # rounding in the resampling, not a different pipeline
    assert worst < 0.04


def test_convert_to_hf_never_writes_into_or_over_its_source(tmp_path):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    for destination in (tmp_path / "hf", tmp_path / "hf" / "inner"):
        assert main(["convert", str(tmp_path / "hf"), str(destination), "--to", "hf", "--force"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_the_weights_file_of_a_written_folder_reads_right_on_its_own(tmp_path):
    arch = replace(synth.TINY, quick_gelu=False, heads=4)
    src = synth.save_module(synth.make_original_encoder(arch, seed=2), tmp_path / "enc.pt", "zip")
    convert_to_hf(src, tmp_path / "hf")
    alone = ImageEncoder.load(tmp_path / "hf" / "model.safetensors")
    assert alone.arch.quick_gelu is False and alone.arch.heads == 4
    x = images(32)
    torch.testing.assert_close(features(alone, x), features(ImageEncoder.load(src), x), atol=0, rtol=0)


@pytest.mark.parametrize("change", [{"architectures": {"a": 1}}, {"architectures": 5}, {"architectures": []}])
def test_odd_architectures_fields_still_read(tmp_path, change):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert read_checkpoint(tmp_path / "hf").root_type == "transformers clip_vision_model"


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (json.dumps({"model_type": "clip_vision_model", "hidden_act": ["gelu"]}), "hidden_act is list"),
])
def test_hostile_configs_are_corrupt_checkpoints(tmp_path, text, message):
    random_hf(hf_config(), seed=0).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(text)
    with pytest.raises(CorruptCheckpointError, match=message):
        read_checkpoint(tmp_path / "hf")
