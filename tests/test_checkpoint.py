"""The reader on every container in the wild: exact keys, bit-equal values, sniffing by content,
mmap, map_location, no `src` import, no torch source-code warnings."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pool import ImageEncoder, synth
from pool.checkpoint import CONTAINERS, Checkpoint, load_state_dict, read_checkpoint, sniff_container
from pool.errors import ConfigError
from pool.synth import save_object
from pool.unpickler import GlobalName

ENCODER_FORMS = ["zip", "legacy", "pickle", "state_dict", "safetensors"]
CONTAINER_OF_FORM = {"state_dict": "zip"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bits, NaNs and signed zeros included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      ordered: bool = True) -> None:
    if ordered:
        assert list(got) == list(expected)
    else:
        assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        have = got[key]
        assert isinstance(have, torch.Tensor), key
        assert have.dtype == want.dtype, key
        assert have.shape == want.shape, key
        assert torch.equal(bits(have), bits(want)), key


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in a memory mapping of `path` (Linux /proc/self/maps)."""
    real = os.path.realpath(path)
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    """One tiny encoder written once per form (writing, legacy above all, is the slow part):
    ``form -> (path, original module)``. Read-only: tests that change a file copy it first."""
    root = tmp_path_factory.mktemp("encoder_files")
    module = synth.make_original_encoder(seed=11)
    files = {}
    for form in ENCODER_FORMS:
        path = root / f"encoder.{form}.pt"
        if form in synth.ENCODER_CONTAINERS:
            synth.save_module(module, path, form)
        else:
            synth.save_state_dict(module.state_dict(), path,
                                  "safetensors" if form == "safetensors" else "torch")
        files[form] = (path, module)
    return files


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("head_files")
    files = {}
    for container in synth.ENCODER_CONTAINERS:
        for normalize in (True, False):
            head = synth.make_original_head(7, synth.TINY.embed_dim, seed=int(normalize),
                                            normalize=normalize)
            files[container, normalize] = (
                synth.save_module(head, root / f"head.{container}.{normalize}.pt", container), head)
    return files


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"),
                                     reason="memory-mapping check reads /proc/self/maps")


# -- every container ------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ENCODER_FORMS)
def test_encoder_reads_exactly_its_own_state_dict(encoder_files, form):
    path, module = encoder_files[form]
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.container == CONTAINER_OF_FORM.get(form, form)
    assert ckpt.container in CONTAINERS
    assert_same_state(ckpt.state_dict, module.state_dict(), ordered=form != "safetensors")
    assert ckpt.state_dict["model.visual.conv1.weight"].dtype == torch.float32
    assert not any(t.requires_grad for t in ckpt.state_dict.values())


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_whole_encoder_module_records(encoder_files, container):
    path, module = encoder_files[container]
    ckpt = read_checkpoint(path)
    assert ckpt.root_type == "src.modeling.ImageEncoder"
    assert ckpt.wrapper is None
    assert ckpt.modules[""].type == "src.modeling.ImageEncoder"
    assert ckpt.attributes["cache_dir"] is None
    # every submodule path the original has is recorded, with the class the file names
    expected_paths = {name for name, _ in module.named_modules()}
    assert expected_paths <= set(ckpt.modules)
    visual = type(module.model.visual)
    assert ckpt.modules["model.visual"].type == f"{visual.__module__}.{visual.__qualname__}"
    names = {str(g) for g in ckpt.globals}
    assert "src.modeling.ImageEncoder" in names
    assert ckpt.unsafe_globals == []
    assert GlobalName("src", "modeling", False) not in ckpt.globals


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickle_every_protocol(tmp_path, protocol):
    """protocol 2 spells bytes as ``_codecs.encode(str, 'latin1')``: the nested storage blobs too."""
    module = synth.make_original_encoder(seed=3)
    path = tmp_path / "finetuned.pt"
    with synth.legacy_modeling_module():
        save_object(module, path, f"pickle{protocol}")
    assert sniff_container(path) == "pickle"
    ckpt = read_checkpoint(path)
    assert ckpt.container == "pickle"
    assert_same_state(ckpt.state_dict, module.state_dict())


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("normalize", [True, False])
def test_head_every_container(head_files, container, normalize):
    path, head = head_files[container, normalize]
    ckpt = read_checkpoint(path)
    assert ckpt.root_type == "src.modeling.ClassificationHead"
    assert ckpt.attributes["normalize"] is normalize
    assert ckpt.attributes["in_features"] == head.in_features
    assert ckpt.attributes["out_features"] == 7
    assert_same_state(ckpt.state_dict, head.state_dict())


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "pickle2"])
def test_wrapped_state_dict_with_module_prefix(tmp_path, container):
    module = synth.make_original_encoder(seed=5)
    inner = {"module." + k: v for k, v in module.state_dict().items()}
    path = save_object({"state_dict": inner, "epoch": 3, "arch": "ViT-B-32"}, tmp_path / "w.ckpt",
                       container)
    ckpt = read_checkpoint(path)
    assert ckpt.wrapper == "state_dict"
    assert_same_state(ckpt.state_dict, inner)
    assert all(k.startswith("module.") for k in ckpt.state_dict)


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_bare_state_dict_every_container(tmp_path, container):
    module = synth.make_original_encoder(seed=6)
    expected = module.state_dict()
    path = save_object(dict(expected), tmp_path / "sd", container)
    ckpt = read_checkpoint(path)
    assert ckpt.wrapper is None
    assert_same_state(ckpt.state_dict, expected)


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "pickle2"])
def test_dtypes_views_and_shared_storage(tmp_path, container):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    expected = {
        "f16": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).half(),
        "bf16": torch.randn(5, generator=torch.Generator().manual_seed(1)).bfloat16(),
        "f64": torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float64),
        "i64": torch.tensor([-(2**62), 0, 2**62]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "base": base,
        "view": base[2:5, 3:7],  # offset and stride into base's storage
        "transposed": base.t(),
    }
    ckpt = read_checkpoint(save_object(expected, tmp_path / "mixed.pt", container))
    assert_same_state(ckpt.state_dict, expected)
    assert ckpt.state_dict["view"].stride() == expected["view"].stride()
    assert ckpt.state_dict["transposed"].stride() == (1, 10)


