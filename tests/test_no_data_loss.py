"""Nothing lost on a user's habits (docs/design.md §3.6): tensors a caller receives never die with
the file they came from, and no write leaves a truncated or half-written file behind.

The habit: load a checkpoint, then ``torch.save`` over the same path (strip a wrapper, fix keys,
convert dtypes). With tensors mapped from the file, truncating it made every page of them vanish:
the process died with SIGBUS and the checkpoint was left truncated. Each case runs in a forked
child, so that a regression is a failed test, not a dead test run.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import run_isolated

from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool, read_checkpoint, synth
from pool.checkpoint import load_state_dict
from pool.convert import convert_file, convert_to_hf, sha256_file

ENCODER_FORMS = ("zip", "legacy", "pickle", "state_dict", "safetensors", "hf")
HEAD_FORMS = ("zip", "legacy", "pickle", "safetensors")


def _write_encoder(folder: Path, form: str) -> Path:
    encoder = synth.make_original_encoder(seed=5)
    if form in ("zip", "legacy", "pickle"):
        return synth.save_module(encoder, folder / f"enc.{form}.pt", form)
    if form == "state_dict":
        return synth.save_state_dict(encoder.state_dict(), folder / "enc.sd.pt", "torch")
    if form == "safetensors":
        return synth.save_state_dict(encoder.state_dict(), folder / "enc.safetensors", "safetensors")
    source = synth.save_module(encoder, folder / "enc.zip.pt", "zip")
    convert_to_hf(source, folder / "hf")
    return folder / "hf"


def _write_head(folder: Path, form: str) -> Path:
    head = synth.make_original_head(5, synth.TINY.embed_dim, seed=2)
    if form == "safetensors":
        return synth.save_state_dict(head.state_dict(), folder / "head.safetensors", "safetensors")
    return synth.save_module(head, folder / f"head.{form}.pt", form)


def _weights_file(path: Path) -> Path:
    """The file the tensors come from (a transformers folder's model.safetensors)."""
    return path / "model.safetensors" if path.is_dir() else path


def _pool(path: Path, section: str) -> OpenCLIPVisionModelPool:
    return OpenCLIPVisionModelPool(**{section: {"x": str(path)}})


ENCODER_LOADS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "load_state_dict": load_state_dict,
    "read_checkpoint": lambda p: read_checkpoint(p).state_dict,
    "ImageEncoder.load": lambda p: ImageEncoder.load(p).state_dict(),
    "load_model": lambda p: _pool(p, "models").load_model("x").state_dict(),
    "named_models": lambda p: next(iter(_pool(p, "models").named_models()))[1].state_dict(),
}
HEAD_LOADS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "ClassificationHead.load": lambda p: ClassificationHead.load(p).state_dict(),
    "load_classification_head": lambda p: _pool(p, "classification_heads").load_classification_head("x").state_dict(),
    "load_state_dict": load_state_dict,
}


def _in_child(fn: Callable[[], None]) -> str:
    """Run ``fn`` in a forked child (`helpers.run_isolated`: one torch thread, fresh thread pools):
    "returned", "raised ..." or "signal killed by SIG..."."""
    report = run_isolated(fn, timeout=120)
    return "returned" if report.kind == "returned" else str(report)


def _rewrite_in_place(path: Path, load: Callable[[Path], dict[str, torch.Tensor]], how: str) -> Callable[[], None]:
    """Load with the defaults, then change the source file as a user would, then use every tensor."""
    def run() -> None:
        state = load(path)
        expected = {k: v.detach().clone() for k, v in state.items()}
        target = _weights_file(path)
        if how == "torch.save":
            torch.save(state, target)  # truncates the file first, then reads the tensors it writes
        elif how == "truncate":
            target.write_bytes(b"")
        else:  # deleted, and another file written at the same path
            target.unlink()
            target.write_bytes(os.urandom(4096))
        assert state.keys() == expected.keys()
        for key, value in state.items():
            assert torch.equal(value, expected[key]), key
        if how == "torch.save":  # what was saved is the state dict, whole
            saved = load_state_dict(target)  # by content: torch.load goes by a .safetensors name
            assert all(torch.equal(saved[k], expected[k]) for k in expected)
    return run


