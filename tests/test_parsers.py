"""The parsers the reader owns (docs/design.md §3): zip, pickle scan, records, tensor validation.

Differential properties: whatever our zip parser accepts, Python's zipfile reads the same members
with the same bytes; whatever the scan accepts, CPython's unpickler reads to the same end. Unit
tests: each refusal the zip parser and the scan make, and the tensor checks that keep the loader's
own memory out of the weights.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.checkpoint import read_checkpoint
from pool.containers.zipfmt import parse_zip
from pool.errors import CheckpointError, CorruptCheckpointError
from pool.inert import GlobalRecord
from pool.pickle_scan import MAX_TUPLE_DEPTH, scan_pickle
from pool.tensors import StorageRef, TensorSpec, materialize
from pool.unpickler import Reader


def torch_zip(obj=None) -> bytes:
    buf = io.BytesIO()
    torch.save(obj if obj is not None else {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, buf)
    return buf.getvalue()


def zipfile_view(data: bytes) -> dict[str, bytes] | None:
    """What Python's zipfile reads from an archive (CRCs not checked: ours checks them separately)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            view = {}
            for info in zf.infolist():
                with zf.open(info) as member:
                    member._expected_crc = None
                    view[info.filename] = member.read()
            return view
    except Exception:  # noqa: BLE001 - any refusal of the reference reader
        return None


# -- zip: differential ----------------------------------------------------------------------------
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                min_size=1, max_size=6))
def test_zip_mutations_are_refused_or_read_as_zipfile_reads_them(flips):
    data = bytearray(torch_zip())
    for position, value in flips:
        data[position % len(data)] = value
    try:
        archive = parse_zip(bytes(data), "mutated.pt")
    except CorruptCheckpointError:
        return
    reference = zipfile_view(bytes(data))
    assert reference is not None, "we read an archive zipfile refuses"
    assert list(archive.members) == list(reference)
    for name, member in archive.members.items():
        assert bytes(data[member.offset:member.offset + member.size]) == reference[name]


