"""Bad input (docs/design.md §5): each failure is a CheckpointError subclass (FileNotFoundError too
for a missing path) whose message names the file and says what is wrong and what to do; never a
bare torch RuntimeError, never a hang."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import SMALL_ARCH, edit_data_pkl, qualname, run_isolated

from pool import synth
from pool.checkpoint import load_state_dict, read_checkpoint, sniff_container
from pool.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from pool.synth import save_object


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one small encoder in every container (written once for the module)."""
    root = tmp_path_factory.mktemp("good")
    module = synth.make_original_encoder(SMALL_ARCH, seed=4)
    out = {}
    for container in synth.ENCODER_CONTAINERS:
        out[container] = synth.save_module(module, root / container, container).read_bytes()
    out["state_dict"] = synth.save_state_dict(module.state_dict(), root / "sd").read_bytes()
    out["safetensors"] = synth.save_state_dict(module.state_dict(), root / "st",
                                               "safetensors").read_bytes()
    return out


def expect_error(path: Path, cls: type[Exception] = CorruptCheckpointError, *hints: str) -> Exception:
    """Both entry points raise `cls`; its message names the file and contains every hint."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    err = info.value
    assert isinstance(err, cls), (type(err), err)
    message = str(err)
    assert str(path) in message
    for hint in hints:
        assert hint.lower() in message.lower(), (hint, message)
    assert "Traceback" not in message
    with pytest.raises(cls):
        load_state_dict(path)
    return err


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- not a checkpoint at all ----------------------------------------------------------------------
def test_empty_file(tmp_path):
    expect_error(write(tmp_path, "finetuned.pt", b""), CorruptCheckpointError, "empty", "download")


def test_text_file(tmp_path):
    path = write(tmp_path, "finetuned.pt", b"hello, these are not the weights\nsecond line\n")
    expect_error(path, CorruptCheckpointError, "text", "hello")


@pytest.mark.parametrize("pad", range(10))
def test_text_file_cut_inside_a_multibyte_character(tmp_path, pad):
    """The first 200 bytes of a UTF-8 text (what the reader looks at) may end mid-character: still
    recognised as text. The 10-byte line puts the cut at every offset of it, so inside the
    3-byte euro sign for two of the pads."""
    data = ("x" * pad + "poids € " * 80).encode()
    if pad in (2, 3):  # the premise: the 200-byte head does end inside the euro sign
        with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
            data[:200].decode("utf-8")
    expect_error(write(tmp_path, "finetuned.pt", data), CorruptCheckpointError, "text file")


def test_json_file_with_brace_at_byte_8_is_text_not_safetensors(tmp_path):
    path = write(tmp_path, "model.safetensors", b'{"a": 1,{"nested": true}}\n' * 4)
    assert path.read_bytes()[8:9] == b"{"
    expect_error(path, CorruptCheckpointError, "text file")


@pytest.mark.parametrize("page", [
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
    b"\n  <html>\n<body>Access denied</body></html>",
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
])
def test_html_error_page_saved_as_pt(tmp_path, page):
    path = write(tmp_path, "finetuned.pt", page)
    expect_error(path, CorruptCheckpointError, "HTML", "download")


def test_git_lfs_pointer(tmp_path):
    pointer = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               b"size 351434795\n")
    expect_error(write(tmp_path, "zeroshot.pt", pointer), CorruptCheckpointError, "LFS", "git lfs pull")


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes(tmp_path, seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(4096))
    if data[:1] == b"\x80" or data[:2] == b"PK" or data[8:9] == b"{":
        data = b"\x00" + data  # keep it obviously-not-a-container: that is the case under test
    expect_error(write(tmp_path, "finetuned.pt", data), CorruptCheckpointError, "not a known checkpoint")


def test_random_bytes_after_a_pickle_header(tmp_path):
    data = b"\x80\x04" + bytes(random.Random(9).randrange(256) for _ in range(2048))
    expect_error(write(tmp_path, "f.pt", data), CheckpointError, "download it again")


def test_tar_archive(tmp_path):
    import tarfile

    src = write(tmp_path, "inner.bin", b"x" * 100)
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="storages")
    expect_error(path, CheckpointError, "tar")


def test_a_zip_that_is_no_torch_file(tmp_path):
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    expect_error(path, CorruptCheckpointError, "data.pkl")


def test_a_pickle_of_no_tensors(tmp_path):
    path = write(tmp_path, "f.pt", pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=4))
    err = expect_error(path, CheckpointError, "no tensors")
    assert not isinstance(err, UnsafeCheckpointError)


# -- truncated downloads --------------------------------------------------------------------------
CUTS = [0.1, 0.5, 0.9, "len-1"]


def _cut(data: bytes, where) -> bytes:
    n = len(data) - 1 if where == "len-1" else int(len(data) * where)
    return data[:n]


@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize("form", ["zip", "state_dict"])
def test_truncated_zip(tmp_path, good_files, form, where):
    path = write(tmp_path, "finetuned.pt", _cut(good_files[form], where))
    expect_error(path, CorruptCheckpointError, "truncated", "download it again")


@pytest.mark.parametrize("where", CUTS + [0.01, 0.3])
def test_truncated_legacy(tmp_path, good_files, where):
    path = write(tmp_path, "finetuned.pt", _cut(good_files["legacy"], where))
    expect_error(path, CorruptCheckpointError, "download it again")


@pytest.mark.parametrize("where", CUTS + [0.01, 0.3])
def test_truncated_plain_pickle(tmp_path, good_files, where):
    path = write(tmp_path, "finetuned.pt", _cut(good_files["pickle"], where))
    expect_error(path, CorruptCheckpointError, "download it again")


@pytest.mark.parametrize("where", CUTS + [0.001])
def test_truncated_safetensors(tmp_path, good_files, where):
    path = write(tmp_path, "finetuned.safetensors", _cut(good_files["safetensors"], where))
    expect_error(path, CorruptCheckpointError, "truncated", "download it again")


def test_safetensors_with_a_corrupt_header(tmp_path, good_files):
    data = bytearray(good_files["safetensors"])
    (header_len,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + header_len]
    header[len(header) // 2:len(header) // 2 + 6] = b"\xff\x00]]}{"
    data[8:8 + header_len] = header
    expect_error(write(tmp_path, "f.safetensors", bytes(data)), CorruptCheckpointError, "download it again")


def test_safetensors_header_pointing_past_the_data(tmp_path, good_files):
    data = good_files["safetensors"]
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**9]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = write(tmp_path, "f.safetensors", struct.pack("<Q", len(blob)) + blob + data[8 + header_len:])
    expect_error(path, CorruptCheckpointError, "download it again")


def test_safetensors_header_length_beyond_the_file(tmp_path):
    path = write(tmp_path, "f.safetensors", struct.pack("<Q", 10**12) + b'{"a": 1}' + b" " * 40)
    expect_error(path, CorruptCheckpointError, "truncated")


# -- tensors that claim more than their storage ---------------------------------------------------
def _seven_floats(container: str) -> bytes:
    return save_object({"w": torch.arange(7, dtype=torch.float32)}, io.BytesIO(), container).getvalue()


def _grow_size(pkl: bytes) -> bytes:
    # the size tuple (7,) is BININT1 7, TUPLE1; the storage's own numel is followed by other opcodes
    assert pkl.count(b"K\x07\x85") == 1
    return pkl.replace(b"K\x07\x85", b"K\x3f\x85")  # ask for 63 elements of a 7-element storage


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle2", "pickle4"])
def test_tensor_larger_than_its_storage(tmp_path, container):
    data = _seven_floats(container)
    data = edit_data_pkl(data, _grow_size) if container == "zip" else _grow_size(data)
    path = write(tmp_path, "grown.pt", data)
    err = expect_error(path, CorruptCheckpointError, "storage", "download it again")
    assert "(63,)" in str(err)
    for mmap in (False, True):
        with pytest.raises(CorruptCheckpointError):
            read_checkpoint(path, mmap=mmap)


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle4"])
def test_tensor_offset_past_its_storage(tmp_path, container):
    def shift(pkl: bytes) -> bytes:  # storage offset 0 (BININT1 0) -> 5, with 7 elements needed
        assert pkl.count(b"QK\x00") == 1 or pkl.count(b"K\x00K\x07\x85") == 1
        return pkl.replace(b"K\x00K\x07\x85", b"K\x05K\x07\x85")

    data = _seven_floats(container)
    data = edit_data_pkl(data, shift) if container == "zip" else shift(data)
    path = write(tmp_path, "shifted.pt", data)
    expect_error(path, CorruptCheckpointError, "storage")


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_storage_numel_larger_than_the_file(tmp_path, container):
    """The storage record claims 2**40 elements: refused before torch allocates anything."""
    def grow(pkl: bytes) -> bytes:
        needle = b"K\x07t" if container == "zip" else b"K\x07Nt"
        assert pkl.count(needle) == 1
        return pkl.replace(needle, b"\x8a\x06\x00\x00\x00\x00\x00\x01" + needle[2:])

    data = _seven_floats(container)
    data = edit_data_pkl(data, grow) if container == "zip" else grow(data)
    path = write(tmp_path, "huge.pt", data)
    expect_error(path, CorruptCheckpointError, "bytes but only")


def test_negative_shape(tmp_path):
    data = _seven_floats("pickle4").replace(b"K\x07\x85", b"J\xf9\xff\xff\xff\x85")
    expect_error(write(tmp_path, "neg.pt", data), CorruptCheckpointError, "malformed shape")


# -- decompression bombs and cycles ---------------------------------------------------------------
def test_shared_reference_bomb_is_refused(tmp_path):
    """2**40 paths through 80 nested dicts: an unbounded walk would never end."""
    node = {"w": torch.zeros(1)}
    for _ in range(40):
        node = {"a": node, "b": node}
    path = write(tmp_path, "bomb.pt", pickle.dumps(node, protocol=4))
    assert path.stat().st_size < 4096
    expect_error(path, CorruptCheckpointError, "entries")


def test_shared_tuple_bomb_in_module_attributes(tmp_path):
    net = torch.nn.Linear(2, 2)
    value: tuple = (1,)
    for _ in range(60):
        value = (value, value)
    net.__dict__["config"] = value
    path = write(tmp_path, "tuple_bomb.pt", pickle.dumps(net, protocol=4))
    ckpt = read_checkpoint(path)
    assert set(ckpt.state_dict) == {"weight", "bias"}
    assert "config" not in ckpt.attributes


def test_self_referencing_state_dict(tmp_path):
    state: dict = {"w": torch.ones(2)}
    state["self"] = state
    path = write(tmp_path, "cycle.pt", pickle.dumps(state, protocol=4))
    expect_error(path, CorruptCheckpointError, "contains itself")


def test_self_referencing_module(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net._modules["loop"] = net
    path = write(tmp_path, "cycle_mod.pt", pickle.dumps(net, protocol=4))
    expect_error(path, CorruptCheckpointError, "contains itself")


# -- not a file -----------------------------------------------------------------------------------
def test_directory(tmp_path):
    folder = tmp_path / "ViT-B-32"
    folder.mkdir()
    (folder / "zeroshot.pt").write_bytes(b"")
    err = expect_error(folder, CheckpointError, "directory", "zeroshot.pt")
    assert not isinstance(err, FileNotFoundError)


def test_missing_path_lists_what_is_near(tmp_path):
    tree = tmp_path / "task_vectors_checkpoints" / "ViT-B-32"
    (tree / "Cars").mkdir(parents=True)
    (tree / "zeroshot.pt").write_bytes(b"x")
    (tree / "head_Cars.pt").write_bytes(b"x")
    missing = tree / "Cars" / "finetuned.pt"
    for call in (read_checkpoint, load_state_dict, sniff_container):
        with pytest.raises(FileNotFoundError) as info:
            call(missing)
        err = info.value
        assert isinstance(err, CheckpointError) and isinstance(err, CheckpointNotFoundError)
        assert str(missing) in str(err)
        assert err.filename == str(missing)


def test_missing_path_in_a_missing_folder_lists_the_nearest_existing_one(tmp_path):
    tree = tmp_path / "ckpts" / "ViT-B-32"
    tree.mkdir(parents=True)
    (tree / "zeroshot.pt").write_bytes(b"x")
    (tree / "head_DTD.pt").write_bytes(b"x")
    missing = tree / "SUN397" / "finetuned.pt"
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "zeroshot.pt" in message and "head_DTD.pt" in message
    assert str(tree) in message


def test_relative_missing_path_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zeroshot.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as info:
        read_checkpoint("finetuned.pt")
    assert str(tmp_path / "finetuned.pt") in str(info.value)
    assert "zeroshot.pt" in str(info.value)


def test_plain_pickle_with_a_mapping_map_location(tmp_path, good_files):
    """A mapping of saved locations works for a plain pickle as for the other containers; a bad
    one is the caller's mistake (a ConfigError, a ValueError), not a damaged file."""
    path = write(tmp_path, "f.pt", good_files["pickle"])
    expected = read_checkpoint(path).state_dict
    mapped = read_checkpoint(path, map_location={"cuda:0": "cpu"}).state_dict
    assert list(mapped) == list(expected)
    assert all(torch.equal(mapped[k], v) and mapped[k].device.type == "cpu" for k, v in expected.items())
    with pytest.raises(ConfigError, match="map_location") as info:
        read_checkpoint(path, map_location={"cuda:0": 3})
    assert isinstance(info.value, ValueError) and not isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("container", ["pickle", "legacy", "blob"])
