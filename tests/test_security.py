"""docs/design.md §3: nothing in a checkpoint ever runs.

Hostile files in every container (torch zip, torch legacy, plain pickle protocols 2 and 4), with
the gadget at the root, inside a module's ``__dict__``, and nested in ``torch.storage._load_from_bytes``
blobs. Each gadget is first shown to be live (running its reduce by hand creates the marker file), so
a test that passes proves the reader refused it, not that the gadget was a dud.
"""

from __future__ import annotations

import copyreg
import functools
import importlib
import io
import os
import pathlib
import pickle
import runpy
import subprocess
import sys
import types
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import SMALL_ARCH, edit_data_pkl, rewrite_zip, zip_records

from pool import synth
from pool.checkpoint import CONTAINERS, load_state_dict, read_checkpoint, sniff_container
from pool.errors import CheckpointError, UnsafeCheckpointError
from pool.synth import save_object
from pool.unpickler import GlobalName, is_unsafe_global

HOSTILE_CONTAINERS = ["zip", "legacy", "pickle2", "pickle4"]


# -- gadget building blocks -----------------------------------------------------------------------
class R:
    """An object that pickles as ``fn(*args)``; fn may itself be an R (a call whose result is called)."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args

    def __call__(self, *args: Any) -> Any:  # pickle insists that a reduce's callable is callable
        raise AssertionError("R objects are only ever pickled")


def evaluate(obj: Any) -> Any:
    """What an unrestricted unpickler would do with an R: call it (test control only)."""
    if isinstance(obj, R):
        result = evaluate(obj.fn)(*[evaluate(a) for a in obj.args])
        if isinstance(result, subprocess.Popen):
            result.wait()
        if isinstance(result, io.IOBase):
            result.close()
        return result
    return obj


def global_name(fn: Any) -> str:
    """The ``module.name`` a pickle of fn names (pickle's own lookup)."""
    name = fn.__qualname__
    return f"{pickle.whichmodule(fn, name)}.{name}"


def save(obj: Any, path: Path, container: str) -> Path:
    return save_object(obj, path, container)


def legacy_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def raw_call(module: str, name: str, args: tuple) -> bytes:
    """Pickle opcodes (protocol 2, no PROTO/STOP) for ``module.name(*args)``, the global spelled
    exactly as given: GLOBAL, the args tuple, REDUCE."""
    arg_ops = pickle.dumps(args, protocol=2)[2:-1]
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n" + arg_ops + b"R"


def write_raw(body: bytes, path: Path, container: str, template_zip: Path) -> Path:
    """Put the pickle ``PROTO 2, body, STOP`` into the given container."""
    pkl = b"\x80\x02" + body + b"."
    if container.startswith("pickle"):
        path.write_bytes(pkl)
    elif container == "legacy":
        magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
        path.write_bytes(magic + pickle.dumps(1001, protocol=2) + sys_info + pkl
                         + pickle.dumps([], protocol=2))
    else:  # a real torch zip with its data.pkl swapped
        path.write_bytes(edit_data_pkl(template_zip.read_bytes(), lambda _: pkl))
    return path


@dataclass
class Env:
    tmp: Path
    marker: Path
    payload_module: str  # importable from sys.path; importing it creates the marker
    payload_file: Path


@pytest.fixture()
def env(tmp_path, monkeypatch) -> Env:
    marker = tmp_path / "MARKER"
    site = tmp_path / "site"
    site.mkdir()
    mod = f"pool_evil_payload_{uuid.uuid4().hex[:8]}"
    payload = site / f"{mod}.py"
    payload.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(site))
    yield Env(tmp_path, marker, mod, payload)
    sys.modules.pop(mod, None)


@pytest.fixture(scope="module")
def template_zip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "t.pt"
    torch.save({"w": torch.zeros(2)}, path)
    return path


# Object gadgets: (id, build(env) -> (gadget object, global the reader must name)).
def _g_os_system(e: Env):
    return R(os.system, (f"touch '{e.marker}'",)), global_name(os.system)


def _g_subprocess_popen(e: Env):
    return R(subprocess.Popen, (["touch", str(e.marker)],)), "subprocess.Popen"