def test_real_torch_and_zipfile_archives_parse():
    data = torch_zip()
    archive = parse_zip(data, "t.pt")
    assert {n: bytes(data[m.offset:m.offset + m.size]) for n, m in archive.members.items()} == zipfile_view(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # no data descriptors, no ZIP64 records
        zf.writestr("a/data.pkl", b"x" * 10)
        zf.writestr("a/data/0", b"y" * 100)
    assert set(parse_zip(buf.getvalue(), "z").members) == {"a/data.pkl", "a/data/0"}


def _eocd_at(data: bytes) -> int:
    return len(data) - 22


@pytest.mark.parametrize("tamper,why", [
    (lambda d: d + b"\0" * 5, "no end-of-central-directory record at the end"),
    (lambda d: d[:-2] + b"\x05\x00" + b"hello", "comment"),
    (lambda d: d[:-10], "end-of-central-directory"),
    (lambda d: d[:_eocd_at(d) + 16] + struct.pack("<I", struct.unpack_from("<I", d, _eocd_at(d) + 16)[0] + 1)
     + d[_eocd_at(d) + 20:], "central directory is not where"),
])
def test_zip_end_records_must_be_exact(tamper, why):
    data = bytearray(torch_zip())
    # drop the ZIP64 locator so the plain end record governs (Python's zipfile archives have none)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in zipfile_view(bytes(data)).items():
            zf.writestr(name, payload)
    with pytest.raises(CorruptCheckpointError, match=why):
        parse_zip(tamper(buf.getvalue()), "t.pt")


def _rewrite_central_name(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    cd = data.rfind(b"PK\x01\x02" + data[data.rfind(b"PK\x01\x02") + 4:][:0])
    head, tail = data[:cd], data[cd:]
    return head + tail.replace(old, new)


def _zip(entries: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, payload in entries:
            zf.writestr(name, payload)
    return buf.getvalue()


def test_zip_refuses_duplicate_names():
    with pytest.warns(UserWarning):
        data = _zip([("a/data.pkl", b"1"), ("a/data.pkl", b"2")])
    assert zipfile_view(data) is not None  # zipfile reads it (the last one wins)
    with pytest.raises(CorruptCheckpointError, match="two members are named"):
        parse_zip(data, "dup.pt")


def test_zip_refuses_nul_in_a_name():
    data = _zip([("a/data.pkl", b"1"), ("a/data.pklXx", b"2")])
    data = data.replace(b"a/data.pklXx", b"a/data.pkl\x00x")
    with pytest.raises(CorruptCheckpointError, match="NUL"):
        parse_zip(data, "nul.pt")


def test_zip_refuses_compressed_and_encrypted_members():
    with pytest.raises(CorruptCheckpointError, match="compressed"):
        parse_zip(_zip([("a/data.pkl", b"x" * 1000)], zipfile.ZIP_DEFLATED), "deflate.pt")
    data = bytearray(_zip([("a/data.pkl", b"x" * 10)]))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # set the encryption flag in both headers
        at = bytes(data).find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        data[flag_at] |= 1
    with pytest.raises(CorruptCheckpointError, match="encrypted"):
        parse_zip(bytes(data), "enc.pt")


def test_zip_refuses_hidden_bytes_and_overlaps():
    member = b"PK\x03\x04"
    data = _zip([("a/data.pkl", b"1" * 50), ("a/data/0", b"2" * 50)])
    second = data.find(member, 1)
    # 100 bytes hidden between the two members: shift the second member's offset in the directory
    padded = data[:second] + b"\0" * 100 + data[second:]
    cd = padded.find(b"PK\x01\x02")
    cd2 = padded.find(b"PK\x01\x02", cd + 1)
    fixed = bytearray(padded)
    struct.pack_into("<I", fixed, cd2 + 42, second + 100)
    eocd = len(fixed) - 22
    struct.pack_into("<I", fixed, eocd + 16, cd + 0)
    assert zipfile_view(bytes(fixed)) is not None
    with pytest.raises(CorruptCheckpointError, match="unaccounted bytes"):
        parse_zip(bytes(fixed), "gap.pt")
    overlap = bytearray(data)
    cd = data.find(b"PK\x01\x02")
    cd2 = data.find(b"PK\x01\x02", cd + 1)
    struct.pack_into("<I", overlap, cd2 + 42, 0)  # both entries point at the first local header
    with pytest.raises(CorruptCheckpointError):
        parse_zip(bytes(overlap), "overlap.pt")


def test_torchscript_is_named_before_anything_else(tmp_path):
    data = _zip([("m/data.pkl", b"x"), ("m/code/__torch__.py", b"def f(): pass" * 50),
                 ("m/constants.pkl", b"y")], zipfile.ZIP_DEFLATED)
    path = tmp_path / "scripted.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="TorchScript") as info:
        read_checkpoint(path)
    assert type(info.value).__name__ == "UnsafeCheckpointError"


# -- pickle scan ----------------------------------------------------------------------------------
@settings(max_examples=examples(200), deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
                    | st.binary(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=30),
       st.integers(min_value=0, max_value=pickle.HIGHEST_PROTOCOL))
def test_scan_accepts_what_pickle_writes_and_ends_where_it_ends(obj, protocol):
    data = pickle.dumps(obj, protocol=protocol) + b"trailing"
    assert scan_pickle(data).end == len(data) - len(b"trailing")


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=64))
def test_scan_never_fails_with_anything_but_a_typed_error(data):
    try:
        result = scan_pickle(b"\x80\x02" + data)
    except CorruptCheckpointError:
        return
    assert result.end <= len(data) + 2


@pytest.mark.parametrize("data,why", [
    (b"\x80\x02" + b")" + b"\x85" * (MAX_TUPLE_DEPTH + 1) + b".", "tuples nest"),
    (b"\x80\x02}" + b")" + b"\x85" * 100_000 + b"Ns.", "tuples nest"),  # a dict key: C hashing recursion
    (b"\x80\x02" + b"(" * 2000 + b"t" * 2000 + b".", "MARKs"),
    (b"\x80\x02\x82\x01.", "extension registry"),  # EXT1
    (b"\x80\x05\x97.", "out-of-band"),  # NEXT_BUFFER
    (b"\x80\x02h\x05.", "never stored"),
    (b"\x80\x02]r\xff\xff\xff\x7f.", "skips ahead"),
    (b"\x80\x04\x8e" + (4 * 10**9).to_bytes(8, "little") + b"ab.", "claims"),
    (b"\x80\x02K\x01K\x02.", "STOP with 2 items"),
    (b"\x80\x02N", "without a STOP"),
    (b"\x80\x02X\x01\x00\x00\x00aK\x01\x93.", "STACK_GLOBAL"),
])
def test_scan_refusals(data, why):
    with pytest.raises(CorruptCheckpointError, match=why):
        scan_pickle(data, source="evil.pt")


@pytest.mark.parametrize("data,at", [
    (b"\x80\x02N\x85h", 4),  # BINGET cut off: its own offset, not the TUPLE1's before it
    (b"\x80\x02R.", 2),  # REDUCE on an empty stack
    (b"\x80\x02r\x00\x00\x00\x00.", 2),  # LONG_BINPUT with nothing to store
])
def test_a_refusal_names_the_offset_of_the_opcode_refused(data, at):
    """Every opcode's refusal points at that opcode, in a short pickle as in a long one (the
    scan's former inlined fast path named the opcode before it)."""
    with pytest.raises(CorruptCheckpointError, match=f"malformed at byte {at}:"):
        scan_pickle(data, source="evil.pt")


def test_scan_lists_globals_without_importing_them():
    data = b"\x80\x02cnot_a_module_at_all\nthing\n)R\x8c\x0bother_thing\x8c\x01f\x93\x86."
    assert scan_pickle(data).globals == [("not_a_module_at_all", "thing"), ("other_thing", "f")]


# -- records and tensors --------------------------------------------------------------------------
def test_records_run_nothing_and_record_everything():
    reader = Reader("t.pt", allow_globals=frozenset({"mod.Cls"}))
    data = pickle.dumps(None, protocol=2)[:2] + b"cmod\nCls\n)\x81}X\x01\x00\x00\x00aK\x01sb."
    root = reader.unpickle(data).root
    assert isinstance(root, GlobalRecord) and root.state == {"a": 1} and root.args == ()
    assert str(type(root).record_global) == "mod.Cls"


def _spec(size, stride, offset=0, dtype=torch.float32, numel=4):
    return TensorSpec(StorageRef("0", torch.float32, numel), dtype, offset, size, stride)


@pytest.mark.parametrize("spec,why", [
    (_spec((50_000, 40_000), (0, 0)), "once copied"),  # a stride-0 head of 2e9 elements
    (_spec((5,), (1,)), "needs 20 bytes"),
    (_spec((2,), (1,), offset=3), "needs 20 bytes"),
    (_spec((2, 2), (2, -1)), "malformed"),
    (_spec((2,), (1,), offset=-1), "malformed"),
    (_spec((2,), (1,), numel=10), "claims 40 bytes but only 16"),
])
def test_tensor_views_must_lie_inside_the_bytes_that_exist(spec, why):
    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    with pytest.raises(CorruptCheckpointError, match=why):
        materialize({"w": spec}, {"0": storage}, "t.pt", 16)


def test_a_valid_view_shares_the_bytes_read():
    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    out = materialize({"w": _spec((2, 2), (1, 2))}, {"0": storage}, "t.pt", 16)["w"]
    assert out.tolist() == [[0.0, 2.0], [1.0, 3.0]]
    assert out.untyped_storage().data_ptr() == storage.data_ptr()


# -- legit files the first cut refused (review findings) --------------------------------------------
def test_legacy_views_of_one_storage_read_as_torch_reads_them(tmp_path):
    """Old torch wrote storage views: ('storage', FloatStorage, root key, location, root size,
    (view key, offset, view size)). Two views into one 20-element root, in either order."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from redteam_files import Op, Storage, legacy_file, pickle_of, rebuild_v2

    def view(view_key: str, offset: int) -> bytes:
        return Op.tuple(Op.data("storage"), Op.glob("torch", "FloatStorage"), Op.data("root"), Op.data("cpu"),
                        Op.data(20), Op.data((view_key, offset, 10))) + b"Q"

    root = Storage("root", torch.float32, torch.arange(20, dtype=torch.float32).numpy().tobytes())
    for first, second in ((0, 10), (10, 0)):
        body = Op.dict((Op.data("a"), rebuild_v2(view("va", first), 0, (10,), (1,))),
                       (Op.data("b"), rebuild_v2(view("vb", second), 0, (10,), (1,))))
        path = tmp_path / f"views{first}.pt"
        path.write_bytes(legacy_file(pickle_of(body), [root], ["root"]))
        loaded = read_checkpoint(path).state_dict
        reference = torch.load(path, weights_only=True)
        assert all(torch.equal(loaded[k], v) for k, v in reference.items())
        assert loaded["a"][0].item() == float(first)


def test_an_archive_folder_named_code_is_no_torchscript(tmp_path):
    path = tmp_path / "code.pt"  # torch.save names the archive folder after the file: code/data.pkl
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(read_checkpoint(path).state_dict["w"], torch.ones(2))


def test_expanded_tensors_load_and_other_devices_get_each_storage_once(tmp_path):
    path = tmp_path / "expanded.pt"
    base = torch.arange(3.0).reshape(3, 1)
    torch.save({"e": base.expand(3, 4), "f": base.expand(3, 2)}, path)
    loaded = read_checkpoint(path).state_dict
    assert torch.equal(loaded["e"], base.expand(3, 4)) and loaded["e"].stride() == (1, 0)
    on_meta = read_checkpoint(path, map_location="meta").state_dict
    assert {t.device.type for t in on_meta.values()} == {"meta"}
    assert on_meta["e"].shape == (3, 4)


def test_protocol_0_escaped_names_get_the_same_policy(tmp_path):
    """``S'o\\x73'`` is ``os`` to CPython: the scan must read it so too, and refuse it as unsafe."""
    path = tmp_path / "escaped.pt"
    path.write_bytes(b"\x80\x02S'o\\x73'\nS'system'\n\x93S'true'\n\x85R.")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert type(info.value).__name__ == "UnsafeCheckpointError" and "os.system" in str(info.value)


# -- devices: every spelling of the CPU reads every container (issue 11's first bug) ----------------
@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "state_dict", "safetensors"])
@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu"), torch.device("cpu", 0)], ids=str)
def test_cpu_spellings_read_every_container(write_encoder, container, device):
    """``cpu:0`` used to fail every entry as "truncated or damaged: download it again"."""
    from pool import ImageEncoder

    path, module = write_encoder(container)
    expected = module.state_dict()
    for mmap in (None, False):
        state = read_checkpoint(path, map_location=device, mmap=mmap).state_dict
        assert all(torch.equal(state[k], v) and state[k].device.type == "cpu" for k, v in expected.items())
    assert ImageEncoder.load(path, device=device).model.visual.conv1.weight.device.type == "cpu"


@pytest.mark.parametrize("bad", [{"cuda:0": 3}, 3, "not-a-device", ["cpu"]], ids=str)
def test_a_bad_map_location_is_an_argument_error_not_a_damaged_file(write_encoder, bad):
    path, _ = write_encoder("zip")
    with pytest.raises(ValueError, match="map_location") as info:
        read_checkpoint(path, map_location=bad)
    assert not isinstance(info.value, CheckpointError)
