"""Golden checkpoints written by the real open_clip 2.0.2 (tests/data/golden, see tests/golden/).

Every pool form must reproduce 2.0.2's features and logits (to 1e-5) and state dicts bit for bit,
for every golden architecture; the committed files must match their manifest.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import sys
from pathlib import Path

import open_clip.model  # noqa: F401  (import before reading: the state most processes are in)
import pytest
import torch
from safetensors.torch import load_file

from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool, read_checkpoint

GOLDEN = Path(__file__).parent / "data" / "golden"
sys.path.insert(0, str(Path(__file__).parent / "golden"))
from manifest import load_manifest, verify_manifest  # noqa: E402

MANIFEST = load_manifest(GOLDEN)
ARCHS = sorted(MANIFEST["archs"])
ATOL = 1e-5
ENCODER_CONTAINERS = ("zip", "legacy", "pickle")

# Legacy files: torch's legacy loader compares each pickled nn.Module class's recorded source with
# the importable class of that name (open_clip.model 2.0.2 vs 3.x differ) and reads `dump_patches`
# off it; that used to raise on the reader's inert records (fixed in pool/unpickler.py). This module
# imports open_clip.model at the top so the legacy cases always run in that state.
ENCODER_PARAMS = list(ENCODER_CONTAINERS)


@functools.cache
def expected(arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / f"expected_{arch}.safetensors"))


def encoder_file(arch: str, container: str) -> Path:
    return GOLDEN / f"enc_{arch}.{container}.pt"


def head_file(arch: str, container: str) -> Path:
    return GOLDEN / f"head_{arch}.{container}.pt"


def meta(arch: str) -> dict:
    return MANIFEST["archs"][arch]


def assert_matches_golden(encoder: torch.nn.Module, arch: str) -> None:
    """State dict bit for bit, keys in the golden order; features to 1e-5 in both modes."""
    exp = expected(arch)
    sd = encoder.state_dict()
    assert list(sd) == meta(arch)["state_dict_keys"]
    for key in meta(arch)["state_dict_keys"]:
        want = exp[f"state_dict.{key}"]
        assert sd[key].dtype == want.dtype and sd[key].shape == want.shape, key
        assert torch.equal(sd[key], want), key
    # 2.0.2 computed the golden features with the modules in the mode they were saved in.
    encoder.train(meta(arch)["training"])
    with torch.no_grad():
        feats = encoder(exp["input"])
    torch.testing.assert_close(feats, exp["features"], atol=ATOL, rtol=0)
    encoder.eval()  # open_clip 3.x runs fused attention kernels in eval mode: still within 1e-5
    with torch.no_grad():
        feats = encoder(exp["input"])
    torch.testing.assert_close(feats, exp["features"], atol=ATOL, rtol=0)


# -- the committed files --------------------------------------------------------------------------
def test_committed_goldens_match_their_manifest():
    problems = verify_manifest(GOLDEN)
    assert not problems, "tests/data/golden disagrees with manifest.json (regenerate with `nox -s golden -- --write`):\n" + "\n".join(problems)


def test_manifest_describes_open_clip_202_goldens():
    assert MANIFEST["open_clip"] == "2.0.2"
    assert set(ARCHS) == {"tiny-vit-quickgelu", "tiny-vit-gelu", "tiny-vit-w128-p4-quickgelu"}
    names = {e["name"] for e in MANIFEST["files"]}
    for arch in ARCHS:
        for c in (*ENCODER_CONTAINERS, "state_dict"):
            assert f"enc_{arch}.{c}.pt" in names
        for c in ("zip", "pickle"):
            assert f"head_{arch}.{c}.pt" in names
        assert f"expected_{arch}.safetensors" in names
        exp = expected(arch)
        assert exp["features"].shape == (MANIFEST["batch"], meta(arch)["embed_dim"])
        assert exp["logits"].shape == (MANIFEST["batch"], meta(arch)["num_classes"])


# -- encoders: every pool form --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", ENCODER_PARAMS)
def test_path_string(arch, container):
    pool = OpenCLIPVisionModelPool(models={"task": str(encoder_file(arch, container))})
    encoder = pool.load_model("task")
    assert isinstance(encoder, ImageEncoder)
    assert_matches_golden(encoder, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", ENCODER_PARAMS)
def test_pickle_path(arch, container):
    pool = OpenCLIPVisionModelPool(models={"task": {"pickle_path": str(encoder_file(arch, container))}})
    assert_matches_golden(pool.load_model("task"), arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_path(arch):
    # A state dict does not record the activation: the entry says it (QuickGELU is the default).
    entry = {"state_dict_path": str(encoder_file(arch, "state_dict"))}
    if not meta(arch)["config"]["quick_gelu"]:
        entry["quick_gelu"] = False
    pool = OpenCLIPVisionModelPool(models={"task": entry})
    assert_matches_golden(pool.load_model("task"), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", ENCODER_PARAMS)
def test_hydra_target(arch, container):
    entry = {"_target_": "pool.ImageEncoder.load", "path": str(encoder_file(arch, container))}
    pool = OpenCLIPVisionModelPool.from_config({"models": {"task": entry}})
    encoder = pool.load_model("task")
    assert isinstance(encoder, ImageEncoder)
    assert_matches_golden(encoder, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_module_instance(arch):
    loaded = ImageEncoder.load(encoder_file(arch, "zip"))
    pool = OpenCLIPVisionModelPool(models={"task": loaded})
    assert pool.load_model("task") is loaded
    assert_matches_golden(loaded, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", [*ENCODER_PARAMS, "state_dict"])
def test_load_state_dict_is_bitwise_golden(arch, container):
    ckpt = read_checkpoint(encoder_file(arch, container))
    exp = expected(arch)
    assert list(ckpt.state_dict) == meta(arch)["state_dict_keys"]
    for key, value in ckpt.state_dict.items():
        assert torch.equal(value, exp[f"state_dict.{key}"]), key


# -- heads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", ["zip", "pickle"])
def test_heads_reproduce_golden_logits(arch, container):
    path = head_file(arch, container)
    ckpt = read_checkpoint(path)
    assert ckpt.root_type == "src.modeling.ClassificationHead"
    assert ckpt.attributes["normalize"] is True  # read from the pickle
    exp = expected(arch)
    pool = OpenCLIPVisionModelPool(
        models={"task": str(encoder_file(arch, "zip"))},
        classification_heads={"task": str(path), "task_pp": {"pickle_path": str(path)}},
    )
    for name in ("task", "task_pp"):
        head = pool.load_classification_head(name)
        assert isinstance(head, ClassificationHead)
        assert head.normalize is True
        assert head.weight.shape == (meta(arch)["num_classes"], meta(arch)["embed_dim"])
        with torch.no_grad():
            logits = head(exp["features"])
        torch.testing.assert_close(logits, exp["logits"], atol=ATOL, rtol=0)
    # encoder and head end to end, from the input image batch
    encoder, head = pool.load_model_and_head("task")
    encoder.train(meta(arch)["training"])
    with torch.no_grad():
        logits = head(encoder(exp["input"]))
    torch.testing.assert_close(logits, exp["logits"], atol=ATOL, rtol=0)


# -- activation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ENCODER_PARAMS)
def test_gelu_golden_loads_as_gelu_and_quickgelu_would_differ(container):
    arch = "tiny-vit-gelu"
    assert meta(arch)["activation_classes"] == ["torch.nn.modules.activation.GELU"]
    path = encoder_file(arch, container)
    encoder = ImageEncoder.load(path)
    assert encoder.arch.quick_gelu is False
    assert not any(type(m).__name__ == "QuickGELU" for m in encoder.modules())
    assert_matches_golden(encoder, arch)

    pool = OpenCLIPVisionModelPool(models={"forced": {"pickle_path": str(path), "quick_gelu": True}})
    forced = pool.load_model("forced")
    assert forced.arch.quick_gelu is True
    exp = expected(arch)
    forced.train(meta(arch)["training"])
    with torch.no_grad():
        diff = (forced(exp["input"]) - exp["features"]).abs().max().item()
    assert diff > 1e-3, f"GELU weights run as QuickGELU differ by only {diff:.3g}"


@pytest.mark.parametrize("arch", ["tiny-vit-quickgelu", "tiny-vit-w128-p4-quickgelu"])
def test_quickgelu_goldens_load_as_quickgelu(arch):
    assert meta(arch)["activation_classes"] == ["open_clip.model.QuickGELU"]
    encoder = ImageEncoder.load(encoder_file(arch, "pickle"))
    assert encoder.arch.quick_gelu is True


# -- what reading the goldens touches --------------------------------------------------------------
class _ImportRecorder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        self.asked.append(fullname)
        return None  # never provides anything: only records the attempt


def _golden_checkpoint_files() -> list[Path]:
    return sorted(p for p in GOLDEN.glob("*.pt"))


@pytest.mark.parametrize("path", _golden_checkpoint_files(), ids=lambda p: p.name)
def test_reading_imports_no_src_module_and_lists_202_globals(path):
    recorder = _ImportRecorder()
    before = {m for m in sys.modules if m == "src" or m.startswith("src.")}
    sys.meta_path.insert(0, recorder)
    try:
        ckpt = read_checkpoint(path, refuse_unsafe=True)
    finally:
        sys.meta_path.remove(recorder)
    after = {m for m in sys.modules if m == "src" or m.startswith("src.")}
    assert after == before
    assert not [m for m in recorder.asked if m == "src" or m.startswith("src.")]
    names = {str(g) for g in ckpt.globals}
    assert not ckpt.unsafe_globals
    entry = next(e for e in MANIFEST["files"] if e["name"] == path.name)
    if path.name.startswith("enc_") and ".state_dict." not in path.name:
        arch = entry["arch"] if "arch" in entry else path.name.split(".")[0].removeprefix("enc_")
        assert "src.modeling.ImageEncoder" in names
        assert "open_clip.model.VisualTransformer" in names  # 2.0.2's class name, not VisionTransformer
        assert "open_clip.model.VisionTransformer" not in names
        assert set(meta(arch)["module_classes"]) <= names
    if path.name.startswith("head_"):
        assert "src.modeling.ClassificationHead" in names
    # The reader lists every global the manifest's own opcode scan found, with two differences:
    # Python 2 names are mapped as pickle maps them (__builtin__.set -> builtins.set), and torch's
    # own Unpickler wrapper resolves torch.<Type>Storage names itself, without asking the reader.
    scanned = {_python3(g) for g in entry.get("pickle_globals", [])}
    scanned = {g for g in scanned if not (g.startswith("torch.") and g.endswith("Storage"))}
    assert scanned <= names


def _python3(dotted: str) -> str:
    import _compat_pickle

    module, _, name = dotted.rpartition(".")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def test_golden_globals_name_the_202_classes_in_a_fresh_process(tmp_path):
    """The same from a fresh process, where open_clip has not been imported."""
    import subprocess

    code = (
        "import sys, json\n"
        "from pool.checkpoint import read_checkpoint\n"
        "out = {}\n"
        f"for p in {[str(p) for p in _golden_checkpoint_files()]!r}:\n"
        "    c = read_checkpoint(p)\n"
        "    out[p] = sorted(str(g) for g in c.globals)\n"
        "assert not [m for m in sys.modules if m == 'src' or m.startswith('src.')]\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    for p, names in found.items():
        if Path(p).name.startswith("enc_") and ".state_dict." not in p:
            assert "open_clip.model.VisualTransformer" in names
            assert "open_clip.model.ResidualAttentionBlock" in names