def _g_subprocess_check_output(e: Env):
    return R(subprocess.check_output, (["touch", str(e.marker)],)), "subprocess.check_output"


def _g_exec(e: Env):
    return R(exec, (f"open({str(e.marker)!r}, 'w').close()",)), "builtins.exec"


def _g_eval(e: Env):
    return R(eval, (f"open({str(e.marker)!r}, 'w').close()",)), "builtins.eval"


def _g_getattr(e: Env):  # getattr(Path(marker), "touch")()
    return R(R(getattr, (pathlib.Path(e.marker), "touch")), ()), "builtins.getattr"


def _g_import(e: Env):
    return R(__import__, (e.payload_module,)), "builtins.__import__"


def _g_open(e: Env):
    return R(open, (str(e.marker), "w")), global_name(open)


def _g_runpy(e: Env):
    return R(runpy.run_path, (str(e.payload_file),)), "runpy.run_path"


def _g_import_module(e: Env):
    return R(importlib.import_module, (e.payload_module,)), "importlib.import_module"


def _g_copyreg_reconstructor(e: Env):
    # copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): Popen(["touch", ...])
    return (R(copyreg._reconstructor, (subprocess.Popen, subprocess.Popen, ["touch", str(e.marker)])),
            "subprocess.Popen")


def _g_functools_partial(e: Env):
    return R(functools.partial(os.system, f"touch '{e.marker}'"), ()), "functools.partial"


OBJECT_GADGETS: dict[str, Callable[[Env], tuple[Any, str]]] = {
    "os.system": _g_os_system,
    "subprocess.Popen": _g_subprocess_popen,
    "subprocess.check_output": _g_subprocess_check_output,
    "builtins.exec": _g_exec,
    "builtins.eval": _g_eval,
    "builtins.getattr": _g_getattr,
    "builtins.__import__": _g_import,
    "builtins.open": _g_open,
    "runpy.run_path": _g_runpy,
    "importlib.import_module": _g_import_module,
    "copyreg._reconstructor": _g_copyreg_reconstructor,
    "functools.partial": _g_functools_partial,
}

# Globals spelled exactly as a hand-written pickle spells them: (module, name, args(env), expected).
RAW_GADGETS: dict[str, tuple[str, str, Callable[[Env], tuple], str]] = {
    "os.system": ("os", "system", lambda e: (f"touch '{e.marker}'",), "os.system"),
    "posix.system": ("posix", "system", lambda e: (f"touch '{e.marker}'",), "posix.system"),
    "os.popen": ("os", "popen", lambda e: (f"touch '{e.marker}'",), "os.popen"),
    "subprocess.call": ("subprocess", "call", lambda e: (["touch", str(e.marker)],), "subprocess.call"),
    "py2 __builtin__.eval": ("__builtin__", "eval", lambda e: (f"open({str(e.marker)!r}, 'w').close()",),
                             "builtins.eval"),
    "builtins.exec": ("builtins", "exec", lambda e: (f"open({str(e.marker)!r}, 'w').close()",),
                      "builtins.exec"),
    "builtins.compile": ("builtins", "compile", lambda e: ("1", "f", "eval"), "builtins.compile"),
    "builtins.open": ("builtins", "open", lambda e: (str(e.marker), "w"), "builtins.open"),
    "io.open": ("io", "open", lambda e: (str(e.marker), "w"), "io.open"),
    "builtins.__import__": ("builtins", "__import__", lambda e: (e.payload_module,), "builtins.__import__"),
    "importlib.import_module": ("importlib", "import_module", lambda e: (e.payload_module,),
                                "importlib.import_module"),
    "runpy.run_path": ("runpy", "run_path", lambda e: (str(e.payload_file),), "runpy.run_path"),
    "shutil.copyfile": ("shutil", "copyfile", lambda e: (str(e.payload_file), str(e.marker)),
                        "shutil.copyfile"),
    "pathlib.Path.touch": ("pathlib", "Path.touch", lambda e: (pathlib.Path(e.marker),),
                           "pathlib.Path.touch"),
    "torch.load": ("torch", "load", lambda e: (str(e.payload_file),), "torch.load"),
    "torch.hub.load": ("torch.hub", "load", lambda e: ("x/y", "z"), "torch.hub.load"),
    "torch.jit.load": ("torch.jit", "load", lambda e: (str(e.payload_file),), "torch.jit.load"),
}
LIVE_RAW = {"os.system", "posix.system", "os.popen", "subprocess.call", "builtins.exec", "builtins.open",
            "io.open", "builtins.__import__", "importlib.import_module", "runpy.run_path",
            "shutil.copyfile", "pathlib.Path.touch"}


