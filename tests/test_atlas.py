"""The task-vector atlas (`pool.atlas`, `openclip-pool atlas`; docs/design.md §7).

The atlas is checked against hand computations that share nothing with it: each model loaded whole
through the pool (`load_model`, not the atlas's mapped key-by-key read), every task vector
flattened in float64 and stacked, then dot products, norms and sign comparisons done directly.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import Atlas, ConfigError, OpenCLIPVisionModelPool, TaskVectorError, atlas, synth
from pool.atlas_blocks import block_order, blocks_of
from pool.atlas_core import CHUNK, AtlasGroup, _add_tensor
from pool.atlas_report import JSON_NAME, SCHEMA, SCHEMA_VERSION, atlas_dict
from pool.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


# -- trees -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> synth.SynthTree:
    """zeroshot (zip) + 4 tasks (zip, legacy, plain pickle, zip) + a state dict and a safetensors copy."""
    return synth.write_tree(tmp_path_factory.mktemp("atlas_tree"))


@pytest.fixture(scope="module")
def tree_pool(tree) -> OpenCLIPVisionModelPool:
    return OpenCLIPVisionModelPool.from_config(tree.config)


@pytest.fixture(scope="module")
def tree_atlas(tree_pool) -> Atlas:
    return atlas(tree_pool)


def finetuned_tree(root: Path, tasks: int = 3, step: float = 1e-3) -> Path:
    """The published layout: zeroshot.pt + <Task>/finetuned.pt, each fine-tuned encoder the zero-shot
    weights moved by a small seeded step (as fine-tuning moves them), in zip, legacy and pickle."""
    zeroshot = synth.make_original_encoder(seed=0)
    synth.save_module(zeroshot, root / "zeroshot.pt", "zip")
    models = {"_pretrained_": str(root / "zeroshot.pt")}
    for i in range(tasks):
        encoder = synth.make_original_encoder(seed=0)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * step)
        name = f"Task{i}"
        synth.save_module(encoder, root / name / "finetuned.pt", ("zip", "legacy", "pickle")[i % 3])
        models[name.lower()] = str(root / name / "finetuned.pt")
    config = root / "pool.yaml"
    config.write_text(json.dumps({"models": models}))
    return config


# -- the hand computation ----------------------------------------------------------------------------
def loaded(pool: OpenCLIPVisionModelPool) -> tuple[dict, list[dict]]:
    """``_pretrained_``'s and every regular model's state dict, each model loaded whole by the pool."""
    return pool.load_pretrained_model().state_dict(), [model.state_dict() for model in pool.models()]


@pytest.fixture(scope="module")
def tree_states(tree_pool) -> tuple[dict, list[dict]]:
    return loaded(tree_pool)


def hand_vectors(states: tuple[dict, list[dict]], keep=lambda key: True, *, float32_diff: bool = False
                 ) -> torch.Tensor:
    """(N, elements) float64: each model's task vector over the keys ``keep`` accepts."""
    base, models = states
    keys = sorted(k for k, v in base.items() if v.is_floating_point() and keep(k))
    rows = []
    for sd in models:
        if float32_diff:  # what FusionBench and the task_vectors code do: subtract, then widen
            rows.append(torch.cat([(sd[k] - base[k]).double().reshape(-1) for k in keys]))
        else:
            rows.append(torch.cat([(sd[k].double() - base[k].double()).reshape(-1) for k in keys]))
    return torch.stack(rows)


def hand_cosine(vectors: torch.Tensor) -> np.ndarray:
    n = len(vectors)
    return np.array([[float(torch.dot(vectors[i], vectors[j]) / (vectors[i].norm() * vectors[j].norm()))
                      for j in range(n)] for i in range(n)])


def hand_conflicts(vectors: torch.Tensor) -> np.ndarray:
    signs = torch.sign(vectors)
    n = len(vectors)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            both = (signs[i] != 0) & (signs[j] != 0)
            out[i, j] = float(((signs[i] * signs[j]) < 0).sum()) / float(both.sum())
    return out