def test_parameters_come_back_as_plain_detached_tensors(tmp_path):
    param = nn.Parameter(torch.randn(4, 4))
    ckpt = read_checkpoint(save_object({"p": param}, tmp_path / "p.pt", "zip"))
    assert not ckpt.state_dict["p"].requires_grad
    assert torch.equal(ckpt.state_dict["p"], param.detach())


def test_safetensors_metadata(tmp_path):
    import safetensors.torch

    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int32)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "arch": "tiny"})
    ckpt = read_checkpoint(path)
    assert ckpt.container == "safetensors"
    assert ckpt.metadata == {"format": "pt", "arch": "tiny"}
    assert_same_state(ckpt.state_dict, tensors, ordered=False)


@pytest.mark.parametrize("form", ENCODER_FORMS)
def test_load_state_dict_matches_read_checkpoint(encoder_files, form):
    path, module = encoder_files[form]
    sd = load_state_dict(path)
    assert isinstance(sd, dict)
    assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")


# -- persistent buffers only ----------------------------------------------------------------------
class _BufferNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("running", torch.arange(4.0))
        self.register_buffer("scratch", torch.full((5,), 7.0), persistent=False)
        self.register_buffer("absent", None)
        self.register_parameter("no_bias", None)
        self.child = _BufferChild()


class _BufferChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.tensor([1, 2, 3]))
        self.register_buffer("cache", torch.zeros(2, 2), persistent=False)


@contextlib.contextmanager
def as_src_modeling(*classes: type) -> Iterator[None]:
    """Pickle the given classes as ``src.modeling.<Name>``; sys.modules is restored afterwards."""
    saved = {k: sys.modules.get(k) for k in ("src", "src.modeling")}
    old_names = [(c, c.__module__, c.__qualname__) for c in classes]
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    src.modeling = modeling
    for cls in classes:
        name = cls.__name__.lstrip("_")
        cls.__module__, cls.__qualname__ = "src.modeling", name
        setattr(modeling, name, cls)
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    try:
        yield
    finally:
        for cls, mod, qual in old_names:
            cls.__module__, cls.__qualname__ = mod, qual
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "pickle2"])
def test_only_persistent_buffers(tmp_path, container):
    net = _BufferNet()
    expected = net.state_dict()
    assert "scratch" not in expected and "child.cache" not in expected  # what torch itself does
    with as_src_modeling(_BufferNet, _BufferChild):
        path = save_object(net, tmp_path / "net.pt", container)
    ckpt = read_checkpoint(path, allow_globals=["src.modeling.BufferNet", "src.modeling.BufferChild"])
    assert ckpt.root_type == "src.modeling.BufferNet"
    assert_same_state(ckpt.state_dict, expected)
    assert set(ckpt.state_dict) == {"lin.weight", "lin.bias", "running", "child.kept"}
    assert ckpt.modules["child"].type == "src.modeling.BufferChild"
    assert "src" not in sys.modules and "src.modeling" not in sys.modules


def test_non_persistent_buffer_of_an_encoder(tmp_path):
    """An encoder whose visual tower carries a non-persistent buffer: read as state_dict() says."""
    encoder = synth.make_original_encoder(seed=8)
    encoder.model.visual.register_buffer("attn_mask_cache", torch.ones(3, 3), persistent=False)
    encoder.model.visual.register_buffer("stats", torch.arange(3.0), persistent=True)
    expected = encoder.state_dict()
    assert "model.visual.stats" in expected and "model.visual.attn_mask_cache" not in expected
    for container in ("zip", "pickle"):
        path = synth.save_module(encoder, tmp_path / f"enc.{container}", container)
        assert_same_state(read_checkpoint(path).state_dict, expected)


