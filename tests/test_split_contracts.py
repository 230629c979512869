"""What the split into small modules (docs/design.md §1) must not have changed: found by a review of
the split, each reproduced against the code before it.

- `ImageEncoder.load` / `from_checkpoint` and `ClassificationHead.load` hand on through the class's
  own classmethods, so a subclass that overrides one takes part;
- FusionBench's per-split dataset names are real methods, and the iterators go through them;
- messages keep the logger names they always had;
- importing the pool does not import hydra (only Hydra entries need it);
- a tunable lives in one module: no copy re-exported by a façade that patching would miss.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pool.arch
import pool.cache
from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool
from pool.synth import make_original_head, save_state_dict


class _Recorded(ImageEncoder):
    calls: list[str] = []

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, **kwargs: Any) -> ImageEncoder:
        cls.calls.append("from_checkpoint")
        return super().from_checkpoint(checkpoint, **kwargs)

    @classmethod
    def from_state_dict(cls, state_dict: Any, **kwargs: Any) -> ImageEncoder:
        cls.calls.append("from_state_dict")
        return super().from_state_dict(state_dict, **kwargs)


class _RecordedHead(ClassificationHead):
    calls: list[str] = []

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, **kwargs: Any) -> ClassificationHead:
        cls.calls.append("from_checkpoint")
        return super().from_checkpoint(checkpoint, **kwargs)


def test_encoder_load_goes_through_a_subclass_overrides(write_encoder) -> None:
    path, _ = write_encoder("zip")
    _Recorded.calls = []
    encoder = _Recorded.load(path)
    assert type(encoder) is _Recorded
    assert _Recorded.calls == ["from_checkpoint", "from_state_dict"]


def test_head_load_goes_through_a_subclass_override(write_head) -> None:
    path, _ = write_head("zip")
    _RecordedHead.calls = []
    head = _RecordedHead.load(path)
    assert type(head) is _RecordedHead
    assert _RecordedHead.calls == ["from_checkpoint"]


def test_dataset_names_are_methods_and_the_iterators_use_them() -> None:
    for split in ("train", "val", "test"):
        method = getattr(OpenCLIPVisionModelPool, f"load_{split}_dataset")
        assert inspect.isfunction(method) and method.__doc__
        assert inspect.isfunction(getattr(OpenCLIPVisionModelPool, f"{split}_datasets"))

    class Overridden(OpenCLIPVisionModelPool):
        def load_train_dataset(self, name: str, *args: Any, **kwargs: Any) -> str:
            return f"overridden:{name}"

    pool = Overridden(models={}, train_datasets={"a": "no/such/dataset"})
    assert list(pool.train_datasets()) == ["overridden:a"]
    assert inspect.ismethod(pool.load_train_dataset)


def test_head_without_a_flag_logs_under_pool_modeling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    head = make_original_head(3, 8, seed=1)
    path = tmp_path / "head_sd.pt"
    save_state_dict(head.state_dict(), path, "torch")
    with caplog.at_level(logging.INFO, logger="pool"):
        ClassificationHead.load(path)
    assert [r.name for r in caplog.records if "no normalize flag" in r.getMessage()] == ["pool.modeling"]


def test_importing_the_pool_does_not_import_hydra() -> None:
    code = ("import sys; from pool import OpenCLIPVisionModelPool; import pool.checkpoint, pool.verify; "
            "print(sorted(m for m in ('hydra', 'hydra.utils') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_no_facade_holds_a_copy_of_a_tunable() -> None:
    """``pool.cache.RACY_SECONDS`` or ``pool.arch.MAX_LAYERS`` set by a user would be silently ignored
    if the façades re-exported copies: they do not, so such a patch fails loudly instead."""
    assert not hasattr(pool.cache, "RACY_SECONDS")
    assert not hasattr(pool.arch, "MAX_LAYERS")
