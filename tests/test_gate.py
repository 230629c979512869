"""The gate's verdict holds downstream (docs/design.md, "The gate"): an allowlist of globals, each
used only in its role, model-only globals refused in state dicts, and users' explicit additions
(``allow_globals=``, ``allow_globals:``, ``--allow-global``, ``--openclip-pool-allow-global``),
recorded wherever a verdict is reported.

The broad corpora live in test_corpus_unsafe.py (code-running globals in every container) and
test_differential.py / test_safetensors_differential.py (pool against the reference readers).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from redteam_files import Op, Pickled

from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool, read_checkpoint, synth
from pool.allowlist import ALLOWLIST, lookup, parse_allow_globals
from pool.checkpoint import load_state_dict, sniff_container
from pool.cli import main
from pool.errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError

GOLDEN = Path(__file__).parent / "data" / "golden"
REPO = Path(__file__).resolve().parents[1]
CUSTOM = "mylib.meta.Info"  # a global on no allowlist: harmless here, but no writer of ours uses it


def _state_dict_file(path: Path, state: dict[str, torch.Tensor], extra: bytes | None = None,
                     container: str = "zip") -> Path:
    """A state dict as torch.save lays it out, optionally with one more entry ``meta`` (opcodes)."""
    p = Pickled(container)
    items = [(Op.data(k), p.tensor(str(i), v)) for i, (k, v) in enumerate(state.items())]
    if extra is not None:
        items.append((Op.data("meta"), extra))
    return p.write(path, Op.dict(*items))


@pytest.fixture(scope="module")
def encoder_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in synth.make_original_encoder(seed=3).state_dict().items()}


@pytest.fixture(scope="module")
def head_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in synth.make_original_head(4, synth.TINY.embed_dim, seed=1).state_dict().items()}


# -- the allowlist itself -----------------------------------------------------------------------------------
def test_every_entry_is_an_exact_name_with_a_role_tier_and_writer():
    roles = {"rebuild", "storage", "dtype", "call", "class", "enum", "blob", "reference"}
    for name, entry in ALLOWLIST.items():
        module, _, short = name.rpartition(".")
        assert module and short.isidentifier() and "*" not in name, name
        assert entry.role in roles and entry.tier in ("state", "model") and entry.writer, (name, entry)


def test_every_global_of_every_real_writer_is_allowed(tmp_path):
    """Derived from real files: the open_clip 2.0.2 goldens and every synth form load, and every
    global they name is on the list with the writer that needs it."""
    synth.write_tree(tmp_path)
    files = sorted(GOLDEN.glob("*.pt")) + sorted(p for p in tmp_path.rglob("*") if p.is_file()
                                                 and p.suffix not in (".yaml", ".json", ".safetensors"))
    named = set()
    for path in files:
        ckpt = read_checkpoint(path)
        for g in ckpt.globals:
            assert not g.unsafe and g.verdict == "allowed" and g.writer, (path.name, str(g))
            named.add(str(g))
    assert len(files) >= 25 and {"src.modeling.ImageEncoder", "open_clip.model.VisualTransformer",
                                 "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes"} <= named


@pytest.mark.parametrize("name", ["pydoc.pipepager", "open_clip.load_checkpoint", "numpy.load", "os.system",
                                  "torch.load", "src.modeling.torch.load", "torch.nn.modules.module.torch.load",
                                  "copyreg._reconstructor", "builtins.getattr"])
def test_names_off_the_list_are_refused_even_under_allowed_modules(name):
    assert lookup(name) is None
    assert lookup(name, frozenset({name})).writer == "allowed by you"


@pytest.mark.parametrize("bad", ["numpy.*", "numpy", "os.system()", "", "a..b", 3])
def test_user_additions_must_be_exact_names(bad):
    with pytest.raises(ConfigError, match="exact global name"):
        parse_allow_globals([bad])


# -- refusals name the global, say what other readers would do, and how to allow it ---------------------------
def test_a_code_running_entry_beside_real_weights_is_refused(tmp_path, encoder_state):
    marker = tmp_path / "pwned"
    payload = Op.call(Op.glob("pydoc", "pipepager"), Op.data("x"), Op.data(f"touch {marker}"))
    path = _state_dict_file(tmp_path / "sd.pt", encoder_state, payload)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_state_dict(path)
    message = str(refused.value)
    assert refused.value.globals == ["pydoc.pipepager"] and str(path) in message
    assert "torch.load(weights_only=False)" in message and "--allow-global pydoc.pipepager" in message
    assert not marker.exists()


def test_a_file_whose_only_content_is_a_call_is_unsafe_not_empty(tmp_path):
    path = tmp_path / "call.pt"
    path.write_bytes(pickle.dumps(None, protocol=2)[:2] + Op.call(Op.glob("os", "system"), Op.data("true")) + b".")
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        read_checkpoint(path)


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocol_0_and_1_pickles_are_read_as_pickles(tmp_path, protocol):
    """Without a PROTO opcode they were once diagnosed as text files."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"c__builtin__\neval\n(S'1+1'\ntR.")
    assert sniff_container(evil) == "pickle"
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        read_checkpoint(evil)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"epoch": 3}, protocol=protocol))
    assert sniff_container(plain) == "pickle"
    with pytest.raises(CorruptCheckpointError, match="no tensors"):
        read_checkpoint(plain)


