"""The load path onto the GPU (issue 15): overlapped bulk reads from several threads, and the
encoder build (assignment, placement). The CUDA tests skip without a GPU; the rest run the same
logic on the CPU (``TransferSettings.stage_cpu`` routes CPU reads through the staging ring)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from pool import transfer
from pool.checkpoint import read_checkpoint
from pool.modeling import ImageEncoder, place_module

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Settings that make even a tiny file many chunks cycling through a small ring."""
    def use(**changes):
        monkeypatch.setattr(transfer, "_settings", transfer.TransferSettings(
            **{"chunk": 4096, "ring": 3, "threads": 3, **changes}))
    return use


@pytest.mark.parametrize("staged", [False, True])
def test_reads_from_several_threads_at_once(write_encoder, tiny_chunks, staged):
    """Overlapped reads started from 4 threads together (one staging ring: they take turns) each
    get their own bytes; afterwards no read runs and the switch interval is what it was."""
    tiny_chunks(stage_cpu=staged)
    path, module = write_encoder("zip")
    expected = module.state_dict()
    before = sys.getswitchinterval()
    errors, results = [], []

    def load() -> None:
        try:
            for _ in range(3):
                results.append(read_checkpoint(path, mmap=False).state_dict)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for state in results:
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert transfer.active_reads() == 0 and sys.getswitchinterval() == before


def _force_torch_loading(monkeypatch) -> None:
    from pool import modeling

    monkeypatch.setattr(modeling, "_loads_its_own_way", lambda module: True)


def test_fast_assignment_builds_what_load_state_dict_builds(write_encoder, monkeypatch):
    """The build assigns the tensors itself (no load_state_dict walk) where no module has hooks of
    its own: the same parameters (Parameter objects, requires_grad), buffers, the very tensors
    read (not copies), and the same features, as torch's load_state_dict(assign=True)."""
    path, _ = write_encoder("zip")
    ckpt = read_checkpoint(path)
    fast = ImageEncoder.from_checkpoint(ckpt)
    with monkeypatch.context() as m:
        _force_torch_loading(m)
        calls = []
        real = nn.Module.load_state_dict
        m.setattr(nn.Module, "load_state_dict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
        slow = ImageEncoder.from_checkpoint(ckpt)
        assert calls  # the fallback did use torch's loading
    named = {n: t for n, t in [*fast.named_parameters(), *fast.named_buffers()]}
    other = {n: t for n, t in [*slow.named_parameters(), *slow.named_buffers()]}
    assert list(named) == list(other)
    for name, tensor in named.items():
        twin = other[name]
        assert type(tensor) is type(twin) and tensor.requires_grad == twin.requires_grad, name
        assert tensor.data_ptr() == twin.data_ptr(), name  # both are the tensors read, assigned
    assert list(fast.state_dict()) == list(slow.state_dict())
    images = torch.randn(2, 3, fast.arch.image_size, fast.arch.image_size)
    with torch.no_grad():
        assert torch.equal(fast(images), slow(images))


def test_a_text_side_the_file_lacks_is_dropped_either_way(write_encoder, monkeypatch):
    path, module = write_encoder("zip")
    sd = {k: v for k, v in module.state_dict().items() if "ln_final" not in k and "text_projection" not in k}
    fast = ImageEncoder.from_state_dict(sd)
    _force_torch_loading(monkeypatch)
    slow = ImageEncoder.from_state_dict(sd)
    assert list(fast.state_dict()) == list(slow.state_dict()) == list(sd)
    assert not hasattr(fast.model, "ln_final")


def test_placing_an_encoder_already_in_place_does_not_walk_it(write_encoder, monkeypatch):
    path, _ = write_encoder("zip")
    encoder = ImageEncoder.load(path)
    moved = []
    real = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moved.append(k) or real(self, *a, **k))
    assert place_module(encoder, "cpu", None) is encoder and place_module(encoder, "cpu", "float32") is encoder
    assert not moved
    halved = place_module(encoder, torch.device("cpu"), "bf16")
    assert moved and all(p.dtype == torch.bfloat16 for p in halved.parameters())
    with pytest.raises(RuntimeError):
        place_module(encoder, "no-such-device", None)


@needs_cuda
@pytest.mark.parametrize("overlap", [True, False])
def test_cuda_overlapped_read_equals_the_cpu_read(write_encoder, tiny_chunks, monkeypatch, overlap):
    from pool.containers import torchzip

    monkeypatch.setattr(torchzip, "OVERLAP", overlap)
    tiny_chunks()
    path, module = write_encoder("zip")
    before = sys.getswitchinterval()
    on_gpu = read_checkpoint(path, map_location="cuda").state_dict
    for key, value in module.state_dict().items():
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value), key
    encoder = ImageEncoder.load(path, device="cuda")
    assert all(p.is_cuda for p in encoder.parameters())
    assert transfer.active_reads() == 0 and sys.getswitchinterval() == before


@needs_cuda
def test_cuda_reads_from_several_threads_at_once(write_encoder, tiny_chunks):
    tiny_chunks()
    path, module = write_encoder("zip")
    expected = {k: v.cuda() for k, v in module.state_dict().items()}
    errors, results = [], []

    def load() -> None:
        try:
            for _ in range(3):
                state = read_checkpoint(path, map_location="cuda").state_dict
                results.append(all(torch.equal(state[k], v) for k, v in expected.items()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [True] * 12
    assert transfer.active_reads() == 0


@needs_cuda
def test_cuda_compaction_of_unused_records(tmp_path):
    weights = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    path = tmp_path / "train.pt"
    torch.save({"state_dict": weights, "optimizer": {"exp_avg": torch.randn(4096, 64)}}, path)
    loaded = read_checkpoint(path, map_location="cuda").state_dict
    assert all(loaded[k].is_cuda and torch.equal(loaded[k].cpu(), v) for k, v in weights.items())


def test_the_load_strategies_benchmark_runs(tmp_path):
    """benchmarks/gpu_load_strategies.py --smoke (CPU, a tiny ViT, seconds): every variant runs
    and reads the right bytes, so the one GPU run it is written for does not fail on a typo."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_load_strategies.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = json.loads((tmp_path / "gpu_load_strategies.json").read_text())["variants"]
    assert len(variants) > 20
    assert not [name for name, v in variants.items() if "error" in v or v.get("ok") is False]
