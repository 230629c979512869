"""Errors get context by raising an amended copy, never by changing a raised exception; the CLI's
exit status comes from one policy (pool.cli.exit_status)."""

from __future__ import annotations

import pytest

import pool.modelpool as modelpool_module
from pool import OpenCLIPVisionModelPool
from pool.cli import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_status
from pool.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UsageError,
    amended,
)


def test_amended_copies_and_leaves_the_original_alone():
    original = UnsafeCheckpointError("x.pt: refused", ["os.system"], checkpoint_globals=["os.system"])
    new = amended(original, prefix="pool entry models.a: ", checkpoint_globals=["a.b", "os.system"])
    assert type(new) is UnsafeCheckpointError and new is not original
    assert str(new) == "pool entry models.a: x.pt: refused" and new.globals == ["os.system"]
    assert new.checkpoint_globals == ["a.b", "os.system"]
    assert str(original) == "x.pt: refused" and original.checkpoint_globals == ["os.system"]


def test_amended_os_error_prefixes_its_strerror():
    original = CheckpointNotFoundError(2, "no such file", "/x.pt")
    new = amended(original, prefix="pool entry models.a: ")
    assert isinstance(new, FileNotFoundError) and new.filename == "/x.pt"
    assert new.strerror == "pool entry models.a: no such file" and original.strerror == "no such file"


def test_a_pool_load_raises_a_new_error_and_keeps_the_readers_one(monkeypatch, tmp_path):
    raised: list[BaseException] = []

    def failing_read(path, **_):
        error = CorruptCheckpointError(f"{path}: damaged", checkpoint_globals=["collections.OrderedDict"])
        raised.append(error)
        raise error

    monkeypatch.setattr(modelpool_module, "read_checkpoint", failing_read)
    pool = OpenCLIPVisionModelPool(models={"a": str(tmp_path / "a.pt")})
    with pytest.raises(CorruptCheckpointError) as info:
        pool.load_model("a")
    assert str(info.value).startswith("pool entry models.a: ") and str(info.value).endswith(": damaged")
    assert info.value.checkpoint_globals == ["collections.OrderedDict"]
    assert info.value is not raised[0] and info.value.__cause__ is raised[0]
    assert str(raised[0]) == f"{tmp_path / 'a.pt'}: damaged"  # unchanged


@pytest.mark.parametrize("exc, command, status", [
    (UsageError("bad"), "verify", EXIT_USAGE),
    (ConfigError("bad"), "verify", EXIT_USAGE),
    (CheckpointNotFoundError(2, "missing", "x"), "convert", EXIT_USAGE),
    (FileNotFoundError(2, "missing"), "synth", EXIT_USAGE),
    (PermissionError(13, "denied"), "synth", EXIT_USAGE),
    (CorruptCheckpointError("bad"), "inspect", EXIT_USAGE),
    (CorruptCheckpointError("bad"), "convert", EXIT_FOUND),
    (ArchitectureMismatchError("bad"), "verify", EXIT_FOUND),
    (CheckpointError("bad"), "verify", EXIT_FOUND),
    (RuntimeError("a bug"), "verify", EXIT_FOUND),
    (KeyboardInterrupt(), "verify", EXIT_INTERRUPTED),
])
def test_exit_status_policy(exc, command, status):
    assert exit_status(exc, command) == status
    assert EXIT_OK == 0 and status != EXIT_OK
