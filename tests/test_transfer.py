"""Bulk reads (pool.transfer), the zip parser's index and the pickle scan's memo-index check."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.checkpoint import read_checkpoint
from pool.containers.safetensors_file import safetensors_entries
from pool.containers.torchzip import open_archive
from pool.errors import CorruptCheckpointError
from pool.pickle_scan import scan_pickle
from pool.tensors import StorageRef, TensorSpec, materialize
from pool.transfer import Span, read_spans


@settings(max_examples=examples(30), deadline=None)
@given(data=st.binary(min_size=1, max_size=5000),
       spans=st.lists(st.tuples(st.integers(0, 4999), st.integers(0, 300)), min_size=1, max_size=12))
def test_read_spans_returns_exactly_the_file_bytes(tmp_path_factory, data, spans):
    path = tmp_path_factory.mktemp("spans") / "blob.bin"
    path.write_bytes(data)
    spans = [Span(min(o, len(data)), min(n, len(data) - min(o, len(data)))) for o, n in spans]
    storages = read_spans(path, spans, "cpu")
    for span, storage in zip(spans, storages, strict=True):
        assert storage.nbytes() == span.nbytes
        got = torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes() if span.nbytes else b""
        assert got == data[span.offset:span.offset + span.nbytes]


def test_misaligned_storages_are_copied_once_aligned():
    raw = torch.arange(0, 40, dtype=torch.uint8)
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    raw[1:13] = values.view(torch.uint8)
    storage = raw.untyped_storage()[1:13]  # a float32 view starting at an odd address
    spec = TensorSpec(StorageRef("0", torch.uint8, 12), torch.float32, 0, (3,), (1,))
    tensor = materialize({"w": spec}, {"0": storage}, "t.pt", 40)["w"]
    assert torch.equal(tensor, values)
    assert tensor.untyped_storage().data_ptr() % 4 == 0


@pytest.mark.parametrize("container", ["zip", "state_dict", "safetensors"])
def test_no_mmap_bulk_read_equals_the_mapped_read(write_encoder, container):
    path, module = write_encoder(container)
    mapped = read_checkpoint(path)
    bulk = read_checkpoint(path, mmap=False)
    assert list(bulk.state_dict) == list(mapped.state_dict)
    for key, value in mapped.state_dict.items():
        assert torch.equal(bulk.state_dict[key], value), key
    # the bulk read owns its memory: writing to it leaves the file and the mapping alone
    first = next(iter(bulk.state_dict.values()))
    first.add_(1)
    assert torch.equal(read_checkpoint(path).state_dict[next(iter(bulk.state_dict))],
                       next(iter(mapped.state_dict.values())))


def test_bulk_read_keeps_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    state = {"whole": base, "rows": base[2:5], "column": base[:, 1]}
    path = tmp_path / "views.pt"
    torch.save(state, path)
    loaded = read_checkpoint(path, mmap=False).state_dict
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
    assert loaded["rows"].untyped_storage().data_ptr() == loaded["whole"].untyped_storage().data_ptr()
    loaded["whole"][3, 1] = 42.0
    assert loaded["rows"][1, 1] == 42.0 and loaded["column"][3] == 42.0


def test_zip_parser_agrees_with_zipfile_on_real_files(write_encoder):
    zip_path, module = write_encoder("state_dict")
    raw = zip_path.read_bytes()
    archive = open_archive(memoryview(raw), str(zip_path))
    with zipfile.ZipFile(zip_path) as zf:
        assert list(archive.archive.members) == zf.namelist()
        for info in zf.infolist():
            member = archive.archive.members[info.filename]
            assert raw[member.offset:member.offset + member.size] == zf.read(info)
        storages = {name.split("/data/", 1)[1]: zf.read(name) for name in zf.namelist() if "/data/" in name}
    # the storage records, by key: one per tensor, each the bytes zipfile reads for that record
    assert len(archive.records) == len(module.state_dict())
    assert {k: raw[r.offset:r.offset + r.size] for k, r in archive.records.items()} == storages
    st_path, _ = write_encoder("safetensors")
    entries, _ = safetensors_entries(st_path)
    assert {e.name for e in entries} == set(module.state_dict())


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scan_accepts_real_pickles(protocol):
    obj = {"a": [1, 2, "x" * 300, b"y" * 70000], "b": (1.5, None, True, 2**70), "c": {"d": "e"}}
    data = pickle.dumps(obj, protocol=protocol)
    assert scan_pickle(data).end == len(data)
    with pytest.raises(CorruptCheckpointError, match="without a STOP"):
        scan_pickle(data[:-1])  # no STOP: truncated


@pytest.mark.parametrize("bomb", [b"\x80\x04}r" + (0x08000000).to_bytes(4, "little") + b".",
                                  b"(dp1000000000000\n.", b"}p5\n."])
def test_scan_refuses_memo_indices_no_pickler_writes(bomb):
    with pytest.raises(CorruptCheckpointError, match="memo index"):
        scan_pickle(bomb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "state_dict", "safetensors"])
def test_cuda_reads_equal_cpu_reads(write_encoder, container):
    path, module = write_encoder(container)
    on_gpu = read_checkpoint(path, map_location="cuda").state_dict
    for key, value in module.state_dict().items():
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value), key


class _FakeEvent:
    def synchronize(self) -> None:
        pass

    def record(self, stream=None) -> None:
        pass


class _FakeStream:
    def __init__(self, device=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def test_cuda_ring_logic_on_the_cpu(tmp_path, monkeypatch):
    """The pinned-ring pipeline of the CUDA path, run with CPU stand-ins for streams and events and
    tiny buffers so that many chunks cycle through the ring, including gaps between regions."""
    import contextlib

    from pool import transfer

    monkeypatch.setattr(transfer, "_CHUNK", 64)
    monkeypatch.setattr(transfer, "_RING", 3)
    monkeypatch.setattr(transfer, "_PIECE", 16)
    monkeypatch.setattr(transfer, "_MERGE_GAP", 8)
    ring = [(torch.empty(64, dtype=torch.uint8), _FakeEvent()) for _ in range(3)]
    monkeypatch.setattr(transfer, "_staging_ring", lambda device: ring)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    data = bytes(range(256)) * 8
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    spans = [Span(5, 300), Span(310, 7), Span(700, 500), Span(1500, 1), Span(1600, 400)]
    regions = transfer._regions(spans)
    assert len(regions) == 4  # the 3-byte gap is bridged, the larger ones are not
    target = torch.zeros(sum(b - a for a, b in regions), dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        transfer._fill_cuda(fd, regions, target)
    finally:
        os.close(fd)
    expected = b"".join(data[a:b] for a, b in regions)
    assert target.numpy().tobytes() == expected


def test_bulk_read_moves_only_the_state_dicts_records(tmp_path, monkeypatch):
    """A training checkpoint's optimizer state is not read onto the device with the weights."""
    from pool import transfer

    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    path = tmp_path / "train.pt"
    torch.save({"state_dict": weights, "optimizer": {"exp_avg": torch.randn(4096, 64)}}, path)
    seen = []
    real = transfer.read_spans

    def spy(p, spans, device):
        seen.extend(spans)
        return real(p, spans, device)

    monkeypatch.setattr("pool.containers.torchzip.read_spans", spy)
    loaded = read_checkpoint(path, mmap=False)
    assert set(loaded.state_dict) == {"w", "b"} and loaded.wrapper == "state_dict"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in weights.items())
    # what was moved is exactly the two weight records' bytes: not the optimizer's, nor a slice of it
    raw = path.read_bytes()
    moved = sorted(raw[s.offset:s.offset + s.nbytes] for s in seen)
    assert moved == sorted(v.numpy().tobytes() for v in weights.values())