def resolve(module: str, name: str) -> Any:
    obj: Any = importlib.import_module({"__builtin__": "builtins"}.get(module, module))
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def assert_refused(path: Path, expected: str, marker: Path) -> UnsafeCheckpointError:
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    err = info.value
    assert expected in err.globals, (expected, err.globals)
    assert expected in str(err)
    assert str(path) in str(err)
    assert not marker.exists(), "the gadget ran"
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists(), "the gadget ran"
    return err


# -- the gadgets are live -------------------------------------------------------------------------
@pytest.mark.parametrize("gadget", sorted(OBJECT_GADGETS))
def test_object_gadget_is_live(env, gadget):
    obj, _ = OBJECT_GADGETS[gadget](env)
    evaluate(obj)
    assert env.marker.exists()


@pytest.mark.parametrize("gadget", sorted(LIVE_RAW))
def test_raw_gadget_is_live(env, gadget):
    module, name, args, _ = RAW_GADGETS[gadget]
    result = resolve(module, name)(*args(env))
    if hasattr(result, "close"):
        result.close()
    assert env.marker.exists()


# -- refused in every container, wherever it hides ------------------------------------------------
@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", sorted(OBJECT_GADGETS))
def test_gadget_at_root_is_refused(env, container, gadget):
    obj, expected = OBJECT_GADGETS[gadget](env)
    path = save(obj, env.tmp / "evil.pt", container)
    assert_refused(path, expected, env.marker)


@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", sorted(RAW_GADGETS))
def test_raw_global_is_refused(env, template_zip, container, gadget):
    module, name, args, expected = RAW_GADGETS[gadget]
    path = write_raw(raw_call(module, name, args(env)), env.tmp / "evil.pt", container, template_zip)
    err = assert_refused(path, expected, env.marker)
    assert err.globals[0] == expected  # the first unsafe global the file names; every other one follows


@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", ["os.system", "builtins.eval", "subprocess.Popen", "functools.partial"])
def test_gadget_beside_real_tensors_is_refused(env, container, gadget):
    obj, expected = OBJECT_GADGETS[gadget](env)
    state = {"model.visual.proj": torch.randn(4, 4), "extra": obj, "z": torch.zeros(3)}
    path = save(state, env.tmp / "evil_sd.pt", container)
    assert_refused(path, expected, env.marker)


@pytest.fixture(scope="module")
def small_encoder():
    return synth.make_original_encoder(SMALL_ARCH, seed=1)


@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", ["os.system", "builtins.exec", "subprocess.check_output",
                                    "copyreg._reconstructor", "builtins.getattr"])
@pytest.mark.parametrize("where", ["root", "submodule"])
def test_gadget_in_module_dict_is_refused(env, small_encoder, container, gadget, where):
    obj, expected = OBJECT_GADGETS[gadget](env)
    target = small_encoder if where == "root" else small_encoder.model.visual.transformer
    target.__dict__["evil"] = obj  # a plain attribute, as `encoder.evil = obj` would store it
    try:
        with synth.legacy_modeling_module():
            path = save(small_encoder, env.tmp / "evil_encoder.pt", container)
    finally:
        del target.__dict__["evil"]
    assert_refused(path, expected, env.marker)
    assert "src" not in sys.modules


@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", ["os.system", "builtins.eval", "subprocess.Popen",
                                    "builtins.__import__"])
