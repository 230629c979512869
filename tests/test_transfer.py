"""Bulk reads (pool.transfer), the zip parser's index and the pickle scan's memo-index check."""

from __future__ import annotations

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


def _bytes_of(storage: torch.UntypedStorage) -> bytes:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).cpu().numpy().tobytes()


@settings(max_examples=examples(40), deadline=None)
@given(data=st.binary(min_size=1, max_size=3000),
       spans=st.lists(st.tuples(st.integers(0, 2999), st.integers(0, 400)), min_size=1, max_size=10),
       keep=st.lists(st.integers(0, 9), max_size=10), chunk=st.integers(1, 200), ring=st.integers(1, 5),
       threads=st.integers(1, 4), staged=st.booleans())
def test_pending_reads_keep_exactly_the_wanted_bytes(tmp_path_factory, data, spans, keep, chunk, ring, threads,
                                                      staged):
    """Any chunk size, ring and thread count, staged or straight: each kept span's storage holds its
    file bytes (the chunks of spans no longer wanted may be skipped, the buffer compacted)."""
    from pool import transfer

    path = tmp_path_factory.mktemp("pending") / "blob.bin"
    path.write_bytes(data)
    spans = [Span(min(o, len(data)), min(n, len(data) - min(o, len(data)))) for o, n in spans]
    keep = [k for k in keep if k < len(spans)]
    options = transfer.TransferSettings(chunk=chunk, ring=ring, threads=threads, stage_cpu=staged)
    pending = transfer.start_read(path, spans, "cpu", settings=options)
    storages = pending.result(keep)
    assert [_bytes_of(s) for s in storages] == [data[spans[k].offset:spans[k].offset + spans[k].nbytes] for k in keep]
    assert transfer.active_reads() == 0


def test_staged_ring_on_the_cpu(tmp_path, monkeypatch):
    """The CUDA path's pipeline (staging ring, one slot group per worker, a copy per chunk), run on
    the CPU with tiny buffers so that many chunks cycle through the ring, gaps between regions too."""
    from pool import transfer

    monkeypatch.setattr(transfer, "_MERGE_GAP", 8)
    data = bytes(range(256)) * 8
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    spans = [Span(5, 300), Span(310, 7), Span(700, 500), Span(1500, 1), Span(1600, 400)]
    options = transfer.TransferSettings(chunk=64, ring=3, threads=2, stage_cpu=True)
    for storages in (transfer.read_spans(path, spans, "cpu", settings=options),
                     transfer.start_read(path, spans, "cpu", settings=options).result()):
        assert [_bytes_of(s) for s in storages] == [data[s.offset:s.offset + s.nbytes] for s in spans]
    assert len(transfer._regions(spans)) == 4  # the 3-byte gap is bridged, the larger ones are not


def test_regions_are_placed_at_their_file_alignment(tmp_path):
    """A storage 64-byte aligned in the file is aligned in the buffer, whatever precedes it."""
    from pool import transfer

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(8 << 20))
    spans = [Span(3, 5), Span((2 << 20) + 64, 4096), Span((5 << 20) + 128 + 7, 100)]
    storages = transfer.read_spans(path, spans, "cpu")
    assert storages[1].data_ptr() % 64 == 0 and storages[2].data_ptr() % 64 == 7


def test_a_short_file_is_reported_by_result(tmp_path):
    from pool import transfer

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(1000))
    pending = transfer.start_read(path, [Span(0, 500), Span(900, 300)], "cpu")
    with pytest.raises(transfer.FileChangedError, match="ended 200 bytes early"):
        pending.result()
    assert transfer.active_reads() == 0 and pending._buffer is None


def test_cancel_stops_the_read_and_drops_the_buffer(tmp_path):
    import sys

    from pool import transfer

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(4 << 20))
    before = sys.getswitchinterval()
    options = transfer.TransferSettings(chunk=4096, threads=2, switch_interval=before / 10)
    pending = transfer.start_read(path, [Span(0, 4 << 20)], "cpu", settings=options)
    assert sys.getswitchinterval() <= before / 10 or transfer.active_reads() == 0  # lowered while it runs
    pending.cancel()
    assert transfer.active_reads() == 0 and pending._buffer is None and pending._fd == -1
    assert sys.getswitchinterval() == before
    pending.cancel()  # again: nothing to do
    with pytest.raises(RuntimeError, match="cancelled"):
        pending.result()


def test_settings_are_checked_and_restored():
    from pool import transfer

    with pytest.raises(ValueError, match="chunk"):
        transfer.configure(chunk=0)
    with pytest.raises(TypeError):
        transfer.configure(pieces=3)
    old = transfer.configure(ring=4, switch_interval=None)
    try:
        assert transfer.settings().ring == 4 and transfer.settings().switch_interval is None
    finally:
        transfer.configure(**vars(old))
    assert transfer.settings() == old


