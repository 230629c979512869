"""pool.keys owns key layouts: DDP prefixes, encoder-or-head classification, layout descriptions.
Every module that needs one of these asks pool.keys (issue 11: they had drifted apart)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pool import ImageEncoder, synth
from pool.arch import default_quick_gelu, recorded_quick_gelu
from pool.checkpoint import read_checkpoint
from pool.convert import convert_file
from pool.inspection import inspect_file
from pool.keys import checkpoint_kind, describe_layout, strip_ddp, to_clip_keys

W = torch.zeros(3, 4)


@pytest.mark.parametrize("sd, kind", [
    ({"weight": W, "bias": torch.zeros(3)}, "head"),
    ({"module.weight": W, "module.bias": torch.zeros(3)}, "head"),
    ({"weight": W}, "head"),
    ({"weight": torch.zeros(3)}, "unknown"),
    ({"weight": W, "other": W}, "unknown"),
    ({"model.visual.conv1.weight": W}, "encoder"),
    ({"module.visual.conv1.weight": W}, "encoder"),
    ({"visual.conv1.weight": W, "transformer.resblocks.0.attn.in_proj_weight": W}, "encoder"),
    ({}, "unknown"),
])
def test_checkpoint_kind(sd, kind):
    assert checkpoint_kind(sd) == kind


def test_ddp_prefix_is_stripped_only_when_every_key_has_it():
    assert strip_ddp({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert strip_ddp({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
    assert list(to_clip_keys({"module.model.visual.proj": W})) == ["visual.proj"]
    assert list(to_clip_keys({"module.model.visual.proj": W, "x": W})) == ["module.model.visual.proj", "x"]


@pytest.mark.parametrize("keys, wrapper, text", [
    (["model.visual.proj"], None, "model.visual.* (task_vectors ImageEncoder)"),
    (["module.visual.proj"], "state_dict", 'visual.* (open_clip CLIP), module. prefix (DDP), wrapped in {"state_dict": ...}'),
    (["weight", "bias"], None, "weight, bias"),
    (["a", "b", "c", "d"], None, "a, b, c ..."),
])
def test_describe_layout(keys, wrapper, text):
    assert describe_layout(keys, wrapper) == text


def test_ddp_prefixed_head_is_one_kind_everywhere(tmp_path):
    """inspect, convert and ClassificationHead agree on a DDP-prefixed head file."""
    path = tmp_path / "head.pt"
    torch.save({"module.weight": torch.randn(3, 8), "module.bias": torch.randn(3)}, path)
    info = inspect_file(path, "0" * 64)
    assert info.kind == "head" and info.architecture["classes"] == 3
    res = convert_file(path, tmp_path / "head.safetensors")
    assert res.kind == "head" and res.classes == 3


def test_the_activation_recorded_by_convert_is_what_a_load_uses(tmp_path):
    gelu = synth.make_original_encoder(replace(synth.TINY, quick_gelu=False), seed=0)
    src = tmp_path / "gelu.pt"
    synth.save_module(gelu, src, "zip")
    dst = tmp_path / "gelu.safetensors"
    res = convert_file(src, dst)
    assert res.quick_gelu is False
    assert recorded_quick_gelu(read_checkpoint(dst).metadata) is False
    assert default_quick_gelu(None) is True  # without the record, a custom ViT would load as QuickGELU
    assert ImageEncoder.load(dst).arch.quick_gelu is False
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ImageEncoder.load(dst)(images), ImageEncoder.load(src)(images))


def test_default_quick_gelu_follows_the_openai_rule():
    assert default_quick_gelu("ViT-B-32") is True
    assert default_quick_gelu("ViT-B-32__pretrained__laion2b_s34b_b79k") is False
    assert recorded_quick_gelu({}) is None and recorded_quick_gelu({"pool.quick_gelu": "true"}) is True
