"""First end-to-end checks of the reader: every container gives the module's own state dict."""

from __future__ import annotations

import pytest
import torch

from pool.checkpoint import read_checkpoint


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "state_dict", "safetensors"])
def test_every_container_gives_the_modules_state_dict(write_encoder, container):
    path, module = write_encoder(container)
    ckpt = read_checkpoint(path)
    expected = module.state_dict()
    if container == "safetensors":  # safetensors stores keys sorted, not in module order
        assert sorted(ckpt.state_dict) == sorted(expected)
    else:
        assert list(ckpt.state_dict) == list(expected)
    for key, value in expected.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert ckpt.container == {"state_dict": "zip"}.get(container, container)


@pytest.mark.parametrize("container", ["zip", "pickle"])
def test_head_keeps_normalize_flag(write_head, container):
    path, head = write_head(container, normalize=False)
    ckpt = read_checkpoint(path)
    assert ckpt.attributes["normalize"] is False
    assert torch.equal(ckpt.state_dict["weight"], head.weight.detach())
    assert ckpt.root_type == "src.modeling.ClassificationHead"


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
def test_globals_include_the_storage_classes(write_encoder, container):
    """torch resolves storage class names itself; the reader still lists them (inspect shows them)."""
    path, _ = write_encoder(container)
    names = {str(g) for g in read_checkpoint(path).globals}
    assert "torch.FloatStorage" in names
    assert "src.modeling.ImageEncoder" in names