def test_memo_index_bomb_allocates_nothing(tmp_path, container):
    """LONG_BINPUT 2**28: CPython's C unpickler would zero a 4 GB memo array (found by fuzzing);
    the reader's unpickler for these containers keeps its memo in a dict."""
    bomb = b"\x80\x02K\x01r" + (2**28).to_bytes(4, "little") + b"."
    if container == "pickle":
        data = bomb
    else:
        magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
        legacy = magic + pickle.dumps(1001, protocol=2) + info + bomb + pickle.dumps([], protocol=2)
        if container == "legacy":
            data = legacy
        else:  # the bomb inside a torch.storage._load_from_bytes blob of a plain pickle
            data = (b"\x80\x04ctorch.storage\n_load_from_bytes\nC" if len(legacy) < 256 else b"")
            assert data, "blob too long for SHORT_BINBYTES"
            data += bytes([len(legacy)]) + legacy + b"\x85R."
    path = write(tmp_path, "bomb.pt", data)
    read_checkpoint(write(tmp_path, "warm.pt", _seven_floats("legacy")))  # lazy imports: not the bomb's
    # In a forked child: its own peak RSS, which no earlier test in this process can have raised.
    # (Unbounded, the C unpickler would touch 4 GiB: the watchdog would end the child at 1.5 GiB.)
    report = run_isolated(read_checkpoint, path)
    assert report.kind == "raised", report
    assert qualname(CorruptCheckpointError) in report.exc["mro"], report.exc["tb"]
    assert str(path) in report.exc["message"]
    assert report.peak_extra < 64 << 20, f"the read of a {len(data)}-byte file peaked at +{report.peak_extra >> 20} MiB"