# -- the numbers -------------------------------------------------------------------------------------
def test_whole_task_vectors_equal_a_hand_float64_computation(tree_pool, tree_states, tree_atlas) -> None:
    result = tree_atlas
    vectors = hand_vectors(tree_states)
    whole = result.groups["all"]
    assert result.models == tree_pool.model_names
    assert whole.elements == vectors.shape[1]
    np.testing.assert_allclose(whole.cosine, hand_cosine(vectors), rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole.norm, vectors.norm(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(whole.sign_conflict, hand_conflicts(vectors))


@pytest.mark.parametrize(("block", "pattern"), [
    ("attention", r"\.attn\."), ("mlp", r"\.mlp\."), ("layer.1", r"resblocks\.1\."),
    ("layer.0.mlp", r"resblocks\.0\.mlp\."), ("embeddings", r"^visual\.(conv1|class_embedding|positional_embedding|ln_pre)"),
    ("output", r"^visual\.(ln_post|proj$)"),
])
def test_each_block_equals_the_hand_computation_over_its_keys(tree_states, tree_atlas, block, pattern) -> None:
    result = tree_atlas
    vectors = hand_vectors(tree_states, lambda key: re.search(pattern, key.removeprefix("model.")) is not None)
    group = result.groups[block]
    assert group.elements == vectors.shape[1] > 0
    np.testing.assert_allclose(group.cosine, hand_cosine(vectors), rtol=0, atol=1e-12)
    np.testing.assert_allclose(group.norm, vectors.norm(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(group.sign_conflict, hand_conflicts(vectors))


def test_norms_per_layer_add_up_to_the_whole_norm_with_the_other_blocks(tree_atlas) -> None:
    result = tree_atlas
    layers = result.norms_by_layer()
    assert layers.shape == (result.layers, len(result.models)) and result.layers == synth.TINY.layers
    kinds = ["embeddings", "output", "text"]
    squares = (layers ** 2).sum(axis=0) + sum(result.groups[k].norm ** 2 for k in kinds)
    np.testing.assert_allclose(np.sqrt(squares), result.groups["all"].norm, rtol=1e-12)


def test_a_fine_tuned_tree_matches_the_float32_subtraction_other_tools_do(tmp_path) -> None:
    # fine-tuned weights sit close to the zero-shot ones, so float32 subtraction is exact (Sterbenz)
    # and the atlas's float64 differences agree with FusionBench's definition far below 1e-10
    pool = OpenCLIPVisionModelPool.from_config(finetuned_tree(tmp_path))
    result = atlas(pool)
    np.testing.assert_allclose(result.groups["all"].cosine, hand_cosine(hand_vectors(loaded(pool), float32_diff=True)),
                               rtol=0, atol=1e-10)


def test_every_checkpoint_is_read_mapped(tree_pool, monkeypatch) -> None:
    seen = []
    original = OpenCLIPVisionModelPool.read_entry

    def spy(self, entry, **kwargs):
        seen.append((entry.name, kwargs.get("mmap")))
        return original(self, entry, **kwargs)

    monkeypatch.setattr(OpenCLIPVisionModelPool, "read_entry", spy)
    atlas(tree_pool)
    assert sorted(seen) == sorted((name, True) for name in tree_pool.all_model_names)


def test_only_unmappable_files_are_named_as_held_in_memory(tree, tmp_path, caplog) -> None:
    from pool.hf_export import convert_to_hf

    convert_to_hf(tree.files["cars"], tmp_path / "cars-hf")  # safetensors inside: mapped
    caplog.set_level("WARNING", logger="pool.atlas")
    atlas(OpenCLIPVisionModelPool(models={"_pretrained_": str(tree.files["_pretrained_"]),
                                          "hf": str(tmp_path / "cars-hf"), "dtd": str(tree.files["dtd"])}))
    held = [r.getMessage() for r in caplog.records if "cannot be mapped" in r.getMessage()]
    assert len(held) == 1 and "models.dtd" in held[0], held  # DTD is a legacy file


def test_module_and_transformers_folder_entries_give_the_same_atlas(tree, tmp_path) -> None:
    from pool.hf_export import convert_to_hf

    convert_to_hf(tree.files["dtd"], tmp_path / "dtd-hf")
    mixed = OpenCLIPVisionModelPool(models={
        "_pretrained_": str(tree.files["_pretrained_"]),
        "cars": synth.make_original_encoder(seed=1),  # what write_tree saved for Cars, as a module instance
        "dtd": str(tmp_path / "dtd-hf")})
    files = OpenCLIPVisionModelPool(models={"_pretrained_": str(tree.files["_pretrained_"]),
                                            "cars": str(tree.files["cars"]), "dtd": str(tree.files["dtd"])})
    a, b = atlas(mixed), atlas(files)
    # the transformers folder has no text-side leftovers: compare over the image tower
    for block in ("attention", "mlp", "embeddings", "output", "layer.0"):
        np.testing.assert_allclose(a.groups[block].gram, b.groups[block].gram, rtol=1e-12, atol=1e-12)


def test_a_vision_only_transformers_model_is_compared_without_the_projection(tree, tmp_path) -> None:
    # FusionBench's CLIP pools hold CLIPVisionModel folders (tanganke/...): no visual_projection
    from safetensors.torch import load_file, save_file

    from pool.hf_export import convert_to_hf

    folder = tmp_path / "dtd-vision-only"
    convert_to_hf(tree.files["dtd"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPVisionModel"]}))
    files = {"_pretrained_": str(tree.files["_pretrained_"]), "cars": str(tree.files["cars"])}
    result = atlas(OpenCLIPVisionModelPool(models={**files, "dtd": str(folder)}))
    reference = atlas(OpenCLIPVisionModelPool(models={**files, "dtd": str(tree.files["dtd"])}))
    assert result.groups["output"].elements == reference.groups["output"].elements - synth.TINY.width * synth.TINY.embed_dim
    for block in ("attention", "mlp", "embeddings", "layer.1"):
        np.testing.assert_allclose(result.groups[block].gram, reference.groups[block].gram, rtol=1e-12, atol=1e-12)


@settings(max_examples=examples(40), deadline=None)
@given(n=st.integers(1, 4), numel=st.integers(1, 300), chunk=st.integers(1, 64),
       zeros=st.floats(0.0, 0.9),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       scale=st.sampled_from([1.0, 1e-4, 1e-200]), seed=st.integers(0, 2**16))
def test_column_blocks_of_any_size_give_the_same_sums(n, numel, chunk, zeros, dtype, scale, seed) -> None:
    # scale 1e-200: float64 differences far below float32's range must keep their signs
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=generator, dtype=torch.float64) * scale).to(dtype)
    tensors = []
    for _ in range(n):
        delta = torch.randn(numel, generator=generator, dtype=torch.float64) * scale
        delta[torch.rand(numel, generator=generator) < zeros] = 0  # unchanged elements: sign 0
        tensors.append((base.double() + delta).to(dtype))
    groups: dict[str, AtlasGroup] = {}
    _add_tensor(groups, "visual.proj", base, tensors, chunk)
    whole: dict[str, AtlasGroup] = {}
    _add_tensor(whole, "visual.proj", base, tensors, CHUNK)
    vectors = torch.stack([t.double() - base.double() for t in tensors])
    signs = torch.sign(vectors)
    both = (signs != 0).double() @ (signs != 0).double().T
    conflicts = ((signs.unsqueeze(1) * signs.unsqueeze(0)) < 0).sum(-1)
    for got in (groups["all"], whole["all"]):
        np.testing.assert_allclose(got.gram, (vectors @ vectors.T).numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got.both_nonzero, both.numpy().astype(np.int64))
        np.testing.assert_array_equal(got.conflicts, conflicts.numpy())
    assert groups["all"].elements == numel and set(groups) == {"all", "output"}


def test_blocks_of_names_every_part_of_a_vit() -> None:
    assert blocks_of("visual.transformer.resblocks.11.attn.in_proj_weight") == [
        "all", "attention", "layer.11", "layer.11.attention"]
    assert blocks_of("visual.transformer.resblocks.0.ln_2.bias") == ["all", "norm", "layer.0"]
    assert blocks_of("visual.conv1.weight") == ["all", "embeddings"]
    assert blocks_of("visual.positional_embedding") == ["all", "embeddings"]
    assert blocks_of("positional_embedding") == ["all", "text"]  # the text tower's, kept by pickles
    assert blocks_of("visual.attn_pool.query") == ["all", "other"]
    assert block_order(["layer.2.mlp", "layer.2.attention", "text", "all", "layer.2"]) == [
        "all", "text", "layer.2", "layer.2.attention", "layer.2.mlp"]


# -- refusals ----------------------------------------------------------------------------------------
def test_a_pool_without_pretrained_is_refused(tree) -> None:
    pool = OpenCLIPVisionModelPool(models={"cars": str(tree.files["cars"])})
    with pytest.raises(ConfigError, match="_pretrained_"):
        atlas(pool)


def test_a_model_of_another_shape_is_refused_with_its_name(tree, tmp_path) -> None:
    wide = dataclasses.replace(synth.TINY, width=synth.TINY.width * 2)
    other = synth.save_module(synth.make_original_encoder(wide, seed=3), tmp_path / "wide.pt", "zip")
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": str(tree.files["_pretrained_"]), "wide": str(other)})
    with pytest.raises(TaskVectorError, match=r"models\.wide"):
        atlas(pool)


def test_a_chunk_out_of_range_is_refused(tree_pool) -> None:
    for chunk in (0, CHUNK + 1):
        with pytest.raises(ConfigError, match="chunk"):
            atlas(tree_pool, chunk=chunk)


# -- the files ---------------------------------------------------------------------------------------
def test_json_follows_the_schema_and_is_byte_identical_when_rewritten(tree_pool, tmp_path) -> None:
    result = atlas(tree_pool)
    result.write(tmp_path / "a", plots=False)
    atlas(tree_pool).write(tmp_path / "b", plots=False)
    first = (tmp_path / "a" / JSON_NAME).read_bytes()
    assert first == (tmp_path / "b" / JSON_NAME).read_bytes()
    data = json.loads(first)
    assert (data["schema"], data["version"]) == (SCHEMA, SCHEMA_VERSION)
    assert data["models"] == result.models and data["layers"] == result.layers
    assert list(data["blocks"]) == sorted(result.groups)  # keys sorted in the file
    n = len(result.models)
    for name, block in data["blocks"].items():
        for field in ("cosine", "sign_conflict", "gram", "conflicts", "both_nonzero"):
            assert np.array(block[field]).shape == (n, n), (name, field)
        assert len(block["norm"]) == n
        np.testing.assert_array_equal(np.array(block["cosine"], dtype=float), result.groups[name].cosine)


def test_an_unchanged_model_gives_null_not_nan(tree, tmp_path) -> None:
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": str(tree.files["_pretrained_"]),
                                           "same": str(tree.files["_pretrained_"]), "cars": str(tree.files["cars"])})
    data = atlas_dict(atlas(pool))
    whole = data["blocks"]["all"]
    assert whole["norm"][0] == 0.0
    assert whole["cosine"][0][1] is None and whole["sign_conflict"][0][1] is None
    assert math.isclose(whole["cosine"][1][1], 1.0)
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN anywhere


def test_figures_are_pngs_with_labels_a_colour_bar_and_values(tree_atlas, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from pool import atlas_plots

    result = tree_atlas
    written = result.write(tmp_path)
    names = {p.name for p in written}
    assert names == {JSON_NAME, "cosine.png", "sign_conflict.png", "cosine_by_block.png", "norms_by_layer.png",
                     "cosine_by_layer.png"}
    for path in written[1:]:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    drawn = []
    original = atlas_plots._png
    atlas_plots._png = lambda fig: drawn.append(fig) or original(fig)
    try:
        atlas_plots.cosine_png(result)
    finally:
        atlas_plots._png = original
    fig = drawn[0]
    heatmap, colour_bar = fig.axes
    assert [t.get_text() for t in heatmap.get_xticklabels()] == result.models
    assert [t.get_text() for t in heatmap.get_yticklabels()] == result.models
    assert "cosine" in colour_bar.get_ylabel() and "cosine similarity" in heatmap.get_title()
    cells = [t.get_text() for t in heatmap.texts]
    assert len(cells) == len(result.models) ** 2
    assert f"{result.groups['all'].cosine[0, 1]:.2f}" == cells[1]


def test_without_matplotlib_the_json_is_written_and_the_message_says_how_to_get_figures(
        tree_pool, tmp_path, monkeypatch, caplog) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib") or name.endswith("atlas_plots"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "pool.atlas_plots", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    written = atlas(tree_pool).write(tmp_path)
    assert [p.name for p in written] == [JSON_NAME]
    assert "pip install matplotlib" in caplog.text


# -- the command line --------------------------------------------------------------------------------
def test_cli_writes_the_atlas_and_prints_the_matrix(tree, tmp_path, capsys) -> None:
    code = main(["atlas", str(tree.config), "--out", str(tmp_path / "out"), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert data["models"] == ["cars", "dtd", "eurosat", "mnist", "cars_state_dict", "cars_safetensors"]
    assert "atlas of 6 task vectors" in out and "cos dtd" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("dtd "))
    assert f"{data['blocks']['all']['cosine'][1][0]:.3f}" in row


@pytest.mark.parametrize(("argv", "message"), [
    (["atlas", "{config}"], "--out"),
    (["atlas", "{missing}", "--out", "{out}"], "not found"),
    (["atlas", "{nopretrained}", "--out", "{out}"], "_pretrained_"),
    (["atlas", "{config}", "--out", "{file}"], "is a file"),
])
def test_cli_refusals_exit_2_with_the_reason(tree, tmp_path, capsys, argv, message) -> None:
    nopretrained = tmp_path / "nopre.yaml"
    nopretrained.write_text(json.dumps({"models": {"cars": str(tree.files["cars"])}}))
    (tmp_path / "file").write_text("x")
    values = {"config": tree.config, "missing": tmp_path / "missing.yaml", "out": tmp_path / "out",
              "nopretrained": nopretrained, "file": tmp_path / "file"}
    try:
        code = main([a.format(**values) for a in argv])
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_atlas_takes_a_config_path_as_well_as_a_pool(tree, tree_pool) -> None:
    result = atlas(str(tree.config))
    assert isinstance(result, Atlas)
    np.testing.assert_array_equal(result.groups["all"].gram, atlas(tree_pool).groups["all"].gram)