def _training_checkpoint(path):
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save({"state_dict": weights, "optimizer": {"exp_avg": torch.randn(4096, 64)}}, path)
    return weights


@pytest.mark.parametrize("overlap", [True, False])
def test_bulk_read_keeps_only_the_state_dicts_records(tmp_path, monkeypatch, overlap):
    """A training checkpoint's optimizer state is not kept with the weights: without the overlap it
    is not even read; with it, the weights are copied out of the speculative buffer."""
    from pool import transfer
    from pool.containers import torchzip

    monkeypatch.setattr(torchzip, "OVERLAP", overlap)
    path = tmp_path / "train.pt"
    weights = _training_checkpoint(path)
    seen = []
    real = transfer.read_spans

    def spy(p, spans, device):
        seen.extend(spans)
        return real(p, spans, device)

    monkeypatch.setattr("pool.containers.torchzip.read_spans", spy)
    loaded = read_checkpoint(path, mmap=False)
    assert set(loaded.state_dict) == {"w", "b"} and loaded.wrapper == "state_dict"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in weights.items())
    if overlap:
        assert not seen
    else:  # what was moved is exactly the two weight records' bytes: not the optimizer's, nor a slice of it
        raw = path.read_bytes()
        moved = sorted(raw[s.offset:s.offset + s.nbytes] for s in seen)
        assert moved == sorted(v.numpy().tobytes() for v in weights.values())


def test_overlapped_read_compacts_away_unused_records(tmp_path, monkeypatch):
    from pool import transfer
    from pool.containers import torchzip

    path = tmp_path / "train.pt"
    weights = _training_checkpoint(path)
    made, compacted = [], []
    real_start, real_compact = transfer.start_read, transfer._compact
    monkeypatch.setattr(torchzip, "start_read", lambda *a, **k: made.append(real_start(*a, **k)) or made[-1])
    monkeypatch.setattr(transfer, "_compact", lambda *a: compacted.append(real_compact(*a)) or compacted[-1])
    loaded = read_checkpoint(path, mmap=False).state_dict
    assert len(made) == 1 and made[0]._buffer is None  # handed over
    assert sum(r.nbytes for r in made[0]._spans) > (1 << 20)  # every data member was started...
    (buffer, layout), = compacted  # ...and the weights copied into a buffer of their own
    assert buffer.numel() < 64 * 64 * 4 + 64 * 4 + 128
    for key, value in weights.items():
        assert torch.equal(loaded[key], value)
        start = loaded[key].untyped_storage().data_ptr() - buffer.data_ptr()
        assert 0 <= start < buffer.numel()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_file_refused_during_the_overlapped_read_leaves_nothing_behind(tmp_path, monkeypatch, device):
    """The data members start travelling before the pickle is read; a pickle naming os.system is
    refused all the same, and when the error arrives no worker runs and no buffer is referenced."""
    import gc
    import sys
    import weakref

    from redteam_files import Op, pickle_of, torch_zip

    from pool import transfer
    from pool.containers import torchzip
    from pool.errors import UnsafeCheckpointError

    path = tmp_path / "evil.pt"
    body = Op.dict((Op.str("w"), Op.call(Op.glob("os", "system"), Op.str("true"))))
    path.write_bytes(torch_zip(pickle_of(body), {str(i): bytes(1 << 20) for i in range(8)}))
    monkeypatch.setattr(transfer, "_settings", transfer.TransferSettings(chunk=64 << 10, threads=2))
    made = []
    real = transfer.start_read

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        buffers.append(weakref.ref(made[-1]._buffer))
        return made[-1]

    buffers: list = []
    monkeypatch.setattr(torchzip, "start_read", spy)
    before = sys.getswitchinterval()
    with pytest.raises(UnsafeCheckpointError, match="os.system") as caught:
        read_checkpoint(path, map_location=device, mmap=False)
    assert len(made) == 1 and transfer.active_reads() == 0
    assert made[0]._buffer is None and made[0]._fd == -1 and sys.getswitchinterval() == before
    gc.collect()
    assert buffers[0]() is None, "the device buffer outlived the refusal"
    assert caught.value is not None


@pytest.mark.parametrize("container", ["zip", "state_dict"])
@pytest.mark.parametrize("staged", [False, True])
def test_overlapped_reads_equal_the_mapped_read(write_encoder, monkeypatch, container, staged):
    from pool import transfer

    monkeypatch.setattr(transfer, "_settings", transfer.TransferSettings(chunk=4096, ring=4, threads=3,
                                                                         stage_cpu=staged))
    path, module = write_encoder(container)
    mapped = read_checkpoint(path).state_dict
    bulk = read_checkpoint(path, mmap=False).state_dict
    assert list(bulk) == list(mapped)
    assert all(torch.equal(bulk[k], v) for k, v in mapped.items())
    assert transfer.active_reads() == 0
