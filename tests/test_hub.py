"""Hugging Face hub ids as pool entries (issue 24): ``org/name``, ``hf://org/name[@revision]`` in
every file form, resolved from the local Hugging Face cache only, never the network.

The cache is built here exactly as huggingface_hub lays one out (``models--org--name/blobs/<sha>``,
``refs/<branch>`` holding the commit, ``snapshots/<commit>/<file>`` links into ``../../blobs``) from
transformers folders pool writes itself, and checked against huggingface_hub's own `scan_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import scan_cache_dir, snapshot_download
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pool import (
    ArchitectureMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    ImageEncoder,
    OpenCLIPVisionModelPool,
    synth,
)
from pool.cli import main
from pool.entries import resolve_entry
from pool.hf_export import write_hf_folder
from pool.hub import hub_cache_dir, parse_hub_id
from pool.lock import LOCK_NAME
from pool.pytest_verify import PoolEntryItem  # noqa: F401 - imported before the in-process pytester run

pytest_plugins = ["pytester"]

BASE, SUN, CARS = "openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_sun397", "tanganke/clip-vit-base-patch32_cars"


def commit_of(seed: int) -> str:
    return hashlib.sha1(f"commit {seed}".encode()).hexdigest()


def hf_folder(tmp: Path, seed: int) -> Path:
    """A transformers CLIPVisionModelWithProjection folder written by pool from a tiny encoder."""
    src = synth.save_module(synth.make_original_encoder(seed=seed), tmp / f"enc{seed}.pt", "zip")
    return write_hf_folder(ImageEncoder.load(src), tmp / f"hf{seed}")


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``folder`` out in ``cache`` as huggingface_hub does; return the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", repo / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()  # LFS blobs are named by their sha256
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An HF cache holding BASE (seed 0), SUN (seed 1) and CARS (seed 2; branch v2 = seed 3)."""
    root = tmp_path / "hub-cache"
    made = tmp_path / "made"
    made.mkdir()
    add_to_cache(root, BASE, hf_folder(made, 0), commit_of(0))
    add_to_cache(root, SUN, hf_folder(made, 1), commit_of(1))
    add_to_cache(root, CARS, hf_folder(made, 2), commit_of(2))
    add_to_cache(root, CARS, hf_folder(made, 3), commit_of(3), refs=("v2",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # bare ids are tried as local paths first: none here
    return root


@pytest.fixture()
def no_network(monkeypatch) -> list[str]:
    """Every attempt to resolve a name or connect is recorded and refused; HF_HUB_OFFLINE is unset, so
    only pool's own ``local_files_only`` keeps huggingface_hub off the network."""
    attempts: list[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            attempts.append(f"{what}{args[1:2] or args[:1]}")
            raise OSError(f"network disabled by the test ({what})")
        return call

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # read at import (conftest sets the variable)
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# -- the cache layout is huggingface_hub's ---------------------------------------------------------------------------
def test_the_fake_cache_is_a_valid_huggingface_hub_cache(cache):
    info = scan_cache_dir(cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {BASE, SUN, CARS} and all(r.repo_type == "model" for r in repos.values())
    cars = {r.commit_hash: r.refs for r in repos[CARS].revisions}
    assert cars == {commit_of(2): frozenset({"main"}), commit_of(3): frozenset({"v2"})}
    snapshot = next(iter(repos[BASE].revisions)).snapshot_path
    assert (snapshot / "model.safetensors").is_symlink() and (snapshot / "config.json").is_symlink()
    assert os.readlink(snapshot / "model.safetensors").startswith(os.path.join("..", "..", "blobs"))


def test_the_network_guard_sees_huggingface_hub_try_the_network(cache, no_network):
    """The guard works: without ``local_files_only`` the same lookup goes for the network first."""
    try:
        snapshot_download(BASE, cache_dir=cache)
    except Exception:  # noqa: BLE001 - whatever it makes of the refused connection, it tried
        pass
    assert no_network


# -- what an id is ------------------------------------------------------------------------------------------------
def test_what_is_a_hub_id():
    assert parse_hub_id(f"hf://{BASE}").repo_id == BASE
    assert parse_hub_id(f"hf://{BASE}@v2").revision == "v2"
    assert not parse_hub_id(BASE).explicit
    for path in ("ViT-B-32/zeroshot.pt", "Cars/finetuned.safetensors", "zeroshot.pt", "/abs/olute", "a/b/c",
                 "./org/name", "~/org/name", "org/name@main"):
        assert parse_hub_id(path) is None, path
    for bad in ("hf://", "hf://name-only", "hf://a/b/c", f"hf://{BASE}@", "hf://a--b/c"):
        with pytest.raises(ConfigError, match="no hub id"):
            resolve_entry("x", bad)


def test_the_cache_folder_is_read_from_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache_dir() == tmp_path / "home" / "hub"


# -- loading -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["bare", "hf", "pickle_path", "state_dict_path"])
def test_a_hub_id_loads_bit_equal_to_its_snapshot_folder_in_every_form(cache, no_network, form):
    entry = {"bare": BASE, "hf": f"hf://{BASE}", "pickle_path": {"pickle_path": f"hf://{BASE}"},
             "state_dict_path": {"state_dict_path": BASE}}[form]
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": entry})
    snapshot = cache / "models--openai--clip-vit-base-patch32" / "snapshots" / commit_of(0)
    assert pool.entry("_pretrained_").path.resolve() == snapshot.resolve()
    same_state(pool.load_model("_pretrained_"), ImageEncoder.load(snapshot))
    same_state(pool.load_model("_pretrained_"), ImageEncoder.load(cache.parent / "made" / "hf0"))
    assert no_network == []


def test_an_open_clip_repo_reads_its_open_clip_weights_file(cache, no_network, tmp_path):
    # laion/ and timm/ repos: open_clip_config.json + open_clip_model.safetensors (CLIP keys, text tower
    # included); a timm repo's own config.json and model.safetensors beside them are not transformers'
    encoder = synth.make_original_encoder(seed=5)
    made = tmp_path / "openclip-repo"
    made.mkdir()
    save_file({k.removeprefix("model."): v.contiguous() for k, v in encoder.state_dict().items()},
              str(made / "open_clip_model.safetensors"))
    (made / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 32}}))
    (made / "config.json").write_text(json.dumps({"architecture": "vit_base_patch32_clip_224"}))  # timm's
    save_file({"head.weight": torch.zeros(2, 2)}, str(made / "model.safetensors"))
    add_to_cache(cache, "timm/tiny-clip", made, commit_of(5))
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": "hf://timm/tiny-clip"})
    assert pool.entry("_pretrained_").path.name == "open_clip_model.safetensors"
    loaded = pool.load_model("_pretrained_").state_dict()
    for key, value in encoder.state_dict().items():
        if key.startswith("model.visual."):
            assert torch.equal(loaded[key], value), key
    assert no_network == []


def test_revisions_branch_and_commit_hash(cache, no_network):
    pool = OpenCLIPVisionModelPool(models={
        "main": f"hf://{CARS}", "v2": f"hf://{CARS}@v2", "by_hash": {"pickle_path": f"hf://{CARS}@{commit_of(3)}"}})
    made = cache.parent / "made"
    same_state(pool.load_model("main"), ImageEncoder.load(made / "hf2"))
    same_state(pool.load_model("v2"), ImageEncoder.load(made / "hf3"))
    same_state(pool.load_model("by_hash"), ImageEncoder.load(made / "hf3"))
    assert pool.entry("v2").hub_source == f"hf://{CARS}@{commit_of(3)}"
    same_state(pool.load_model(f"hf://{CARS}@v2"), ImageEncoder.load(made / "hf3"))  # inline, not a pool name
    assert no_network == []


def test_hf_home_is_used_without_hf_hub_cache(cache, monkeypatch, tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    cache.rename(home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    pool = OpenCLIPVisionModelPool(models={"sun": SUN})
    same_state(pool.load_model("sun"), ImageEncoder.load(tmp_path / "made" / "hf1"))


def test_the_cache_is_looked_up_when_an_entry_is_read_not_when_the_pool_is_made(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    pool = OpenCLIPVisionModelPool(models={"sun": f"hf://{SUN}"})  # reads nothing
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    same_state(pool.load_model("sun"), ImageEncoder.load(tmp_path / "made" / "hf1"))


def test_a_local_folder_named_like_an_id_wins_over_the_cache(cache, tmp_path):
    local = tmp_path / "openai" / "clip-vit-base-patch32"
    local.parent.mkdir()
    hf_folder(tmp_path / "made", 5).rename(local)  # other weights than the cached model
    pool = OpenCLIPVisionModelPool(models={"bare": BASE, "hub": f"hf://{BASE}"})
    assert pool.entry("bare").path == Path(BASE) and pool.entry("bare").hub_source is None
    same_state(pool.load_model("bare"), ImageEncoder.load(local))
    same_state(pool.load_model("hub"), ImageEncoder.load(tmp_path / "made" / "hf0"))  # hf:// is always the hub
    with pytest.raises(AssertionError):
        same_state(pool.load_model("bare"), pool.load_model("hub"))


def test_task_vectors_from_hub_entries(cache, no_network, tmp_path):
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": BASE, "sun397": SUN, "cars": f"hf://{CARS}"})
    pretrained, vectors = pool.load_pretrained_model_and_task_vectors()
    made = tmp_path / "made"
    same_state(pretrained, ImageEncoder.load(made / "hf0"))
    base = ImageEncoder.load(made / "hf0").state_dict()
    assert len(vectors) == 2
    for vector, seed in zip(vectors, (1, 2), strict=True):
        tuned = ImageEncoder.load(made / f"hf{seed}").state_dict()
        assert vector.keys() == tuned.keys()
        for key, value in vector.items():
            want = tuned[key] - base[key] if tuned[key].is_floating_point() else tuned[key]
            assert torch.equal(value, want), key
    assert any(v.abs().sum() > 0 for v in vectors[0].values())
    assert no_network == []


def test_get_model_path_and_file_size_of_a_hub_entry(cache):
    pool = OpenCLIPVisionModelPool(models={"sun": SUN, "gone": "hf://org/not-cached"})
    folder = Path(pool.get_model_path("sun"))
    assert folder.name == commit_of(1) and (folder / "config.json").is_file()
    blob = (folder / "model.safetensors").resolve()
    assert pool.entry("sun").file_size == blob.stat().st_size > 0  # the weights, through the link
    assert pool.entry("gone").file_size == 0
    with pytest.raises(CheckpointNotFoundError, match="models.gone.*hf://org/not-cached.*hf download org/not-cached"):
        pool.get_model_path("gone")


# -- what is missing -------------------------------------------------------------------------------------------------
def test_a_missing_model_fails_when_loaded_naming_entry_id_cache_and_fix(cache, no_network):
    pool = OpenCLIPVisionModelPool(models={"_pretrained_": BASE, "dtd": "tanganke/clip-vit-base-patch32_dtd"})
    assert pool.model_names == ["dtd"]  # made without reading anything
    with pytest.raises(CheckpointNotFoundError) as caught:
        pool.load_model("dtd")
    text = str(caught.value)
    for part in ("models.dtd", "hf://tanganke/clip-vit-base-patch32_dtd", str(cache), "never downloads",
                 "hf download tanganke/clip-vit-base-patch32_dtd", "huggingface-cli download", "HF_HUB_CACHE",
                 "it holds no tanganke/clip-vit-base-patch32_dtd", "Nor is 'tanganke/clip-vit-base-patch32_dtd' a local path"):
        assert part in text, part
    assert isinstance(caught.value, FileNotFoundError)
    assert no_network == []


def test_a_missing_revision_says_which_revisions_the_cache_holds(cache, no_network):
    pool = OpenCLIPVisionModelPool(models={"old": {"state_dict_path": f"hf://{CARS}@v1"}})
    with pytest.raises(CheckpointNotFoundError) as caught:
        pool.load_model("old")
    text = str(caught.value)
    assert "models.old" in text and f"hf://{CARS}@v1" in text and "--revision v1" in text
    assert f"{commit_of(2)[:12]} (main)" in text and f"{commit_of(3)[:12]} (v2)" in text
    assert no_network == []


def test_an_absent_cache_folder_is_said(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache-here"))
    with pytest.raises(CheckpointNotFoundError, match="no-cache-here \\(that folder does not exist\\)"):
        OpenCLIPVisionModelPool(models={"a": f"hf://{BASE}"}).load_model("a")


# -- verify, lock -----------------------------------------------------------------------------------------------------
def write_config(path: Path, models: dict) -> Path:
    OmegaConf.save(OmegaConf.create({"models": models}), path)
    return path


def test_verify_and_lock_a_pool_of_hub_ids(cache, no_network, capsys, tmp_path):
    config = write_config(tmp_path / "pool.yaml", {
        "_pretrained_": BASE, "sun397": f"hf://{SUN}", "cars": {"pickle_path": f"hf://{CARS}@v2"}})
    code = main(["verify", str(config), "--integrity", "--json", "-"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 0 and report["ok"], err
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["sun397"]["container"] == "hf" and entries["sun397"]["integrity"]["checked"]
    assert commit_of(1) in entries["sun397"]["file"]
    assert entries["cars"]["task_vector"]["l2_norm"] > 0

    assert main(["lock", str(config)]) == 0
    capsys.readouterr()
    locked = json.loads((tmp_path / LOCK_NAME).read_text())["entries"]
    assert locked["models.sun397"]["path"] == f"hf://{SUN}@{commit_of(1)}"  # the same on every machine
    assert locked["models._pretrained_"]["path"] == f"hf://{BASE}@{commit_of(0)}"
    blob = (cache / "models--tanganke--clip-vit-base-patch32_sun397" / "snapshots" / commit_of(1)
            / "model.safetensors").resolve()
    assert locked["models.sun397"]["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert main(["verify", str(config), "--locked"]) == 0
    capsys.readouterr()

    # the branch moves to another commit: a drift the lock names
    (cache / "models--tanganke--clip-vit-base-patch32_sun397" / "refs" / "main").write_text(commit_of(9))
    add_to_cache(cache, SUN, tmp_path / "made" / "hf2", commit_of(9))
    code = main(["verify", str(config), "--locked"])
    out, err = capsys.readouterr()
    assert code == 1 and "models.sun397" in out + err and commit_of(9) in out + err
    assert no_network == []


def test_verify_reports_a_missing_hub_model_and_checks_the_rest(cache, capsys, tmp_path):
    config = write_config(tmp_path / "pool.yaml", {"_pretrained_": BASE, "gone": "hf://org/not-cached"})
    code = main(["verify", str(config), "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["_pretrained_"]["ok"] and not entries["gone"]["ok"]
    assert entries["gone"]["error_type"] == "CheckpointNotFoundError"
    assert "hf download org/not-cached" in entries["gone"]["error"]


def test_pytest_items_collect_a_pool_with_a_missing_hub_model(cache, pytester: pytest.Pytester, tmp_path):
    config = write_config(tmp_path / "pool.yaml", {"_pretrained_": BASE, "gone": "hf://org/not-cached"})
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--openclip-pool-verify", str(config),
                                          "--collect-only", "-q", "-m", "pool_container_hf")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    out = result.stdout.str()
    assert "models._pretrained_" in out and "models.gone" not in out  # only the cached one is a folder


# -- a vision-only CLIPVisionModel (tanganke's fine-tuned models) -------------------------------------------------------
def test_a_vision_only_clip_vision_model_is_refused_saying_what_is_missing(cache, tmp_path):
    folder = hf_folder(tmp_path / "made", 7)
    with safe_open(folder / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(folder / "model.safetensors")
    del tensors["visual_projection.weight"]
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPVisionModel"]}))
    add_to_cache(cache, "tanganke/vision-only", folder, commit_of(7))
    pool = OpenCLIPVisionModelPool(models={"tower": "hf://tanganke/vision-only"})
    with pytest.raises(ArchitectureMismatchError) as caught:
        pool.load_model("tower")
    text = str(caught.value)
    assert "models.tower" in text and commit_of(7) in text
    assert "visual_projection.weight" in text and "CLIPVisionModel" in text and "does not invent" in text
    assert pool.read_entry(pool.entry("tower")).state_dict  # its tensors still read