@pytest.mark.parametrize("text", [b"models:\n  cars: x.pt\n", b"cars: 1\nb: 2\n", b'{"a": 1}'])
def test_text_is_still_text(tmp_path, text):
    path = tmp_path / "t.pt"
    path.write_bytes(text)
    with pytest.raises(CorruptCheckpointError, match="text file"):
        sniff_container(path)


# -- roles: allowed globals used as no writer uses them -----------------------------------------------------
STORAGE_64G = Op.glob("torch.storage", "UntypedStorage") + Op.tuple(Op.data(64 << 30)) + Op.dict((Op.data("device"), Op.data("cuda"))) + b"\x92"
MISUSES = {
    # NEWOBJ_EX of a storage type beside real weights: torch.load(weights_only=False) allocates 64 GiB on cuda
    "storage made": (STORAGE_64G, "torch.storage.UntypedStorage"),
    "storage called": (Op.call(Op.glob("torch", "FloatStorage"), Op.data(10)), "torch.FloatStorage"),
    "dtype called": (Op.call(Op.glob("torch", "float32")), "torch.float32"),
    "class with arguments": (Op.newobj(Op.glob("torch.nn.modules.linear", "Linear"), Op.data(10 ** 6), Op.data(10 ** 6)),
                             "torch.nn.modules.linear.Linear"),
    "class called": (Op.call(Op.glob("torch.nn.modules.linear", "Identity")), "torch.nn.modules.linear.Identity"),
    "items on a module": (Op.newobj(Op.glob("torch.nn.modules.container", "ModuleList")) + b"(" + Op.data(1) + b"e",
                          "torch.nn.modules.container.ModuleList"),
    "call of a call": (Op.call(Op.call(Op.glob("collections", "OrderedDict"))), "collections.OrderedDict"),
}


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("misuse", sorted(MISUSES))
def test_allowed_globals_used_against_their_role_are_refused(tmp_path, head_state, container, misuse):
    ops, name = MISUSES[misuse]
    path = _state_dict_file(tmp_path / "m.pt", head_state, ops, container)
    with pytest.raises(UnsafeCheckpointError) as refused:
        read_checkpoint(path)
    assert refused.value.globals == [name] and "crafted" in str(refused.value)
    info = json.loads(_cli_out(["inspect", str(path), "--json"], expect=1))
    assert info["refusal"] and name in info["refusal"] and not info["unsafe_globals"]


def test_model_only_globals_are_refused_in_a_state_dict(tmp_path, head_state):
    """torch.load(weights_only=True) refuses a state dict naming a model class; so does pool (the
    same class is fine inside a pickled model, test_every_global_of_every_real_writer_is_allowed)."""
    extra = Op.build(Op.newobj(Op.glob("torch.nn.modules.linear", "Identity")),
                     Op.dict((Op.data("_parameters"), Op.dict()), (Op.data("_buffers"), Op.dict()),
                             (Op.data("_modules"), Op.dict())))
    for container in ("zip", "legacy"):
        path = _state_dict_file(tmp_path / f"sd.{container}", head_state, extra, container)
        with pytest.raises(UnsafeCheckpointError, match="only a pickled model uses"):
            read_checkpoint(path)
        with pytest.raises(Exception):  # noqa: B017 - the reference reader refuses it too, its own way
            torch.load(path, weights_only=True)