@pytest.mark.parametrize("depth", [1, 2])
def test_gadget_nested_in_load_from_bytes_blob_is_refused(env, container, gadget, depth):
    obj, expected = OBJECT_GADGETS[gadget](env)
    for _ in range(depth):  # a blob whose legacy pickle holds the gadget (or another blob)
        obj = R(torch.storage._load_from_bytes, (legacy_bytes(obj),))
    path = save({"w": torch.ones(2), "blob": obj}, env.tmp / "evil_blob.pt", container)
    assert_refused(path, expected, env.marker)


def test_gadget_in_a_blob_next_to_a_real_encoder(env, small_encoder):
    """A plain-pickle encoder (its storages are _load_from_bytes blobs) shipped with one more blob
    whose legacy pickle carries the gadget: the nested read applies the same rules."""
    obj, expected = OBJECT_GADGETS["os.system"](env)
    hostile = R(torch.storage._load_from_bytes, (legacy_bytes(obj),))
    path = env.tmp / "spliced.pt"
    with synth.legacy_modeling_module():
        data = pickle.dumps((small_encoder, hostile), protocol=4)
    assert data.count(b"_load_from_bytes") == 1  # memoised global: every storage goes through it
    path.write_bytes(data)
    assert_refused(path, expected, env.marker)


# -- refuse_unsafe=False: read, list, still run nothing -------------------------------------------
@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
@pytest.mark.parametrize("gadget", ["os.system", "subprocess.Popen", "copyreg._reconstructor",
                                    "functools.partial", "builtins.getattr", "builtins.__import__"])
def test_inspect_mode_reads_hostile_file_without_running_it(env, small_encoder, container, gadget):
    obj, expected = OBJECT_GADGETS[gadget](env)
    small_encoder.__dict__["evil"] = obj
    small_encoder.__dict__["blob"] = R(torch.storage._load_from_bytes,
                                       (legacy_bytes(R(eval, ("1+1",))),))
    try:
        with synth.legacy_modeling_module():
            path = save(small_encoder, env.tmp / "evil_encoder.pt", container)
    finally:
        del small_encoder.__dict__["evil"], small_encoder.__dict__["blob"]
    ckpt = read_checkpoint(path, refuse_unsafe=False)
    assert not env.marker.exists(), "the gadget ran"
    assert env.payload_module not in sys.modules
    assert expected in ckpt.unsafe_globals
    assert "builtins.eval" in ckpt.unsafe_globals  # from the nested blob
    assert "src.modeling.ImageEncoder" not in ckpt.unsafe_globals
    assert GlobalName("src", "modeling.ImageEncoder") not in ckpt.globals
    expected_sd = small_encoder.state_dict()
    assert list(ckpt.state_dict) == list(expected_sd)
    for key, value in expected_sd.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert "evil" not in ckpt.attributes


@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
def test_inspect_mode_root_gadget_is_no_checkpoint(env, container):
    obj, expected = OBJECT_GADGETS["subprocess.Popen"](env)
    path = save(obj, env.tmp / "evil.pt", container)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, refuse_unsafe=False)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value)
    assert not env.marker.exists()


# -- benign unknown classes are refused by default; allowed by the user they stay inert, unimported ----------------------------------------
@pytest.mark.parametrize("container", HOSTILE_CONTAINERS)
def test_unknown_class_stays_inert_and_unimported(tmp_path, monkeypatch, container):
    marker = tmp_path / "mylib_imported"
    site = tmp_path / "site"
    site.mkdir()
    modname = f"mylib_{uuid.uuid4().hex[:8]}"
    (site / f"{modname}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    def __setstate__(self, s):\n"
        f"        open({str(marker)!r}, 'w').close()\n")
    fake = types.ModuleType(modname)

    class Thing:
        def __init__(self) -> None:
            self.payload = [1, 2, 3]

    Thing.__module__, Thing.__qualname__ = modname, "Thing"
    fake.Thing = Thing
    monkeypatch.setitem(sys.modules, modname, fake)
    weights = {"w": torch.arange(6.0).reshape(2, 3), "meta": Thing()}
    path = save(weights, tmp_path / "thing.pt", container)
    monkeypatch.delitem(sys.modules, modname)
    monkeypatch.syspath_prepend(str(site))

    with pytest.raises(UnsafeCheckpointError, match=f"{modname}.Thing") as refused:
        read_checkpoint(path)  # on no allowlist: refused by default, however harmless it is
    assert refused.value.globals == [f"{modname}.Thing"] and "allow_globals" in str(refused.value)
    ckpt = read_checkpoint(path, allow_globals=[f"{modname}.Thing"])  # allowed by the user: a record
    assert modname not in sys.modules
    assert not marker.exists()
    assert GlobalName(modname, "Thing", False) in ckpt.globals
    assert [g.verdict for g in ckpt.globals if g.module == modname] == ["allowed by you"]
    assert ckpt.unsafe_globals == []
    assert list(ckpt.state_dict) == ["w"]
    assert torch.equal(ckpt.state_dict["w"], weights["w"])


