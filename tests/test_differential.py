"""The gate's promise as a differential property (docs/design.md §4.4): whatever ``pool`` loads,
``torch.load(path, weights_only=True)`` loads too, key for key and byte for byte; whatever torch
refuses, pool refuses with a ``CheckpointError``. Pool refusing what torch loads is allowed.

Files are mutated real ``torch.save`` outputs (`tests.differential`). The property runs a bounded
number of examples under the default (derandomised) profile; ``POOL_HYPOTHESIS_PROFILE=fuzz`` runs
2000 per test. `CASES` are deterministic reproductions, one per known disagreement class.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.differential import (
    MUTATIONS,
    Call,
    Dct,
    Doc,
    G,
    Member,
    Tup,
    applicable,
    base_doc,
    base_files,
    disagreement,
    load_both,
    mutate,
    pid_fields,
    tensor_call,
)
from tests.helpers import examples

BASES = sorted(base_files())
GROUPS = {"zip-p2": [b for b in BASES if b.endswith("zip-p2")],
          "legacy-p2": [b for b in BASES if b.endswith("legacy-p2")],
          "zip-p4": [b for b in BASES if b.endswith("zip-p4")],
          "legacy-p4": [b for b in BASES if b.endswith("legacy-p4")]}


def _check(path: Path, what: str) -> None:
    why = disagreement(load_both(path))  # a pool error other than CheckpointError propagates: a bug
    assert why is None, f"{what}: {why}"


# -- the property ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", sorted(GROUPS))
@settings(max_examples=examples(25))
@given(data=st.data())
def test_pool_loads_only_what_torch_loads_identically(group: str, data: st.DataObject, tmp_path_factory) -> None:
    name = data.draw(st.sampled_from(GROUPS[group]), label="base")
    doc = base_doc(name)
    names = data.draw(st.lists(st.sampled_from(applicable(doc)), min_size=0, max_size=3), label="mutations")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    mutate(doc, random.Random(seed), names)
    path = doc.write(tmp_path_factory.mktemp("diff") / "mutated.pt")
    _check(path, f"{name} + {names} (seed {seed})")


def test_every_mutation_class_changes_the_file() -> None:
    """Each mutation class does something to at least one base (else the property tests nothing)."""
    idle = []
    for mname, m in MUTATIONS.items():
        changed = False
        for base in (b for b in BASES if b.endswith("p2") and any(k in b for k in m.kinds)):
            for seed in range(8):
                doc = base_doc(base)
                mutate(doc, random.Random(seed), [mname])
                changed = changed or doc.to_bytes() != base_doc(base).to_bytes()
        if not changed:
            idle.append(mname)
    assert not idle, idle


def test_unmutated_round_trip_agrees(tmp_path: Path) -> None:
    """The engine itself: a parsed and rewritten protocol-2 base file loads the same in both readers."""
    for name in BASES:
        if name.endswith("p2"):
            path = base_doc(name).write(tmp_path / f"{name}.pt")
            out = load_both(path)
            assert out.pool is not None and out.torch is not None, name
            assert disagreement(out) is None, name


# -- deterministic reproductions -------------------------------------------------------------------
def _inner(doc: Doc) -> Dct:
    """The {"x": tensor} state dict of the "wrapped" base ({"state_dict": {"x": ...}, "epoch": 3})."""
    return next(v for k, v in doc.root.setitems if k == "state_dict")


def _other(doc: Doc) -> Call:
    return doc.new_tensor(random.Random(1), torch.float32, 4)


def _wrap_from_type(state: Callable[[Doc], object]) -> Callable[[Doc], None]:
    def fn(doc: Doc) -> None:
        inner = _inner(doc)
        key, call = inner.setitems[0]
        inner.setitems[0] = (key, Call(G("torch._tensor", "_rebuild_from_type_v2"),
                                       Tup([call.func, G("torch", "Tensor"), call.args, state(doc)])))
    return fn


def _param_with_state(state: Callable[[Doc], object]) -> Callable[[Doc], None]:
    def fn(doc: Doc) -> None:
        inner = _inner(doc)
        key, call = inner.setitems[0]
        inner.setitems[0] = (key, Call(G("torch._utils", "_rebuild_parameter_with_state"),
                                       Tup([call, True, Call(G("collections", "OrderedDict"), Tup([])), state(doc)])))
    return fn


def _flat_pid(doc: Doc, key: str):
    """The persistent id of tensor ``key`` in the "flat" base."""
    call = next(v for k, v in doc.root.setitems if k == key)
    return pid_fields(call.args.items[0])


def _pickle_case_duplicate(doc: Doc) -> None:
    """archive/DATA.PKL (other weights) before archive/data.pkl: torch's case-insensitive lookup
    takes the first match."""
    from tests.differential import _alt_root
    doc.members.insert(0, Member(f"{doc.prefix}/DATA.PKL".encode(), pickle=_alt_root(doc, random.Random(2))))


def _storage_case_pair(doc: Doc) -> None:
    inner = _inner(doc)
    key, call = inner.setitems[0]
    raw = doc.storage_bytes(pid_fields(call.args.items[0])[2])
    call.args.items[0] = doc.new_storage(torch.float32, raw, "a")
    inner.setitems.append(("y", tensor_call(doc.new_storage(torch.float32, bytes(range(16)), "A"), 0, (4,), (1,))))


def _name_without_utf8_flag(doc: Doc) -> None:
    """Both names valid UTF-8, neither flagged: pickle key K = "├⌐" (the cp437 reading of the bytes
    C3 A9). Member C3 A9 (K to pool's cp437 decoding) holds the real bytes; member utf8(K) (what
    torch matches, raw) holds others."""
    call = _inner(doc).setitems[0][1]
    raw = doc.storage_bytes(pid_fields(call.args.items[0])[2])
    key = "é".encode().decode("cp437")
    call.args.items[0] = doc.new_storage(torch.float32, raw, key)
    doc.members[-2].name, doc.members[-2].flags = b"archive/data/\xc3\xa9", 0
    doc.members.insert(-1, Member(b"archive/data/" + key.encode(), bytes(range(16)), 0))


def _cp437_name_only(doc: Doc) -> None:
    """Key "é": only the cp437-spelled member (torch decodes names as UTF-8: refuses)."""
    call = _inner(doc).setitems[0][1]
    raw = doc.storage_bytes(pid_fields(call.args.items[0])[2])
    call.args.items[0] = doc.new_storage(torch.float32, raw, "é")
    doc.members[-2].name, doc.members[-2].flags = "archive/data/é".encode("cp437"), 0


def _key_two_dtypes(doc: Doc) -> None:
    _flat_pid(doc, "w_row")[1] = G("torch", "IntStorage")  # w, then w_row, w_t: one key


def _legacy_view_reused(doc: Doc) -> None:
    """w: view "V" = elements 0..11 of its storage; w_row: view "V" again, now elements 4..7, at
    tensor offset 0. torch caches the first view under "V"."""
    _flat_pid(doc, "w")[5] = Tup(["V", 0, 12])
    _flat_pid(doc, "w_row")[5] = Tup(["V", 4, 4])
    next(v for k, v in doc.root.setitems if k == "w_row").args.items[1] = 0


def _legacy_view_key_is_root_key(doc: Doc) -> None:
    """"scalar" (a DoubleStorage) as a view whose key is w's root key: torch returns the cached
    FloatStorage of w."""
    _flat_pid(doc, "scalar")[5] = Tup([_flat_pid(doc, "w")[2], 0, 1])


def _legacy_root_is_view_key(doc: Doc) -> None:
    """w: view "V" = its whole storage (a FloatStorage); then "half" names root key
    "V" (its own record, a HalfStorage): torch returns the cached view."""
    _flat_pid(doc, "w")[5] = Tup(["V", 0, 12])
    half = _flat_pid(doc, "half")
    old = half[2]
    half[2] = "V"
    half[4] = 12  # 12 half elements (24 bytes) to pool; to torch, 12 elements of the cached FloatStorage
    rec = next(r for r in doc.records if r[0] == old)
    doc.records.remove(rec)
    doc.records.append(["V", 12, rec[2] + bytes(12)])  # last: pool reads 24 bytes, torch 48
    doc.trailer = bytes(range(100, 124))


def _drop(suffix: str) -> Callable[[Doc], None]:
    def fn(doc: Doc) -> None:
        doc.members = [m for m in doc.members if m.name != f"{doc.prefix}/{suffix}".encode()]
    return fn


def _content(suffix: str, data: bytes) -> Callable[[Doc], None]:
    def fn(doc: Doc) -> None:
        for m in doc.members:
            if m.name == f"{doc.prefix}/{suffix}".encode():
                m.data = data
    return fn


def _newobj_ex_storage(doc: Doc) -> None:
    _inner(doc).setitems.append(("big", Call(G("torch", "UntypedStorage"), Tup([1 << 36]), "newobj_ex",
                                             Dct([("device", "cuda")]))))


def _unlisted_global(doc: Doc) -> None:
    _inner(doc).setitems[0][1].args.items[5] = Call(G("collectiols", "OrderedDict"), Tup([]))


def _typed_storage_call(doc: Doc) -> None:
    _inner(doc).setitems.append(("extra", Call(G("torch", "TypedStorage"), Tup([]))))


def _record_longer(doc: Doc) -> None:
    for m in doc.members:
        if b"/data/" in m.name:
            m.data += b"\0" * 4


def _location(value: object) -> Callable[[Doc], None]:
    def fn(doc: Doc) -> None:
        pid_fields(_inner(doc).setitems[0][1].args.items[0])[3] = value
    return fn


def _pid_length(doc: Doc) -> None:
    f = pid_fields(_inner(doc).setitems[0][1].args.items[0])
    f.append(None) if len(f) == 5 else f.pop()


def _int_parameter(doc: Doc) -> None:
    pid = _flat_pid(doc, "i64")
    call = next(v for k, v in doc.root.setitems if k == "i64")
    doc.root.setitems.append(("p_int", Call(G("torch._utils", "_rebuild_parameter"),
                                            Tup([call, True, Call(G("collections", "OrderedDict"), Tup([]))]))))
    del pid


def _nothing(doc: Doc) -> None:
    pass


# (test id, base file, mutation): every one of these disagrees with torch on the code this was written
# against (see the module docstring of tests/differential.py for what "disagree" means)
CASES: list[tuple[str, str, Callable[[Doc], None]]] = [
    # spoofs: both load, other weights
    ("spoof-from_type_v2-state-dict-zip", "wrapped-zip-p2", _wrap_from_type(lambda d: Dct([("data", _other(d))]))),
    ("spoof-from_type_v2-state-dict-legacy", "wrapped-legacy-p2", _wrap_from_type(lambda d: Dct([("data", _other(d))]))),
    ("spoof-from_type_v2-state-pair-zip", "wrapped-zip-p2",
     _wrap_from_type(lambda d: Tup([Dct([("data", _other(d))]), Dct([("x", 1)])]))),
    ("spoof-from_type_v2-state-pair-legacy", "wrapped-legacy-p2",
     _wrap_from_type(lambda d: Tup([None, Dct([("data", _other(d))])]))),
    ("spoof-parameter_with_state-dict-zip", "wrapped-zip-p2", _param_with_state(lambda d: Dct([("data", _other(d))]))),
    ("spoof-parameter_with_state-dict-legacy", "wrapped-legacy-p2",
     _param_with_state(lambda d: Dct([("data", _other(d))]))),
    ("spoof-parameter_with_state-pair-zip", "wrapped-zip-p2",
     _param_with_state(lambda d: Tup([Dct([("data", _other(d))]), Dct()]))),
    ("spoof-zip-data.pkl-and-DATA.PKL", "wrapped-zip-p2", _pickle_case_duplicate),
    ("spoof-zip-storage-a-and-A", "wrapped-zip-p2", _storage_case_pair),
    ("spoof-zip-names-without-utf8-flag", "wrapped-zip-p2", _name_without_utf8_flag),
    ("spoof-zip-storage-key-two-dtypes", "flat-zip-p2", _key_two_dtypes),
    ("spoof-legacy-view-key-reused", "flat-legacy-p2", _legacy_view_reused),
    ("spoof-legacy-view-key-equals-earlier-root-key", "flat-legacy-p2", _legacy_view_key_is_root_key),
    ("spoof-legacy-root-key-equals-earlier-view-key", "flat-legacy-p2", _legacy_root_is_view_key),
    ("spoof-location-meta", "wrapped-legacy-p2", _location("meta")),
    # lax: pool loads what torch refuses
    ("lax-zip-without-version", "wrapped-zip-p2", _drop("version")),
    ("lax-zip-version-negative", "wrapped-zip-p2", _content("version", b"-1\n")),
    ("lax-zip-version-not-a-number", "wrapped-zip-p2", _content("version", b"x")),
    ("lax-zip-storage-record-longer-than-pid", "wrapped-zip-p2", _record_longer),
    ("lax-zip-cp437-name-bytes-without-flag", "wrapped-zip-p2", _cp437_name_only),
    ("lax-protocol4-newobj_ex-untyped-storage-cuda", "wrapped-zip-p4", _newobj_ex_storage),
    ("lax-protocol4-torch.save-zip", "flat-zip-p4", _nothing),
    ("lax-protocol4-torch.save-legacy", "flat-legacy-p4", _nothing),
    ("lax-global-off-torch-allowlist-zip", "wrapped-zip-p2", _unlisted_global),
    ("lax-global-off-torch-allowlist-legacy", "wrapped-legacy-p2", _typed_storage_call),
    ("lax-location-unknown-zip", "wrapped-zip-p2", _location("cpu:0")),
    ("lax-location-not-a-string-legacy", "wrapped-legacy-p2", _location(7)),
    ("lax-zip-pid-with-six-fields", "wrapped-zip-p2", _pid_length),
    ("lax-legacy-pid-with-five-fields", "wrapped-legacy-p2", _pid_length),
    ("lax-int-parameter-requires-grad", "flat-zip-p2", _int_parameter),
]


@pytest.mark.parametrize("base, fn", [pytest.param(b, f, id=i) for i, b, f in CASES])
def test_known_disagreement_class(base: str, fn: Callable[[Doc], None], tmp_path: Path) -> None:
    doc = base_doc(base)
    fn(doc)
    path = doc.write(tmp_path / "case.pt")
    _check(path, base)
