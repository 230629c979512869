"""The encoder build: tensors assigned in one walk where no module loads its own way (the same
result as torch's ``load_state_dict(assign=True)``), and no ``Module.to`` walk for an encoder
already where it should be."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pool.checkpoint import read_checkpoint
from pool.modeling import ImageEncoder, place_module


def _force_torch_loading(monkeypatch) -> None:
    from pool import assign

    monkeypatch.setattr(assign, "_loads_its_own_way", lambda module: True)


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