# -- sniffing by content, never by name -----------------------------------------------------------
@pytest.mark.parametrize("form", ENCODER_FORMS)
@pytest.mark.parametrize("name", ["renamed.bin", "renamed.safetensors", "renamed", "renamed.pt",
                                  "renamed.zip", "renamed.pkl"])
def test_sniffed_by_content_not_extension(encoder_files, tmp_path, form, name):
    path, module = encoder_files[form]
    target = tmp_path / "renamed_dir" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, target)
    container = CONTAINER_OF_FORM.get(form, form)
    assert sniff_container(target) == container
    ckpt = read_checkpoint(target)
    assert ckpt.container == container
    assert_same_state(ckpt.state_dict, module.state_dict(), ordered=form != "safetensors")


def test_path_forms(encoder_files, monkeypatch):
    path, module = encoder_files["zip"]
    monkeypatch.chdir(path.parent)
    for form in (str(path), path, path.name, os.fspath(path)):
        assert_same_state(read_checkpoint(form).state_dict, module.state_dict())


# -- mmap and map_location ------------------------------------------------------------------------
@needs_proc_maps
@pytest.mark.parametrize("form", ["zip", "state_dict", "safetensors"])
def test_zip_and_safetensors_are_private_by_default_and_mapped_on_request(encoder_files, form):
    """docs/design.md §3.6: a default read does not depend on the file; mmap=True is the opt-in."""
    path, module = encoder_files[form]
    for mmap in (None, True):
        sd = read_checkpoint(path, mmap=mmap).state_dict
        assert [mapped_from(t, path) for t in sd.values()] == [bool(mmap)] * len(sd), mmap
        assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")


@needs_proc_maps
@pytest.mark.parametrize("form", ["zip", "state_dict", "safetensors"])
def test_mmap_false_copies(encoder_files, tmp_path, form):
    path = tmp_path / "copy.pt"
    shutil.copyfile(encoder_files[form][0], path)
    module = encoder_files[form][1]
    sd = read_checkpoint(path, mmap=False).state_dict
    assert not any(mapped_from(t, path) for t in sd.values())
    assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")
    # the copy stays valid after the file is gone
    path.unlink()
    assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")


@needs_proc_maps
@pytest.mark.parametrize("container", ["legacy", "pickle"])
def test_mmap_request_on_unmappable_containers_still_reads(encoder_files, container):
    path, module = encoder_files[container]
    sd = read_checkpoint(path, mmap=True).state_dict
    assert_same_state(sd, module.state_dict())
    assert not any(mapped_from(t, path) for t in sd.values())


@pytest.mark.parametrize("form", ENCODER_FORMS)
@pytest.mark.parametrize("where", ["cpu", torch.device("cpu")])
def test_map_location_cpu(encoder_files, form, where):
    path, module = encoder_files[form]
    sd = load_state_dict(path, map_location=where)
    assert {t.device.type for t in sd.values()} == {"cpu"}
    assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")


@contextlib.contextmanager
def saved_as_on(location: str, only: Callable[[object], bool] = lambda storage: True) -> Iterator[None]:
    """torch.save records ``location`` (say ``cuda:0``) for the CPU storages ``only`` picks, as a
    checkpoint written on a GPU does: the saved location a dict ``map_location`` maps."""
    def tagger(storage: object) -> str | None:
        return location if getattr(storage, "device", None) == torch.device("cpu") and only(storage) else None

    registry = torch.serialization._package_registry
    before = list(registry)
    torch.serialization.register_package(1, tagger, lambda storage, loc: None)
    try:
        yield
    finally:
        registry[:] = before


def write_form(module: torch.nn.Module, path: Path, form: str) -> Path:
    if form in synth.ENCODER_CONTAINERS:
        return synth.save_module(module, path, form)
    return synth.save_state_dict(module.state_dict(), path, "safetensors" if form == "safetensors" else "torch")


@pytest.mark.parametrize("form", ENCODER_FORMS)
def test_dict_map_location_maps_saved_locations(tmp_path, form):
    """torch.load's dict form: saved location -> device; a location the dict does not name stays
    on the CPU. The meta device stands in for an accelerator (no GPU needed)."""
    module = synth.make_original_encoder(seed=3)
    with saved_as_on("cuda:0"):
        path = write_form(module, tmp_path / f"gpu.{form}", form)
    saved = "cpu" if form == "safetensors" else "cuda:0"  # safetensors records no location
    sd = load_state_dict(path, map_location={saved: "meta"})
    assert {t.device.type for t in sd.values()} == {"meta"}
    assert {k: (t.shape, t.dtype) for k, t in sd.items()} == {k: (t.shape, t.dtype) for k, t in module.state_dict().items()}
    sd = load_state_dict(path, map_location={"cuda:7": "meta"})  # names no saved location: all stay on the CPU
    assert {t.device.type for t in sd.values()} == {"cpu"}
    assert_same_state(sd, module.state_dict(), ordered=form != "safetensors")
    encoder = ImageEncoder.load(path, map_location={saved: torch.device("cpu")})
    assert_same_state(dict(encoder.state_dict()), module.state_dict(), ordered=False)