def test_a_protocol_4_state_dict_is_refused_as_torch_refuses_it(tmp_path, head_state):
    path = tmp_path / "p4.pt"
    torch.save(head_state, path, pickle_protocol=4)
    with pytest.raises(Exception):  # noqa: B017 - torch's weights_only reader: "Unsupported operand"
        torch.load(path, weights_only=True)
    with pytest.raises(CorruptCheckpointError, match="FRAME"):
        read_checkpoint(path)
    torch.save(head_state, path)  # the default protocol 2: both read it, bit for bit
    ours, theirs = load_state_dict(path), torch.load(path, weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and set(ours) == set(theirs)


# -- allowing a global explicitly, everywhere a load is configured ---------------------------------------------
def _custom_files(tmp_path: Path, encoder_state, head_state) -> tuple[Path, Path]:
    extra = Op.call(Op.glob(*CUSTOM.rsplit(".", 1)), Op.data(1))
    return (_state_dict_file(tmp_path / "enc.pt", encoder_state, extra),
            _state_dict_file(tmp_path / "head.pt", head_state, extra))


def test_allow_globals_on_every_loading_function(tmp_path, encoder_state, head_state):
    enc, head = _custom_files(tmp_path, encoder_state, head_state)
    for load in (load_state_dict, read_checkpoint, ImageEncoder.load):
        with pytest.raises(UnsafeCheckpointError, match=CUSTOM):
            load(enc)
    ckpt = read_checkpoint(enc, allow_globals=[CUSTOM])
    assert [g.verdict for g in ckpt.globals if str(g) == CUSTOM] == ["allowed by you"]
    assert torch.equal(load_state_dict(enc, allow_globals=[CUSTOM])["model.visual.proj"],
                       encoder_state["model.visual.proj"])
    assert ImageEncoder.load(enc, allow_globals=[CUSTOM]).state_dict().keys() == encoder_state.keys()
    assert torch.equal(ClassificationHead.load(head, allow_globals=[CUSTOM]).weight, head_state["weight"])


def test_allow_globals_in_a_pool_config(tmp_path, encoder_state, head_state):
    enc, head = _custom_files(tmp_path, encoder_state, head_state)
    config = {"models": {"cars": str(enc)}, "classification_heads": {"cars": str(head)}}
    with pytest.raises(UnsafeCheckpointError, match=CUSTOM):
        OpenCLIPVisionModelPool(**config).load_model("cars")
    pool = OpenCLIPVisionModelPool.from_config({**config, "allow_globals": [CUSTOM]})
    assert pool.load_model("cars") is not None and pool.load_classification_head("cars") is not None
    again = OpenCLIPVisionModelPool.from_config(pool.config)
    assert again.allow_globals == {CUSTOM}
    with pytest.raises(ConfigError, match="exact global name"):
        OpenCLIPVisionModelPool(**config, allow_globals=["mylib.*"])


def _cli_out(argv: list[str], expect: int) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == expect, out.getvalue()
    return out.getvalue()


def test_verify_allow_global_is_recorded_in_the_report(tmp_path, encoder_state, head_state, capsys):
    enc, head = _custom_files(tmp_path, encoder_state, head_state)
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(f"models:\n  cars: {enc}\nclassification_heads:\n  cars: {head}\n")
    assert main(["verify", str(cfg)]) == 1
    assert CUSTOM in capsys.readouterr().out
    report = tmp_path / "r.json"
    assert main(["verify", str(cfg), "--allow-global", CUSTOM, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "allowed besides pool's allowlist: " + CUSTOM in out
    assert json.loads(report.read_text())["allowed_globals"] == [CUSTOM]


def test_inspect_shows_every_verdict_and_writer(tmp_path, encoder_state, head_state):
    enc, _ = _custom_files(tmp_path, encoder_state, head_state)
    text = _cli_out(["inspect", str(enc)], expect=1)
    assert f"{CUSTOM}  REFUSED" in text and "torch._utils._rebuild_tensor_v2  allowed (torch.save" in text
    data = json.loads(_cli_out(["inspect", str(enc), "--json", "--allow-global", CUSTOM], expect=0))
    verdicts = {g["name"]: (g["verdict"], g["writer"]) for g in data["globals"]}
    assert verdicts[CUSTOM] == ("allowed by you", "allowed by you") and data["refusal"] is None
    assert verdicts["collections.OrderedDict"][0] == "allowed"


def test_pytest_items_take_allow_global(tmp_path, encoder_state, head_state):
    enc, head = _custom_files(tmp_path, encoder_state, head_state)
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(f"models:\n  cars: {enc}\nclassification_heads:\n  cars: {head}\n")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
            "--openclip-pool-verify", str(cfg)]
    refused = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    allowed = subprocess.run(base + ["--openclip-pool-allow-global", CUSTOM], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and CUSTOM in refused.stdout, refused.stdout[-2000:]
    assert allowed.returncode == 0 and "2 passed" in allowed.stdout, allowed.stdout[-2000:]


# -- red-team findings on the gate (each refused, or read as the reference reads it) --------------------------
def _setitems(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"(" + b"".join(k + v for k, v in pairs) + b"u"


W4, F4 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([6.0, 6.0, 6.0, 6.0])


def _agrees_with_torch(path: Path) -> None:
    from differential import disagreement, load_both

    assert disagreement(load_both(path)) is None


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_mapping_given_a_module_like_state_keeps_its_items(tmp_path, container):
    """BUILD on an OrderedDict updates its attributes, never its items: no module to walk (it once
    read the fake weights of the state); the tensor in the attribute is refused, never returned."""
    p = Pickled(container)
    real, fake = p.tensor("0", W4), p.tensor("1", F4)
    state = b"}" + _setitems((Op.str("_parameters"), Op.ordered_dict() + _setitems((Op.str("weight"), fake))),
                             (Op.str("_modules"), Op.ordered_dict()))
    path = p.write(tmp_path / "od.pt", Op.ordered_dict() + _setitems((Op.str("weight"), real)) + state + b"b")
    with pytest.raises(CorruptCheckpointError, match="outside any mapping entry"):  # the fake: an attribute
        load_state_dict(path)
    _agrees_with_torch(path)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_call_copies_its_argument_when_it_runs(tmp_path, container):
    """OrderedDict(d) copies d; the pickle changing d afterwards (through the memo) changes nothing."""
    p = Pickled(container)
    p._next_memo = 1  # memo 0 is d
    real, fake = p.tensor("0", W4), p.tensor("1", F4)
    d = b"}" + Op.put(0) + _setitems((Op.str("w"), real))
    later = Op.get(0) + Op.str("w") + fake + b"s"
    body = b"}" + _setitems((Op.str("x"), Op.glob("collections", "OrderedDict") + b"(" + d + b"tR"),
                            (Op.str("y"), later))
    path = p.write(tmp_path / "later.pt", body)
    state = load_state_dict(path)
    assert torch.equal(state["x.w"], W4) and torch.equal(state["y.w"], F4)
    _agrees_with_torch(path)


def test_non_ascii_py2_strings_are_refused(tmp_path):
    """torch.load decodes BINSTRING as UTF-8, old pickles as latin-1: two readers, two keys."""
    p = Pickled("zip")
    path = p.write(tmp_path / "key.pt", b"}" + _setitems((b"U\x09" + "é.weight".encode(), p.tensor("0", W4))))
    with pytest.raises(CorruptCheckpointError, match="non-ASCII"):
        load_state_dict(path)


def test_counters_and_empty_parameters(tmp_path):
    p = Pickled("zip")
    a = p.tensor("0", W4)  # memo indices in the order the opcodes come
    counter = Op.call(Op.glob("collections", "Counter")) + _setitems((Op.str("k"), p.tensor("1", F4)))
    path = p.write(tmp_path / "counter.pt", b"}" + _setitems((Op.str("a"), a), (Op.str("c"), counter)))
    assert torch.equal(load_state_dict(path)["c.k"], F4)
    _agrees_with_torch(path)
    q = Pickled("zip")
    counted = Op.call(Op.glob("collections", "Counter"), Op.data(["k"]))
    path = q.write(tmp_path / "counted.pt", b"}" + _setitems((Op.str("a"), q.tensor("0", W4)), (Op.str("c"), counted)))
    with pytest.raises(CorruptCheckpointError, match="Counter built from arguments"):
        load_state_dict(path)
    r = Pickled("zip")
    empty = Op.newobj(Op.glob("torch.nn.parameter", "Parameter"), Op.data(None))
    path = r.write(tmp_path / "none.pt", b"}" + _setitems((Op.str("a"), r.tensor("0", W4)), (Op.str("p"), empty)))
    with pytest.raises(CorruptCheckpointError, match="parameter over"):
        load_state_dict(path)


def _linear(extra: bytes = b"", *, buffers: bool = True, tuple_state: bool = False) -> tuple[Pickled, bytes]:
    p = Pickled("zip")
    items = [(Op.str("training"), b"\x88"),
             (Op.str("_parameters"), Op.ordered_dict() + _setitems((Op.str("weight"), p.tensor("0", W4)))),
             (Op.str("_modules"), Op.ordered_dict())]
    if buffers:
        items.append((Op.str("_buffers"), Op.ordered_dict() + _setitems((Op.str("b"), p.tensor("1", F4)))))
    state = b"}" + _setitems(*items) + extra + (b"N\x86" if tuple_state else b"")
    return p, Op.newobj(Op.glob("torch.nn.modules.linear", "Linear")) + state + b"b"


@pytest.mark.parametrize("spelling", [b"](" + Op.str("b") + b"e", b"}" + Op.str("b") + b"Ns"])
def test_non_persistent_buffers_named_in_a_list_or_dict_are_left_out(tmp_path, spelling):
    """state_dict() tests ``name in module._non_persistent_buffers_set``: a list or dict works too."""
    p, body = _linear(_setitems((Op.str("_non_persistent_buffers_set"), spelling)))
    assert set(load_state_dict(p.write(tmp_path / "m.pt", body))) == {"weight"}


@pytest.mark.parametrize("case", ["no _buffers", "tuple state", "state_dict hook"])
def test_modules_whose_state_dict_fails_are_refused(tmp_path, case):
    if case == "no _buffers":
        p, body = _linear(buffers=False)
    elif case == "tuple state":
        p, body = _linear(tuple_state=True)
    else:
        hook = Op.ordered_dict() + _setitems((b"K\x00", Op.glob("builtins", "set")))
        p, body = _linear(_setitems((Op.str("_state_dict_hooks"), hook)))
    with pytest.raises(CorruptCheckpointError):
        load_state_dict(p.write(tmp_path / "m.pt", body))


def test_a_tensor_given_a_state_is_refused_wherever_it_sits(tmp_path):
    """Found by the fuzz profile: BUILD on a tensor inside a list (which the walk never reads);
    torch.load would set_() the tensor from the state, or fail."""
    p = Pickled("zip")
    w = p.tensor("0", W4)
    hidden = p.tensor("1", F4) + Op.tuple(Op.data(None), Op.data({"x": 1})) + b"b"
    path = p.write(tmp_path / "build.pt", b"}" + _setitems((Op.str("w"), w), (Op.str("l"), b"](" + hidden + b"e")))
    with pytest.raises(UnsafeCheckpointError, match="a state"):
        load_state_dict(path)


def test_legacy_storage_keys_are_strings_as_torch_writes_them(tmp_path):
    """Found by the fuzz profile: an integer key in a storage reference, the string in the key list:
    torch looks the key up as written and fails; pool once compared them as strings."""
    from redteam_files import Storage, legacy_file, rebuild_v2

    pid = Op.tuple(Op.data("storage"), Op.glob("torch", "FloatStorage"), Op.data(7), Op.data("cpu"), Op.data(4),
                   Op.data(None)) + b"Q"
    body = b"}" + _setitems((Op.str("w"), rebuild_v2(pid, 0, (4,), (1,))))
    path = tmp_path / "intkey.pt"
    path.write_bytes(legacy_file(pickle_of_body(body), [Storage("7", torch.float32, W4.numpy().tobytes())], ["7"]))
    with pytest.raises(CorruptCheckpointError):
        load_state_dict(path)


def pickle_of_body(body: bytes) -> bytes:
    from redteam_files import pickle_of

    return pickle_of(body, 2)


def test_a_tensor_outside_the_state_dicts_entries_is_refused(tmp_path):
    """Found by the fuzz profile: a tensor with an invalid offset inside a list; torch builds it (and
    fails), pool's walk never read it."""
    from redteam_files import rebuild_v2

    p = Pickled("legacy")
    w = p.tensor("0", W4)
    bad = rebuild_v2(p.storage("1", torch.float32, F4.numpy().tobytes()), -1, (4,), (1,))
    path = p.write(tmp_path / "list.pt", b"}" + _setitems((Op.str("w"), w), (Op.str("l"), b"](" + bad + b"e")))
    with pytest.raises(CorruptCheckpointError, match="outside any mapping entry"):
        load_state_dict(path)
    _agrees_with_torch(path)


def test_a_training_checkpoints_optimizer_state_is_read_but_not_returned(tmp_path):
    """``{"state_dict": ..., "optimizer": {...tensors...}}``: the optimizer's tensors are checked as
    every reader builds them, and only the state dict comes back."""
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"w": W4}, "optimizer": {"state": {0: {"exp_avg": F4, "step": torch.tensor(3.0)}},
                                                        "param_groups": [{"params": [0], "lr": 0.1}]}}, path)
    assert set(load_state_dict(path)) == {"w"}
    assert torch.equal(load_state_dict(path)["w"], torch.load(path, weights_only=True)["state_dict"]["w"])