@pytest.mark.parametrize("load", sorted(ENCODER_LOADS))
@pytest.mark.parametrize("form", ENCODER_FORMS)
def test_an_encoder_survives_its_file_being_rewritten(tmp_path, form, load):
    path = _write_encoder(tmp_path, form)
    for how in ("torch.save", "truncate", "replace"):
        fresh = _write_encoder(tmp_path / how, form) if how != "torch.save" else path
        assert _in_child(_rewrite_in_place(fresh, ENCODER_LOADS[load], how)) == "returned", (form, load, how)


@pytest.mark.parametrize("load", sorted(HEAD_LOADS))
@pytest.mark.parametrize("form", HEAD_FORMS)
def test_a_head_survives_its_file_being_rewritten(tmp_path, form, load):
    path = _write_head(tmp_path, form)
    assert _in_child(_rewrite_in_place(path, HEAD_LOADS[load], "torch.save")) == "returned", (form, load)


@pytest.mark.parametrize("form", ["zip", "safetensors"])
def test_mmap_true_is_the_documented_opt_in_that_dies_with_the_file(tmp_path, form):
    """``mmap=True`` maps the tensors, as ``torch.load(mmap=True)`` does: truncating the file then
    kills whoever touches them (SIGBUS). That is why it is not the default."""
    path = _write_encoder(tmp_path, form)

    def run() -> None:
        state = load_state_dict(path, mmap=True)
        path.write_bytes(b"")
        sum(float(v.float().sum()) for v in state.values())

    assert "killed by SIGBUS" in _in_child(run)


def test_mapped_and_copied_reads_are_equal(tmp_path):
    for form in ("zip", "safetensors", "state_dict"):
        path = _write_encoder(tmp_path, form)
        copied, mapped = load_state_dict(path), load_state_dict(path, mmap=True)
        assert copied.keys() == mapped.keys() and all(torch.equal(copied[k], mapped[k]) for k in copied)


# -- writes: never a truncated or half-written file, never the source touched -----------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def _full_disk(monkeypatch: pytest.MonkeyPatch, after: int = 1000) -> None:
    """The next safetensors / torch write fails with ENOSPC after ``after`` bytes reached the file."""
    import safetensors.torch

    def failing(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * after)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: failing(obj, f))


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a file in the destination folder fails with EROFS (tests run as root, which ignores
    permission bits, so the file system's answer is simulated)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("fault", ["full disk", "read-only"])
@pytest.mark.parametrize("writer", ["convert", "convert --to hf", "save_model", "existing destination"])
def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch, writer, fault):
    source = _write_encoder(tmp_path, "zip")
    before = sha256_file(source)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("model" if writer == "convert --to hf" else "enc.safetensors")
    if writer == "existing destination":
        convert_file(source, target)
        kept = sha256_file(target)
    encoder = ImageEncoder.load(source)
    (_full_disk if fault == "full disk" else _read_only)(monkeypatch)
    with pytest.raises(OSError) as failed:
        if writer == "convert":
            convert_file(source, target)
        elif writer == "convert --to hf":
            convert_to_hf(source, target)
        elif writer == "save_model":
            _pool(source, "models").save_model(encoder, target)
        else:
            convert_file(source, target, force=True)
    assert failed.value.errno in (errno.ENOSPC, errno.EROFS)
    assert sha256_file(source) == before
    assert _leftovers(out) == []
    if writer == "existing destination":
        assert sha256_file(target) == kept  # the old file, whole
    else:
        assert not target.exists()


_KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import safetensors.torch
    from pool.convert import convert_file, convert_to_hf

    # as in a terminal: a job started in the background (CI) inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    real = safetensors.torch.save_file
    def interrupted(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:  # half of it on disk, as a write cut short leaves it
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(60)  # the signal arrives first; never a hang if it does not
    safetensors.torch.save_file = interrupted
    (convert_to_hf if sys.argv[4] == "hf" else convert_file)(sys.argv[2], sys.argv[3])
""")


@pytest.mark.parametrize("writer", ["convert", "hf"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_write_killed_midway_leaves_nothing_half_written(tmp_path, writer, sig):
    source = _write_encoder(tmp_path, "zip")
    before = sha256_file(source)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("model" if writer == "hf" else "enc.safetensors")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, sig, str(source), str(target), writer],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert sha256_file(source) == before
    assert not target.exists() and _leftovers(out) == [], (sorted(os.listdir(out)), proc.stderr[-2000:])
