"""Property tests: for random tiny ViTs, every configuration form gives the same encoder and head."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import OpenCLIPVisionModelPool
from pool.arch import VisionArch
from pool.synth import make_original_encoder, make_original_head, save_module, save_state_dict


@st.composite
def tiny_archs(draw, any_heads: bool = True) -> VisionArch:
    width = draw(st.sampled_from([32, 64, 96, 128]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0])) if any_heads else max(1, width // 64)
    patch = draw(st.sampled_from([4, 8]))
    return VisionArch(
        image_size=patch * draw(st.integers(1, 4)), patch_size=patch, width=width,
        layers=draw(st.integers(1, 3)), heads=heads, mlp_ratio=draw(st.sampled_from([2.0, 4.0])),
        embed_dim=draw(st.sampled_from([8, 16, 24])), quick_gelu=draw(st.booleans()),
        text_context_length=draw(st.integers(2, 8)), text_vocab_size=draw(st.integers(8, 32)),
        text_width=draw(st.sampled_from([16, 32])),
    )


SETTINGS = settings(max_examples=examples(8), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _forms(root: Path, original: torch.nn.Module, with_state_dicts: bool) -> dict:
    forms = {}
    for container in ("zip", "legacy", "pickle"):
        path = save_module(original, root / f"{container}.pt", container)
        forms[f"path_{container}"] = str(path)
        forms[f"pickle_path_{container}"] = {"pickle_path": str(path)}
    forms["hydra"] = {"_target_": "pool.ImageEncoder.load", "path": forms["path_zip"]}
    if with_state_dicts:
        quick = {"quick_gelu": bool(original.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU")}
        forms["state_dict"] = {"state_dict_path": str(save_state_dict(original.state_dict(), root / "sd.pt")), **quick}
        forms["safetensors"] = {"state_dict_path": str(save_state_dict(original.state_dict(), root / "sd.safetensors", "safetensors")), **quick}
    return forms


def _check_pool(forms: dict, original: torch.nn.Module, arch: VisionArch, seed: int) -> None:
    pool = OpenCLIPVisionModelPool(models=forms)
    want = original.state_dict()
    images = torch.randn(2, 3, arch.image_size, arch.image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = original(images)
    for name, encoder in pool.named_models():
        got = encoder.state_dict()
        assert list(got) == list(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert encoder.arch.quick_gelu is arch.quick_gelu, name
        with torch.no_grad():
            assert torch.equal(encoder(images), expected), name


@SETTINGS
@given(arch=tiny_archs(any_heads=True), seed=st.integers(0, 2**16))
def test_every_pickle_form_gives_the_same_encoder(arch, seed):
    original = make_original_encoder(arch, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        _check_pool(_forms(Path(tmp), original, with_state_dicts=False), original, arch, seed)


@SETTINGS
@given(arch=tiny_archs(any_heads=False), seed=st.integers(0, 2**16))
def test_state_dict_forms_give_the_same_encoder(arch, seed):
    original = make_original_encoder(arch, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        _check_pool(_forms(Path(tmp), original, with_state_dicts=True), original, arch, seed)


@settings(max_examples=examples(20), deadline=None)
@given(classes=st.integers(1, 20), dim=st.integers(1, 64), normalize=st.booleans(),
       container=st.sampled_from(["zip", "legacy", "pickle"]), seed=st.integers(0, 2**16))
def test_head_logits_equal_the_original(classes, dim, normalize, container, seed):
    head = make_original_head(classes, dim, seed=seed, normalize=normalize)
    features = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_module(head, Path(tmp) / "head.pt", container)
        loaded = OpenCLIPVisionModelPool(models={}, classification_heads={"h": str(path)}).load_classification_head("h")
        assert loaded.normalize is normalize
        with torch.no_grad():
            assert torch.equal(loaded(features), head(features))