# -- the allowlist itself -------------------------------------------------------------------------
@pytest.mark.parametrize("dotted", [
    "os.system", "posix.system", "nt.system", "os.path.join", "subprocess.Popen", "sys.exit",
    "importlib.import_module", "importlib.util.find_spec", "runpy.run_module", "shutil.rmtree",
    "socket.socket", "ctypes.CDLL", "pickle.loads", "_pickle.loads", "marshal.loads",
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.getattr", "builtins.setattr",
    "builtins.__import__", "builtins.open", "builtins.globals", "builtins.type",
    "builtins.breakpoint", "builtins.input", "builtins.vars", "io.open", "_io.FileIO",
    "functools.partial", "operator.attrgetter", "operator.methodcaller", "types.FunctionType",
    "torch.load", "torch.hub.load", "torch.jit.load", "torch.serialization.load",
    "torch.storage._load_from_file", "torch.from_file", "torch._C._load_for_lite_interpreter",
    "torch.ops.aten", "torch.package.PackageImporter",
])
def test_unsafe_globals_are_on_the_list(dotted):
    module, name = dotted.rsplit(".", 1)
    assert is_unsafe_global(module, name), dotted


@pytest.mark.parametrize("dotted", [
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch.FloatStorage",
    "torch.storage._load_from_bytes", "collections.OrderedDict", "builtins.set", "builtins.slice",
    "src.modeling.ImageEncoder", "open_clip.model.VisualTransformer",
    "torchvision.transforms.transforms.Compose", "torch.nn.modules.linear.Linear",
])
def test_checkpoint_globals_are_not_unsafe(dotted):
    module, name = dotted.rsplit(".", 1)
    assert not is_unsafe_global(module, name), dotted


# -- TorchScript archives are not handed to torch.jit.load -----------------------------------------
def test_torchscript_archive_is_refused_before_torch_jit_runs(tmp_path, monkeypatch):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "TorchScript" in str(info.value) and str(path) in str(info.value)
    assert calls == []


def test_zip_with_a_constants_record_is_refused(tmp_path, monkeypatch):
    """torch.load dispatches any zip holding constants.pkl to torch.jit.load; so data.pkl plus a
    planted constants.pkl must not get there either."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    data = good.read_bytes()
    prefix = next(iter(zip_records(data))).split("/")[0]
    control = tmp_path / "rewritten.pt"  # the same rewrite without the record reads: that record is the cause
    control.write_bytes(rewrite_zip(data))
    assert torch.equal(read_checkpoint(control).state_dict["w"], torch.ones(3))
    path = tmp_path / "planted.pt"
    path.write_bytes(rewrite_zip(data, add={f"{prefix}/constants.pkl": pickle.dumps((), protocol=2)}))
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert calls == []


def test_every_container_is_one_the_reader_recognises_and_reads(tmp_path):
    """CONTAINERS names exactly the formats files come in: a file written in each one sniffs as
    that name and reads back bit for bit, and no container listed goes unwritten."""
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    written = {}
    for form in ("zip", "legacy", "pickle"):
        written[form] = save_object(state, tmp_path / f"{form}.pt", form)
    written["safetensors"] = synth.save_state_dict(state, tmp_path / "st.safetensors", "safetensors")
    assert set(written) == set(CONTAINERS)
    for form, path in written.items():
        assert sniff_container(path) == form
        ckpt = read_checkpoint(path)
        assert ckpt.container == form
        assert set(ckpt.state_dict) == set(state)
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state.items()), form