@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_dict_map_location_places_each_storage_by_its_own_location(tmp_path, form):
    state = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    b_storage = state["b"].untyped_storage().data_ptr()
    with saved_as_on("cuda:1", only=lambda s: s.data_ptr() == b_storage):
        path = tmp_path / f"mixed.{form}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=form == "zip")
    sd = load_state_dict(path, map_location={"cuda:1": "meta", "cpu": "cpu"})
    assert sd["a"].device.type == "cpu" and sd["b"].device.type == "meta"
    assert torch.equal(sd["a"], state["a"])


@pytest.mark.parametrize("bad, message", [
    ({"cuda:0": 3}, "map_location['cuda:0'] 3 is not supported"),
    ({0: "cpu"}, "the key 0 is not a saved location"),
    ({"cpu": "not-a-device"}, "map_location['cpu'] 'not-a-device' is not a device"),
])
def test_a_bad_dict_map_location_is_a_config_error(encoder_files, bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_state_dict(encoder_files["zip"][0], map_location=bad)


# -- no `src` import, no torch warnings -----------------------------------------------------------
@pytest.mark.parametrize("form", ["zip", "legacy", "pickle"])
def test_no_src_module_is_imported(encoder_files, head_files, tmp_path, monkeypatch, form):
    """Even with an importable `src` package on sys.path that would leave a marker file."""
    path, _ = encoder_files[form]
    head_path, _ = head_files[form, True]
    marker = tmp_path / "src_was_imported"
    pkg = tmp_path / "fake_site" / "src"
    pkg.mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'w').close()\nclass ImageEncoder: pass\nclass ClassificationHead: pass\n"
    (pkg / "__init__.py").write_text(payload)
    (pkg / "modeling.py").write_text(payload)
    monkeypatch.syspath_prepend(str(pkg.parent))
    for key in ("src", "src.modeling"):
        monkeypatch.delitem(sys.modules, key, raising=False)
    read_checkpoint(path)
    read_checkpoint(head_path)
    assert "src" not in sys.modules
    assert "src.modeling" not in sys.modules
    assert not marker.exists()


@pytest.mark.parametrize("form", ["legacy", "zip", "pickle"])
def test_no_source_code_warnings(encoder_files, form):
    path, module = encoder_files[form]
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = load_state_dict(path)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "source code" in m.lower()], messages
    assert not [w for w in caught if issubclass(w.category, torch.serialization.SourceChangeWarning)]
    assert not [m for m in messages if "TypedStorage is deprecated" in m], messages
    assert list(warnings.filters) == before  # the reader's filter does not leak
    assert_same_state(sd, module.state_dict())


def test_synth_tree_reads_entirely(synth_tree):
    """Every file of the shared synthesized tree reads; encoders carry the same key set."""
    encoder_keys = None
    for role, path in synth_tree.files.items():
        ckpt = read_checkpoint(path)
        assert ckpt.state_dict, role
        if role.startswith("head_"):
            assert set(ckpt.state_dict) == {"weight", "bias"}
            assert isinstance(ckpt.attributes["normalize"], bool)
        else:
            keys = set(ckpt.state_dict)
            encoder_keys = encoder_keys or keys
            assert keys == encoder_keys, role


@pytest.mark.parametrize("edit", [
    (b"Applies an affine linear transformation", b"Applies an affine LINEAR transformation"),
    (b"class LayerNorm(Module):", b"class LayerNorm(Modul_):"),
])
def test_legacy_file_whose_stored_class_source_differs_from_the_installed_one(tmp_path, edit):
    """Legacy files carry each module class's source from the torch/open_clip that wrote them
    (torch 1.12, open_clip 2.0.2 in the wild); it differs from what is installed. torch's loader
    reacts by reading ``dump_patches`` off the class: the reader must not care."""
    net = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    path = save_object(net, tmp_path / "old_torch.pt", "legacy")
    data = path.read_bytes()
    old, new = edit
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = read_checkpoint(path)
    assert_same_state(ckpt.state_dict, net.state_dict())
    assert ckpt.modules["0"].type == "torch.nn.modules.linear.Linear"
    assert not [w for w in caught if issubclass(w.category, torch.serialization.SourceChangeWarning)]
