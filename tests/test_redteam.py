"""Red team: hostile checkpoint files against the public API (docs/design.md §3).

Every hostile read runs in a forked child (`helpers.run_isolated`): a reader that hangs, segfaults or
allocates gigabytes fails its test instead of taking the run down. Each read must end in a typed
error from `pool.errors` whose message names the file, within 10 s, with under 1 GB of extra peak
memory, and write nothing: the payload's marker file stays absent, the folder of hostile files gains
nothing, and the child's working directory and TMPDIR (`Sandbox.scratch`) stay empty.

Where it can be done safely, an attack is first shown to be live: the same file through
``torch.load(weights_only=False)`` / ``pickle.load`` creates the marker, or a second zip parser
reads other bytes than `zipfile` does, or a naive open of the FIFO hangs (for a second). Bombs are
never detonated to prove them: the watchdog ends a child at 1.5 GB.

The files are built by `redteam_files` (pickles opcode by opcode, containers by hand, shaped like
torch's own output so that a benign file from the same builder reads with torch's weights-only
loader); `test_benign_files_from_the_builders_read` checks exactly that.
"""

from __future__ import annotations

import bz2
import contextlib
import copyreg
import io
import json
import os
import pickle
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redteam_files as rf
import torch
from helpers import MEMORY_LIMIT, SMALL_ARCH, TIME_LIMIT_S, Report, describe_exception, run_isolated
from helpers import qualname as _qualname
from helpers import status_bytes as _status_bytes
from redteam_files import Op, Pickled

import pool.pickle_scan
from pool import ClassificationHead, ImageEncoder, synth
from pool.arch.infer import MAX_LAYERS
from pool.checkpoint import load_state_dict, read_checkpoint
from pool.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from pool.record_values import MAX_WALK_ENTRIES

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = ("zip", "legacy", "pickle")
CODE_ERRORS = (UnsafeCheckpointError, CorruptCheckpointError)  # a file that would run code


# == the sandbox: where hostile files live, and what must not change ================================
@dataclass
class Sandbox:
    root: Path  # hostile files are written here
    marker: Path  # every payload creates this file
    scratch: Path  # working directory and TMPDIR of each reading child: must stay empty

    def snapshot(self) -> set[str]:
        out = set()
        for p in self.root.rglob("*"):
            mode = p.lstat().st_mode
            out.add(f"{p.relative_to(self.root)} {stat.S_IFMT(mode):o}")
        return out

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Report:
        """run_isolated in this sandbox; the report lists whatever appeared (``written``)."""
        before = self.snapshot()
        report = run_isolated(fn, *args, workdir=self.scratch, **kwargs)
        report.written = sorted(self.snapshot() - before) + sorted(
            str(p.relative_to(self.scratch)) for p in self.scratch.rglob("*"))
        return report

    def path(self, name: str, data: bytes | None = None) -> Path:
        p = self.root / name
        if data is not None:
            p.write_bytes(data)
        return p


@pytest.fixture(scope="module", autouse=True)
def _imports_done_in_the_parent() -> None:
    """What a read may import lazily (open_clip and its model configs) is imported once here, in
    the parent, so that each child's time and memory are the reader's own."""
    import open_clip  # noqa: F401

    with contextlib.suppress(Exception):
        from pool.arch import arch_for_name

        arch_for_name("ViT-B-32")


@pytest.fixture()
def sandbox(tmp_path: Path) -> Sandbox:
    root, scratch = tmp_path / "files", tmp_path / "scratch"
    root.mkdir()
    scratch.mkdir()
    return Sandbox(root, root / "MARKER", scratch)


# == reading through the public API, in the child =================================================
APIS: dict[str, Callable[[Path], Any]] = {
    "read_checkpoint": lambda p: read_checkpoint(p),
    "read_checkpoint(mmap=False)": lambda p: read_checkpoint(p, mmap=False),
    "read_checkpoint(refuse_unsafe=False)": lambda p: read_checkpoint(p, refuse_unsafe=False),
    "load_state_dict": load_state_dict,
    "ImageEncoder.load": lambda p: ImageEncoder.load(p),
    "ClassificationHead.load": lambda p: ClassificationHead.load(p),
}
READER_APIS = ("read_checkpoint", "read_checkpoint(mmap=False)", "read_checkpoint(refuse_unsafe=False)",
               "load_state_dict", "ImageEncoder.load", "ClassificationHead.load")
# What `inspect` reads with: unsafe globals stay inert records, so a file may come back; it must
# still be bounded, run nothing, and hold only tensors whose bytes are in the file.
LENIENT_APIS = ("read_checkpoint(refuse_unsafe=False)",)
# For files that cost the reader real work to refuse: the reader itself, and as inspect reads it.
QUICK_APIS = ("read_checkpoint", "read_checkpoint(refuse_unsafe=False)")


def _state_of(result: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(result, dict):
        return result
    state = getattr(result, "state_dict", None)
    return state if isinstance(state, dict) else None


def tensors_not_from_file(result: Any, file_bytes: bytes | None) -> list[str]:
    """Keys of returned tensors whose bytes do not appear in the file (uninitialised memory),
    and of tensors too big to have come from it. (The files here hold contiguous tensors only, so
    a tensor read right is a substring of the file.)"""
    state = _state_of(result)
    if state is None or file_bytes is None:
        return []
    bad = []
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        nbytes = t.numel() * t.element_size()
        if nbytes > max(len(file_bytes), 1) * 8 or nbytes > 256 << 20:
            bad.append(f"{key} ({nbytes} bytes from a {len(file_bytes)}-byte file)")
            continue
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if raw not in file_bytes:
            bad.append(f"{key} (bytes not in the file)")
    return bad


def _summary(result: Any) -> str:
    state = _state_of(result)
    if state is not None:
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                  for k, v in list(state.items())[:6]}
        return f"{type(result).__name__} {shapes}"
    return type(result).__name__


def try_apis(path: Path, apis: Iterable[str]) -> list[dict[str, Any]]:
    """(In the child.) Each API on ``path``; how each ended."""
    try:
        file_bytes = path.read_bytes() if path.is_file() and path.stat().st_size < (64 << 20) else None
    except OSError:
        file_bytes = None
    out = []
    for api in apis:
        start = time.monotonic()
        try:
            result = APIS[api](path)
            rec: dict[str, Any] = {"api": api, "kind": "returned", "summary": _summary(result),
                                   "not_from_file": tensors_not_from_file(result, file_bytes)}
        except BaseException as exc:  # noqa: BLE001
            rec = {"api": api, "kind": "raised", "exc": describe_exception(exc)}
        rec["elapsed"] = time.monotonic() - start
        out.append(rec)
    return out


def _as_tuple(expect: type | tuple[type, ...]) -> tuple[type, ...]:
    return expect if isinstance(expect, tuple) else (expect,)


def _set_up_then(setup: Callable[[], Any] | None, fn: Callable[..., Any], *args: Any) -> Any:
    """(In the child.) ``setup()`` (a spy, a lowered limit), then ``fn(*args)``."""
    if setup is not None:
        setup()
    return fn(*args)


def assert_refused(sb: Sandbox, path: Path, expect: type | tuple[type, ...] = CheckpointError, *,
                   apis: Iterable[str] = READER_APIS, lenient: Iterable[str] = LENIENT_APIS,
                   names_file: bool = True, no_download_advice: bool = False,
                   timeout: float = TIME_LIMIT_S, setup: Callable[[], Any] | None = None) -> Report:
    """Every API ends ``path`` in one of ``expect`` (message naming the file), in time, within the
    memory bound, writing nothing; a ``lenient`` API may instead return tensors from the file.
    ``setup`` runs in the child first (a spy, or a limit lowered to keep the file small)."""
    expect = _as_tuple(expect)
    report = sb.run(_set_up_then, setup, try_apis, path, tuple(apis), timeout=timeout)
    label = path.name
    assert not sb.marker.exists(), f"{label}: the payload ran (marker created): {report}"
    assert report.kind == "returned", f"{label}: the read did not finish: {report}"
    assert report.elapsed < TIME_LIMIT_S, f"{label}: took {report.elapsed:.1f} s"
    assert report.peak_extra < MEMORY_LIMIT, f"{label}: extra peak memory {report.peak_extra >> 20} MiB"
    problems = []
    for rec in report.value:
        api = rec["api"]
        if rec["kind"] == "returned":
            if api in lenient and not rec["not_from_file"]:
                continue
            why = f"; tensors not from the file: {rec['not_from_file']}" if rec["not_from_file"] else ""
            problems.append(f"{api} returned {rec['summary']}{why}")
            continue
        exc = rec["exc"]
        if not any(_qualname(e) in exc["mro"] for e in expect):
            wanted = " or ".join(e.__name__ for e in expect)
            problems.append(f"{api} raised {exc['type']}, expected {wanted}: {exc['message'][:300]}\n"
                            f"{exc['tb'][-1200:]}")
        elif names_file and str(path) not in exc["message"]:
            problems.append(f"{api}: the message does not name the file: {exc['message'][:300]}")
        elif no_download_advice and "download" in exc["message"].lower():
            problems.append(f"{api}: blames a damaged download for what is no regular file: "
                            f"{exc['message'][:300]}")
    assert not problems, f"{label}:\n" + "\n".join(problems)
    assert not report.written, f"{label}: the read wrote {report.written}"
    return report


def unrestricted_load(path: Path, container: str) -> str:
    """(Control, in the child.) What a plain loader does with the file: run it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if container == "pickle":
            with open(path, "rb") as f:
                pickle.load(f)  # the control: show the payload is live
        else:
            torch.load(path, weights_only=False)  # noqa: S614
    return "loaded"


def assert_live(sb: Sandbox, path: Path, container: str) -> None:
    """The control: an unrestricted load of the file creates the marker."""
    assert not sb.marker.exists()
    report = sb.run(unrestricted_load, path, container)
    assert sb.marker.exists(), f"the gadget in {path.name} is a dud: {report}"


def touch_command(marker: Path) -> str:
    return f"touch '{marker}'"


def tiny_state_body(p: Pickled) -> bytes:
    return Op.dict((Op.data("w"), p.tensor("0", torch.arange(12.0).reshape(3, 4) + 0.5)),
                   (Op.data("b"), p.tensor("1", torch.tensor([3.25, -1.5, 7.0]))))


# == the harness itself ============================================================================
def _boom() -> None:
    raise CorruptCheckpointError("boom")


def _grow(step: int) -> None:
    hold = []
    while True:
        hold.append(bytearray(step))  # bytearray(n) writes every byte: real RSS
        time.sleep(0.01)


def _peak_then_free() -> int:
    data = bytearray(96 << 20)
    del data
    return 1


def test_harness_reports_return_exception_hang_crash_and_memory():
    assert run_isolated(lambda: 42).value == 42
    raised = run_isolated(_boom)
    assert raised.kind == "raised" and _qualname(CorruptCheckpointError) in raised.exc["mro"]
    assert _qualname(CheckpointError) in raised.exc["mro"] and raised.exc["message"] == "boom"
    hang = run_isolated(time.sleep, 30, timeout=0.3)
    assert hang.kind == "timeout" and hang.elapsed < 5
    crash = run_isolated(lambda: os.kill(os.getpid(), signal.SIGSEGV))
    assert crash.kind == "signal" and "SIGSEGV" in crash.detail
    bomb = run_isolated(_grow, 32 << 20, kill_at=128 << 20)
    assert bomb.kind == "memory", bomb
    peak = run_isolated(_peak_then_free)
    assert peak.kind == "returned" and peak.peak_extra >= 90 << 20, peak


def test_harness_sees_an_allocation_that_reuses_the_parents_free_heap():
    """After other tests the parent's heap holds freed but resident memory, which the child
    inherits: an allocation reusing it adds nothing to the RSS. The child trims its heap before
    measuring, so the 96 MiB still show."""
    import gc

    blocks = [bytearray(64 << 10) for _ in range(3072)]  # 192 MiB of heap chunks (below mmap's threshold)
    pin = bytearray(64 << 10)  # keeps the freed chunks below it from being trimmed on free
    del blocks
    gc.collect()
    peak = run_isolated(_peak_then_free)
    del pin
    assert peak.kind == "returned" and peak.peak_extra >= 90 << 20, peak


def test_harness_survives_a_parent_thread_pool(sandbox):
    """Children of a process whose reader already spun up worker threads still read (the full
    suite runs other files first, in this process)."""
    path = synth.save_object({"w": torch.ones(16 << 20)}, sandbox.path("big.pt"), "zip")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as executor:
        assert executor.submit(lambda: 1).result() == 1
        report = sandbox.run(lambda: executor.submit(lambda: 2).result(timeout=5))
        assert report.kind == "returned" and report.value == 2, report
        report = sandbox.run(try_apis, path, ("read_checkpoint(mmap=False)",))
        assert report.kind == "returned" and report.value[0]["kind"] == "returned", report


def test_harness_sees_writes(sandbox):
    report = sandbox.run(lambda: Path("stray").write_text("x"))
    assert report.written == ["stray"]


# == legit files: the builders and the design's "no delegation" ====================================
@pytest.mark.parametrize("container", CONTAINERS)
def test_benign_files_from_the_builders_read(sandbox, container):
    """A benign file from the same builders as the hostile ones: torch's weights-only loader and
    pool both read it, so each hostile variant differs from a legit file only in its attack."""
    p = Pickled(container)
    path = p.write(sandbox.path(f"benign.{container}.pt"), tiny_state_body(p))
    if container != "pickle":
        assert torch.equal(torch.load(path, weights_only=True)["b"], torch.tensor([3.25, -1.5, 7.0]))
    report = sandbox.run(try_apis, path, ("read_checkpoint", "read_checkpoint(mmap=False)"))
    assert report.kind == "returned", report
    for rec in report.value:
        assert rec["kind"] == "returned", rec
        assert rec["summary"] == "Checkpoint {'w': (3, 4), 'b': (3,)}" and not rec["not_from_file"], rec
    assert not report.written


_TRIPWIRES = {
    "torch.load": (torch, "load"), "torch.serialization.load": (torch.serialization, "load"),
    "torch.serialization._legacy_load": (torch.serialization, "_legacy_load"),
    "torch.jit.load": (torch.jit, "load"),
    "torch.storage._load_from_bytes": (torch.storage, "_load_from_bytes"),
    "tarfile.open": (__import__("tarfile"), "open"), "pickle.load": (pickle, "load"),
    "pickle.loads": (pickle, "loads"),
}


def _read_with_tripwires(path: Path) -> list[str]:
    hits: list[str] = []
    for label, (owner, attr) in _TRIPWIRES.items():
        real = getattr(owner, attr)

        def wire(*args: Any, _real: Any = real, _label: str = label, **kwargs: Any) -> Any:
            hits.append(_label)
            return _real(*args, **kwargs)

        setattr(owner, attr, wire)
    ckpt = read_checkpoint(path)
    assert ckpt.state_dict
    return sorted(set(hits))


@pytest.fixture(scope="module")
def small_encoder():
    return synth.make_original_encoder(SMALL_ARCH, seed=3)


@pytest.mark.parametrize("container", CONTAINERS)
def test_reader_never_delegates_file_bytes(sandbox, small_encoder, container):
    """docs/design.md §3.1: nothing hands file bytes to torch.load, torch.jit, tarfile, pickle.load or torch's
    storage constructors. Checked on legit files (a pickled encoder): none of them is called."""
    path = synth.save_object(small_encoder, sandbox.path(f"encoder.{container}.pt"), container)
    report = sandbox.run(_read_with_tripwires, path)
    assert report.kind == "returned", report
    assert report.value == [], f"the reader handed the file to {report.value}"


# == 1. _load_from_bytes blobs that hold an archive ===================================================
def _blob(kind: str, marker: Path) -> bytes:
    if kind == "torchscript":
        return rf.torchscript_gadget(marker)
    return rf.torch_save_bytes(rf.Reduce(os.system, (touch_command(marker),)))


def _blob_file(sb: Sandbox, kind: str, container: str) -> Path:
    evil = rf.Reduce(torch.storage._load_from_bytes, (_blob(kind, sb.marker),))
    state = {"w": torch.arange(4.0), "evil": evil}
    return synth.save_object(state, sb.path(f"blob-{kind}.{container}.pt"), container)


BLOBS = ("torchscript", "zip-os-system")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("blob", BLOBS)
def test_archive_blob_gadget_is_live(sandbox, blob, container):
    assert_live(sandbox, _blob_file(sandbox, blob, container), container)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("blob", BLOBS)
def test_archive_inside_a_storage_blob_is_refused(sandbox, blob, container):
    """A tiny real state dict plus ``torch.storage._load_from_bytes(<archive>)``: a TorchScript
    archive (torch.load would hand it to torch.jit.load, whose __setstate__ runs) or a torch zip
    whose pickle calls os.system. An archive inside a blob is refused; nothing runs."""
    assert_refused(sandbox, _blob_file(sandbox, blob, container), CODE_ERRORS)


# == 2. zip archives that two parsers read differently ===============================================
def benign_zip_members(prefix: str = "archive") -> list[rf.ZipMember]:
    p = Pickled("zip")
    data_pkl = rf.pickle_of(tiny_state_body(p))
    return rf.torch_members(data_pkl, {s.key: s.raw for s in p.storages.values()}, prefix)


def benign_zip() -> bytes:
    return rf.zip_bytes(benign_zip_members())


def other_state_pickle() -> bytes:
    """A second valid data.pkl over the same records, other keys: which copy was read shows."""
    p = Pickled("zip")
    return rf.pickle_of(Op.dict((Op.data("other"), p.tensor("0", torch.arange(12.0).reshape(3, 4) + 0.5))))


def two_end_records(marker: Path) -> bytes:
    """A hidden archive (its pickle calls os.system) with its own central directory and end record,
    then the benign archive: zipfile (searching from the end) sees the benign one, a parser
    searching from the start sees the hidden one."""
    hidden = rf.torch_save_bytes(rf.Reduce(os.system, (touch_command(marker),)))
    return rf.zip_bytes(benign_zip_members(), prefix=rf.align(hidden))


def central_directory_offset_lies(hidden: bytes) -> bytes:
    """Two archives, one end record: its size field fits the benign central directory that sits
    right before it (what zipfile uses, treating the gap as prepended data), its offset field
    points at the hidden archive's central directory (what torch's reader uses)."""
    benign = rf.torch_save_bytes({"w": torch.arange(4.0)})
    a_local, a_cd = rf.split_zip(benign)
    b_local, b_cd = rf.split_zip(hidden)
    la, lb = sum(map(len, a_cd)), sum(map(len, b_cd))
    if la < lb:
        a_cd[-1] = rf.pad_comment(a_cd[-1], b"x" * (lb - la))
    else:
        b_cd[-1] = rf.pad_comment(b_cd[-1], b"x" * (la - lb))
    size = sum(map(len, a_cd))
    b_cd_offset = len(b_local) + 64 * 64  # room so that zipfile's shifted offsets stay positive
    out = bytearray(b_local + b"\0" * 64 * 64 + b"".join(b_cd))
    base = len(rf.align(out))
    out = bytearray(rf.align(out)) + a_local
    shift = len(out) - b_cd_offset  # what zipfile adds to every offset in the benign directory
    out += b"".join(rf.relocate(e, base - shift) for e in a_cd)
    out += rf.eocd(len(b_cd), size, b_cd_offset)
    return bytes(out)


def _hidden_archive(kind: str, marker: Path) -> bytes:
    if kind == "torchscript":
        return rf.torchscript_gadget(marker)
    return rf.torch_save_bytes(rf.Reduce(os.system, (touch_command(marker),)))


def test_two_end_records_parsers_disagree(sandbox):
    data = two_end_records(sandbox.marker)
    seen_by_zipfile = zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl")
    seen_from_start = rf.zip_read_from_first_eocd(data)["archive/data.pkl"]
    assert b"system" not in seen_by_zipfile
    assert b"system" in seen_from_start


def test_two_end_records_are_refused(sandbox):
    path = sandbox.path("two-end-records.pt", two_end_records(sandbox.marker))
    assert_refused(sandbox, path, CODE_ERRORS)


@pytest.mark.parametrize("hidden", ["torchscript", "os-system"])
def test_lying_central_directory_offset_is_live(sandbox, hidden):
    """zipfile lists the benign archive; torch's own reader follows the offset to the hidden one,
    and for a TorchScript archive torch.load(weights_only=False) then runs its __setstate__."""
    data = central_directory_offset_lies(_hidden_archive(hidden, sandbox.marker))
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "archive/data.pkl" in names and not any("constants.pkl" in n or "/code/" in n for n in names)
    assert b"system" not in zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl")
    assert_live(sandbox, sandbox.path(f"cd-offset-{hidden}.pt", data), "zip")


@pytest.mark.parametrize("hidden", ["torchscript", "os-system"])
def test_lying_central_directory_offset_is_refused(sandbox, hidden):
    data = central_directory_offset_lies(_hidden_archive(hidden, sandbox.marker))
    assert_refused(sandbox, sandbox.path(f"cd-offset-{hidden}.pt", data), CODE_ERRORS)


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_duplicate_member_names_are_refused(sandbox, member):
    members = benign_zip_members()
    name = f"archive/{member}".encode()
    twin = other_state_pickle() if member == "data.pkl" else struct.pack("<12f", *range(12))
    members.insert(len(members) - 1, rf.ZipMember(name, twin))
    data = rf.zip_bytes(members)
    zf = zipfile.ZipFile(io.BytesIO(data))
    copies = [i for i in zf.infolist() if i.filename == name.decode()]
    assert len(copies) == 2 and zf.read(copies[0]) != zf.read(copies[1])  # which one is "the" member?
    assert_refused(sandbox, sandbox.path(f"duplicate-{member.replace('/', '-')}.pt", data),
                   CorruptCheckpointError)


def test_member_name_with_nul_is_refused(sandbox):
    """``archive/data.pkl\\0x``: zipfile cuts the name at the NUL (a second data.pkl), a
    length-based parser does not."""
    members = benign_zip_members()
    members.insert(1, rf.ZipMember(b"archive/data.pkl\x00x", other_state_pickle()))
    data = rf.zip_bytes(members)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist().count("archive/data.pkl") == 2
    assert_refused(sandbox, sandbox.path("nul-name.pt", data), CorruptCheckpointError)


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_encrypted_flag_is_refused(sandbox, member):
    members = benign_zip_members()
    for m in members:
        if m.name == f"archive/{member}".encode():
            m.flags |= 1
    assert_refused(sandbox, sandbox.path(f"encrypted-{member.replace('/', '-')}.pt", rf.zip_bytes(members)),
                   CorruptCheckpointError)


def _compressed(members: list[rf.ZipMember], member: str, how: str) -> list[rf.ZipMember]:
    for m in members:
        if m.name != f"archive/{member}".encode():
            continue
        if how == "deflate":
            comp = zlib.compressobj(9, zlib.DEFLATED, -15)
            m.crc, m.usize = zlib.crc32(m.data), len(m.data)
            m.data, m.method = comp.compress(m.data) + comp.flush(), 8
        elif how == "bzip2":
            m.crc, m.usize = zlib.crc32(m.data), len(m.data)
            m.data, m.method = bz2.compress(m.data), 12
        else:  # a 4 GB bomb: ~4 MB of deflate that inflates to zeros
            m.data, m.method, m.crc, m.usize = rf.deflate_bomb(4), 8, 0, 0xFFFFFFF0
    return members


@pytest.mark.parametrize("member,how", [("data.pkl", "deflate"), ("data.pkl", "bzip2"),
                                        ("data.pkl", "deflate-bomb-4GB"), ("data/0", "deflate"),
                                        ("data/0", "deflate-bomb-4GB")])
def test_compressed_members_are_refused(sandbox, member, how):
    """torch writes every member stored: a compressed one is refused before anything inflates it."""
    data = rf.zip_bytes(_compressed(benign_zip_members(), member, how))
    if how != "deflate-bomb-4GB":  # a benign archive otherwise: zipfile reads it fine
        assert zipfile.ZipFile(io.BytesIO(data)).read(f"archive/{member}")
    assert_refused(sandbox, sandbox.path(f"compressed-{member.replace('/', '-')}-{how}.pt", data),
                   CorruptCheckpointError)


def overlapping_records(kind: str) -> bytes:
    """Two storage records whose bytes overlap: ``shared``: two central entries point at the same
    local header; ``inside``: record 1's local header and data sit inside record 0's data."""
    p = Pickled("zip")
    body = Op.dict((Op.data("a"), rf.rebuild_v2(p.storage("0", torch.uint8, b"", numel=64), 0, (64,), (1,))),
                   (Op.data("b"), rf.rebuild_v2(p.storage("1", torch.float32, b"", numel=4), 0, (4,), (1,))))
    data_pkl = rf.pickle_of(body)
    members = [rf.ZipMember(b"archive/data.pkl", data_pkl), rf.ZipMember(b"archive/byteorder", b"little")]
    out = bytearray()
    entries = []
    for m in members:
        entries.append(rf.central_entry(m, len(out)))
        out += rf.local_record(m, len(out))
    r0_offset = len(out)
    if kind == "shared":
        r0 = rf.ZipMember(b"archive/data/0", struct.pack("<16f", *range(16)))
        out += rf.local_record(r0, r0_offset)
        entries.append(rf.central_entry(r0, r0_offset))
        r1 = rf.ZipMember(b"archive/data/1", r0.data[:16])
        entries.append(rf.central_entry(r1, r0_offset))
    else:
        header_len = len(rf.local_record(rf.ZipMember(b"archive/data/0", b""), r0_offset))
        inner_offset = r0_offset + header_len + 64
        r1 = rf.ZipMember(b"archive/data/1", struct.pack("<4f", 1.5, 2.5, 3.5, 4.5))
        inner = rf.local_record(r1, inner_offset)
        r0 = rf.ZipMember(b"archive/data/0", b"\x11" * 64 + inner + b"\x22" * 64)
        out += rf.local_record(r0, r0_offset)
        entries += [rf.central_entry(r0, r0_offset), rf.central_entry(r1, inner_offset)]
    version = rf.ZipMember(b"archive/version", b"3\n")
    entries.append(rf.central_entry(version, len(out)))
    out += rf.local_record(version, len(out))
    cd = b"".join(entries)
    return bytes(out) + cd + rf.eocd(len(entries), len(cd), len(out))


@pytest.mark.parametrize("kind", ["shared", "inside"])
def test_overlapping_records_are_refused(sandbox, kind):
    path = sandbox.path(f"overlap-{kind}.pt", overlapping_records(kind))
    assert_refused(sandbox, path, CorruptCheckpointError)


def test_zip64_end_record_with_absurd_sizes_is_refused(sandbox):
    data = benign_zip()
    end = data.rfind(b"PK\x05\x06")
    body = data[:end]
    z64_offset = len(body)
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1 << 62, 1 << 62, 1 << 62, 0)
    locator = struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1)
    end_record = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = sandbox.path("zip64-absurd.pt", body + z64 + locator + end_record)
    assert_refused(sandbox, path, CorruptCheckpointError)


def test_zip_record_smaller_than_the_tensor_is_refused(sandbox):
    p = Pickled("zip")
    body = Op.dict((Op.data("w"), rf.rebuild_v2(p.storage("0", torch.float32, struct.pack("<4f", 1, 2, 3, 4),
                                                          numel=100), 0, (100,), (1,))))
    assert_refused(sandbox, p.write(sandbox.path("short-record.pt"), body), CorruptCheckpointError)


# == 3. a tar polyglot that sniffs as legacy and holds a FIFO ============================================
def tar_with_fifo() -> bytes:
    magic_name = b"\x80\x02" + pickle.dumps(rf.LEGACY_MAGIC, protocol=2)[2:-1] + b"x"
    return rf.tar_bytes([(magic_name, "file", b""), (b"storages", "fifo", b""),
                         (b"tensors", "file", pickle.dumps(0, protocol=2)),
                         (b"pickle", "file", pickle.dumps({"w": 1}, protocol=2))])


def _fifos_under(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if stat.S_ISFIFO(p.lstat().st_mode)]


def test_tar_fifo_polyglot_hangs_torch_load(sandbox):
    """The control, bounded: torch.load extracts the FIFO into a temporary folder and blocks on it."""
    data = tar_with_fifo()
    assert data[:2] == b"\x80\x02" and pickle.dumps(rf.LEGACY_MAGIC, protocol=2)[2:-1] in data[:32]
    path = sandbox.path("tar-fifo.pt", data)
    report = sandbox.run(unrestricted_load, path, "legacy", timeout=0.5)
    assert report.kind == "timeout", report
    assert _fifos_under(sandbox.scratch), "torch.load did not extract the FIFO"


def test_tar_fifo_polyglot_is_refused(sandbox):
    path = sandbox.path("tar-fifo.pt", tar_with_fifo())
    assert_refused(sandbox, path, CheckpointError)
    assert not _fifos_under(sandbox.scratch) and not _fifos_under(sandbox.root / "..")


# == 4. paths that are no regular file ==============================================================
def _special(sb: Sandbox, kind: str) -> Path:
    if kind == "dev-zero":
        return Path("/dev/zero")
    if kind == "dev-urandom":
        return Path("/dev/urandom")
    path = sb.root / f"{kind}.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()
        (path / "data.pkl").write_bytes(b"")
    elif kind == "symlink-to-fifo":
        os.mkfifo(sb.root / "real-fifo")
        path.symlink_to(sb.root / "real-fifo")
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    return path


SPECIAL_PATHS = ("fifo", "symlink-to-fifo", "dev-zero", "symlink-to-dev-zero", "dev-urandom", "socket",
                 "directory")


def test_naive_read_of_a_fifo_hangs(sandbox):
    path = _special(sandbox, "fifo")
    report = run_isolated(lambda: open(path, "rb").read(), timeout=0.5)
    assert report.kind == "timeout", report


@pytest.mark.parametrize("kind", SPECIAL_PATHS)
def test_non_regular_files_are_refused(sandbox, kind):
    """Refused from its type, before it is opened for reading: quick, and not blamed on a download."""
    path = _special(sandbox, kind)
    assert_refused(sandbox, path, CheckpointError, no_download_advice=True)


# == 5. deep nesting =============================================================================
DEPTH = 1_000_000


def deep_body(kind: str) -> bytes:
    if kind == "slice-chain":  # slice(slice(slice(...))) via REDUCE, one GLOBAL memoised
        return (Op.glob("builtins", "slice") + Op.put(0) + Op.get(0) * (DEPTH - 1) + b"N"
                + b"\x85R" * DEPTH)
    if kind == "tuple-dict-key":  # {((((None,),),),...): 1}: hashing the key recurses
        return b"}" + b"N" + b"\x85" * DEPTH + Op.data(1) + b"s"
    if kind == "tuple-set-element":
        return b"\x8f(" + b"N" + b"\x85" * DEPTH + b"\x90"
    if kind == "nested-dicts":
        return (b"}" + Op.str("a")) * DEPTH + b"N" + b"s" * DEPTH
    if kind == "nested-lists":
        return b"]" * DEPTH + b"N" + b"a" * DEPTH
    if kind == "marks":
        return b"(" * DEPTH + b"N"
    raise ValueError(kind)


@pytest.mark.parametrize("kind,container", [
    ("slice-chain", "pickle"), ("slice-chain", "zip"), ("slice-chain", "legacy"),
    ("tuple-dict-key", "pickle"), ("tuple-set-element", "pickle"),
    ("nested-dicts", "pickle"), ("nested-lists", "pickle"), ("marks", "pickle"),
])
def test_deep_nesting_is_refused_without_a_crash(sandbox, kind, container):
    p = Pickled(container)
    path = p.write(sandbox.path(f"deep-{kind}.{container}.pt"), deep_body(kind), protocol=4)
    assert_refused(sandbox, path, CheckpointError, apis=("read_checkpoint",))


# == 6. memo indexes ===============================================================================
MEMO_BOMBS = {
    "long-binput-2^31": lambda t: t + b"r\xff\xff\xff\x7f",
    "put-huge-decimal": lambda t: t + b"p" + b"9" * 40 + b"\n",
    "put-negative": lambda t: t + b"p-1\n",
    "long-binget-undefined": lambda t: t + b"0j\xff\xff\xff\xff",
    "long-binput-then-get-2^31": lambda t: t + b"r\xff\xff\xff\x7f0j\xff\xff\xff\x7f",
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("bomb", sorted(MEMO_BOMBS))
def test_memo_index_bombs_are_refused(sandbox, bomb, container):
    """A memo index far beyond anything the file could fill (a C unpickler sizes its memo array by
    it: gigabytes for a few bytes) or one that was never stored."""
    p = Pickled(container)
    body = Op.dict((Op.data("w"), MEMO_BOMBS[bomb](p.tensor("0", torch.arange(4.0)))))
    path = p.write(sandbox.path(f"memo-{bomb}.{container}.pt"), body)
    assert_refused(sandbox, path, CheckpointError)


# == 7. lengths and allocations the file cannot back ==================================================
LENGTH_BOMBS = {
    "binbytes8-4e9": b"\x8e" + struct.pack("<Q", 4_000_000_000) + b"x" * 20,
    "binunicode8-4e9": b"\x8d" + struct.pack("<Q", 4_000_000_000) + b"x" * 20,
    "bytearray8-4e9": b"\x96" + struct.pack("<Q", 4_000_000_000) + b"x" * 20,
    "binbytes-4G": b"B" + struct.pack("<I", 0xFFFFFFF0) + b"x" * 20,
    "frame-4e9": b"\x95" + struct.pack("<Q", 4_000_000_000) + b"N",
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("bomb", sorted(LENGTH_BOMBS))
def test_length_prefixes_beyond_the_file_are_refused(sandbox, bomb, container):
    p = Pickled(container)
    body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0))), (Op.data("x"), LENGTH_BOMBS[bomb]))
    path = p.write(sandbox.path(f"length-{bomb}.{container}.pt"), body, protocol=5)
    assert_refused(sandbox, path, CheckpointError)


def _range(n: int) -> bytes:
    return Op.call(Op.glob("builtins", "range"), Op.data(n))


ALLOCATION_BOMBS = {
    "bytearray(4e9)": Op.call(Op.glob("builtins", "bytearray"), Op.data(4_000_000_000)),
    "bytes(4e9)": Op.call(Op.glob("builtins", "bytes"), Op.data(4_000_000_000)),
    "_load_from_bytes(bytearray(4e9))": Op.call(
        Op.glob("torch.storage", "_load_from_bytes"),
        Op.call(Op.glob("builtins", "bytearray"), Op.data(4_000_000_000))),
    "list(range(1e9))": Op.call(Op.glob("builtins", "list"), _range(10**9)),
    "frozenset(range(1e9))": Op.call(Op.glob("builtins", "frozenset"), _range(10**9)),
    "torch.Size(range(1e9))": Op.call(Op.glob("torch", "Size"), _range(10**9)),
}


@pytest.mark.parametrize("where", ["root", "beside-a-tensor"])
@pytest.mark.parametrize("bomb", sorted(ALLOCATION_BOMBS))
def test_allocating_calls_are_bounded(sandbox, bomb, where):
    """A 60-byte pickle calling an allowlisted constructor with a huge size. At the root (no
    tensors) the read ends in a typed error; beside a real tensor the call may stay an unread
    record (the read returns the file's own tensor), but it is never evaluated."""
    p = Pickled("pickle")
    if where == "root":
        body, lenient = ALLOCATION_BOMBS[bomb], LENIENT_APIS
    else:
        body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0))),
                       (Op.data("x"), ALLOCATION_BOMBS[bomb]))
        lenient = READER_APIS
    path = p.write(sandbox.path(f"alloc-{bomb.split('(')[0]}-{where}.pt"), body)
    assert_refused(sandbox, path, CheckpointError, lenient=lenient)


# == 8. chained calls of an unknown global ============================================================
@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_sixty_thousand_chained_calls_are_refused(sandbox, container):
    """``x.y()()()...``, 60,000 times: records must stay cheap (no per-call class, no name that
    grows with the depth) and the result holds no tensors."""
    p = Pickled(container)
    body = Op.glob("x", "y") + b")R" * 60_000
    path = p.write(sandbox.path(f"chain.{container}.pt"), body)
    assert_refused(sandbox, path, CheckpointError)


# == 9. architecture inference bounded by the keys present ===========================================
Shapes = dict[str, tuple[str, list[int]]]


def vit_tensors(width: int = 8, patch: int = 2, grid: int = 2, embed: int = 4) -> Shapes:
    t: Shapes = {
        "visual.class_embedding": ("F32", [width]),
        "visual.positional_embedding": ("F32", [grid * grid + 1, width]),
        "visual.proj": ("F32", [width, embed]),
        "visual.conv1.weight": ("F32", [width, 3, patch, patch]),
        "visual.ln_pre.weight": ("F32", [width]), "visual.ln_pre.bias": ("F32", [width]),
        "visual.ln_post.weight": ("F32", [width]), "visual.ln_post.bias": ("F32", [width]),
    }
    b = "visual.transformer.resblocks.0."
    t.update({
        b + "ln_1.weight": ("F32", [width]), b + "ln_1.bias": ("F32", [width]),
        b + "attn.in_proj_weight": ("F32", [3 * width, width]), b + "attn.in_proj_bias": ("F32", [3 * width]),
        b + "attn.out_proj.weight": ("F32", [width, width]), b + "attn.out_proj.bias": ("F32", [width]),
        b + "ln_2.weight": ("F32", [width]), b + "ln_2.bias": ("F32", [width]),
        b + "mlp.c_fc.weight": ("F32", [4 * width, width]), b + "mlp.c_fc.bias": ("F32", [4 * width]),
        b + "mlp.c_proj.weight": ("F32", [width, 4 * width]), b + "mlp.c_proj.bias": ("F32", [width]),
    })
    return t


def _with(**changes: tuple[str, list[int]] | None) -> Shapes:
    t = vit_tensors()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del t[key]
        else:
            t[key] = value
    return t


ARCH_CASES = {
    "block-99999999": _with(visual__transformer__resblocks__99999999__ln_1__weight=("F32", [8])),
    "block-index-not-a-number": _with(visual__transformer__resblocks__x__ln_1__weight=("F32", [8])),
    "block-index-empty": {**vit_tensors(), "visual.transformer.resblocks.": ("F32", [8])},
    "conv1-zero-shape": _with(visual__conv1__weight=("F32", [0, 3, 0, 0])),
    "conv1-1d": _with(visual__conv1__weight=("F32", [8])),
    "patch-zero": _with(visual__conv1__weight=("F32", [8, 3, 0, 0])),
    "width-zero": _with(visual__conv1__weight=("F32", [0, 3, 2, 2])),
    "huge-width": _with(visual__conv1__weight=("F32", [1 << 40, 0, 2, 2])),
    "pos-non-square": _with(visual__positional_embedding=("F32", [6, 8])),
    "pos-empty": _with(visual__positional_embedding=("F32", [0, 8])),
    "pos-1d": _with(visual__positional_embedding=("F32", [5])),
    "huge-grid": _with(visual__positional_embedding=("F32", [10**8 + 1, 0])),
    "proj-1d": _with(visual__proj=("F32", [8])),
    "mlp-1d": _with(visual__transformer__resblocks__0__mlp__c_fc__weight=("F32", [32])),
}


def test_minimal_vit_safetensors_loads(sandbox):
    """The base of the cases below is a real (tiny) ViT: it loads, so each case fails for its flaw."""
    path = sandbox.path("vit.safetensors", rf.safetensors_bytes(vit_tensors()))
    report = sandbox.run(try_apis, path, ("ImageEncoder.load",))
    assert report.kind == "returned" and report.value[0]["kind"] == "returned", report


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_odd_vit_shapes_end_in_typed_errors(sandbox, case):
    """Keys and shapes that would make inference build 10^8 blocks, divide by zero, index past a
    shape or take the square root of -1: a typed error, quickly, whatever the shapes say."""
    path = sandbox.path(f"arch-{case}.safetensors", rf.safetensors_bytes(ARCH_CASES[case]))
    assert_refused(sandbox, path, CheckpointError, apis=("ImageEncoder.load",))


# == 10. broadcast views: a few bytes that claim billions of elements =================================
def _broadcast_state(kind: str) -> dict[str, torch.Tensor]:
    if kind == "stride-0":
        return {"weight": torch.full((1,), 0.25).expand(50_000, 40_000),
                "bias": torch.zeros(1).expand(50_000)}
    base = torch.arange(90_000, dtype=torch.float32)  # strides (1, 1): rows overlap each other
    return {"weight": base.as_strided((50_000, 40_000), (1, 1)), "bias": base[:50_000]}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", ["stride-0", "self-overlapping"])
def test_head_with_a_broadcast_weight_is_refused(sandbox, kind, container):
    """A head whose weight is a 2e9-element view of a few bytes: no 8 GB copy, a typed error."""
    path = synth.save_object(_broadcast_state(kind), sandbox.path(f"head-{kind}.{container}.pt"), container)
    assert_refused(sandbox, path, CheckpointError, apis=("ClassificationHead.load",))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", ["stride-0", "self-overlapping"])
def test_reader_does_not_materialise_a_broadcast_view(sandbox, kind, container):
    """The reader may refuse a self-overlapping view (typed) or hand it back as a view; either way
    it never copies 8 GB."""
    path = synth.save_object(_broadcast_state(kind), sandbox.path(f"view-{kind}.{container}.pt"), container)
    apis = ("read_checkpoint", "read_checkpoint(mmap=False)", "load_state_dict")
    report = sandbox.run(try_apis, path, apis)
    assert report.kind == "returned", report
    assert report.peak_extra < MEMORY_LIMIT and report.elapsed < TIME_LIMIT_S, report
    for rec in report.value:
        if rec["kind"] == "raised":
            assert _qualname(CheckpointError) in rec["exc"]["mro"], rec["exc"]
    assert not report.written


# == 11. tensors over memory the file never filled ===================================================
def _float_storage_call(how: str, n: int = 1000) -> bytes:
    cls = Op.glob("torch", "FloatStorage")
    if how == "reduce":
        return Op.call(cls, Op.data(n))
    if how == "newobj":
        return Op.newobj(cls, Op.data(n))
    if how == "newobj-ex":
        return cls + Op.data((n,)) + Op.data({}) + b"\x92"
    if how == "copyreg":
        return Op.call(Op.glob("copyreg", "_reconstructor"), cls, cls, Op.data(n))
    raise ValueError(how)


def rebuild_v3(storage: bytes, size: tuple, dtype: bytes) -> bytes:
    return Op.call(Op.glob("torch._utils", "_rebuild_tensor_v3"), storage, Op.data(0), Op.data(size),
                   Op.data((1,)), Op.data(False), Op.ordered_dict(), dtype)


def uninitialised_body(p: Pickled, kind: str) -> bytes:
    if kind.startswith("storage-call-"):
        storage = _float_storage_call(kind.removeprefix("storage-call-"))
        return Op.dict((Op.data("w"), rf.rebuild_v2(storage, 0, (1000,), (1,))))
    if kind == "untyped-storage-call":
        storage = Op.call(Op.glob("torch", "UntypedStorage"), Op.data(4000))
        return Op.dict((Op.data("w"), rebuild_v3(storage, (4000,), Op.glob("torch", "uint8"))))
    if kind == "tensor-build-resize":  # BUILD on a tensor: Tensor.__setstate__ -> set_ grows the storage
        raw = struct.pack("<2f", 1.25, 2.5)
        tensor = rf.rebuild_v2(p.storage("0", torch.float32, raw), 0, (2,), (1,))
        state = Op.tuple(p.storage("0", torch.float32, raw), Op.data(0), Op.data((1000,)), Op.data((1,)))
        return Op.dict((Op.data("w"), Op.build(tensor, state)))
    if kind == "rebuild-v3-dtype-none":  # 64 bytes read as 64 float32 elements
        storage = p.storage("0", torch.uint8, bytes(range(1, 65)))
        return Op.dict((Op.data("w"), rebuild_v3(storage, (64,), Op.data(None))))
    raise ValueError(kind)


UNINITIALISED = ("storage-call-reduce", "storage-call-newobj", "storage-call-newobj-ex",
                 "storage-call-copyreg",
                 "untyped-storage-call", "tensor-build-resize", "rebuild-v3-dtype-none")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", UNINITIALISED)
def test_tensors_over_unfilled_memory_are_refused(sandbox, kind, container):
    """Storage constructors called by the pickle, a BUILD that resizes a tensor, a rebuild whose
    dtype does not match its storage: a typed error, never a tensor whose bytes are not in the
    file (the lenient inspect read is checked against the file's bytes)."""
    p = Pickled(container)
    path = p.write(sandbox.path(f"uninit-{kind}.{container}.pt"), uninitialised_body(p, kind))
    assert_refused(sandbox, path, CheckpointError)


@pytest.mark.parametrize("keys", ["none", "one-of-two"])
def test_legacy_storages_never_filled_are_refused(sandbox, keys):
    """A legacy file whose storage-key list leaves storages out: their memory is never filled.
    (A long text entry makes the file bigger than the storages, so a size check alone passes.)"""
    p = Pickled("legacy")
    pattern = bytes((i * 7 + 3) % 256 for i in range(8000))
    body = Op.dict((Op.data("w"), rf.rebuild_v2(p.storage("0", torch.float32, pattern), 0, (2000,), (1,))),
                   (Op.data("v"), rf.rebuild_v2(p.storage("1", torch.float32, pattern[:400]), 0, (100,),
                                                 (1,))),
                   (Op.data("pad"), Op.data("Z" * 9000)))
    path = p.write(sandbox.path(f"legacy-keys-{keys}.pt"), body, storage_keys=[] if keys == "none" else ["1"])
    assert_refused(sandbox, path, CheckpointError)


@pytest.mark.parametrize("numel", [-1, 1 << 62, "12"])
def test_legacy_storage_with_an_impossible_size_is_refused(sandbox, numel):
    storage = (Op.tuple(Op.data("storage"), Op.glob("torch", "FloatStorage"), Op.data("0"), Op.data("cpu"),
                        Op.data(numel), Op.data(None)) + b"Q")
    body = Op.dict((Op.data("w"), rf.rebuild_v2(storage, 0, (4,), (1,))))
    record = rf.Storage("0", torch.float32, struct.pack("<4f", 1, 2, 3, 4))
    data = rf.legacy_file(rf.pickle_of(body), [record], ["0"])
    assert_refused(sandbox, sandbox.path(f"legacy-numel-{numel}.pt", data), CheckpointError)


def test_legacy_view_beyond_its_storage_is_refused(sandbox):
    p = Pickled("legacy")
    raw = struct.pack("<4f", 1, 2, 3, 4)
    p.storages["0"] = rf.Storage("0", torch.float32, raw)
    view = (Op.tuple(Op.data("storage"), Op.glob("torch", "FloatStorage"), Op.data("0"), Op.data("cpu"),
                     Op.data(4), Op.data(("v", 2, 1000))) + b"Q")
    body = Op.dict((Op.data("w"), rf.rebuild_v2(view, 0, (1000,), (1,))))
    assert_refused(sandbox, p.write(sandbox.path("legacy-view.pt"), body), CheckpointError)


# == 12. damaged files: typed errors, not the library's own =========================================
def _damaged(kind: str, sb: Sandbox) -> tuple[bytes, type]:
    if kind == "safetensors-header-nested-100000":
        header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        return rf.safetensors_bytes({}, raw_header=header), CorruptCheckpointError
    if kind == "zip-cut-in-half":
        data = benign_zip()
        return data[:len(data) // 2], CorruptCheckpointError
    if kind == "zip-without-data-pkl":
        return rf.zip_bytes([m for m in benign_zip_members() if not m.name.endswith(b"data.pkl")]), \
            CorruptCheckpointError
    if kind == "zip-data-pkl-last-and-truncated":
        members = benign_zip_members()
        pkl = members.pop(0)
        pkl.data = pkl.data[: len(pkl.data) * 2 // 3]
        return rf.zip_bytes([*members, pkl]), CorruptCheckpointError
    if kind == "legacy-truncated-in-storage-data":
        p = Pickled("legacy")
        data = p.finish(tiny_state_body(p))
        return data[:-10], CorruptCheckpointError
    if kind == "pickle-truncated":
        p = Pickled("pickle")
        data = p.finish(tiny_state_body(p))
        return data[: len(data) - 40], CorruptCheckpointError
    if kind == "persistent-id-int":
        p = Pickled("zip")
        return p.finish(Op.dict((Op.data("w"), rf.rebuild_v2(Op.data(7) + b"Q", 0, (1,), (1,))))), \
            CorruptCheckpointError
    if kind == "persistent-id-list":
        p = Pickled("legacy")
        body = Op.dict((Op.data("w"), rf.rebuild_v2(Op.data(["storage", 1]) + b"Q", 0, (1,), (1,))))
        return p.finish(body), CorruptCheckpointError
    if kind == "persistent-id-in-plain-pickle":
        return rf.pickle_of(Op.dict((Op.data("w"), b"P0\n"))), CorruptCheckpointError
    raise ValueError(kind)


DAMAGED = ("safetensors-header-nested-100000", "zip-cut-in-half", "zip-without-data-pkl",
           "zip-data-pkl-last-and-truncated", "legacy-truncated-in-storage-data", "pickle-truncated",
           "persistent-id-int", "persistent-id-list", "persistent-id-in-plain-pickle")


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_files_end_in_typed_errors(sandbox, kind):
    data, expect = _damaged(kind, sandbox)
    assert_refused(sandbox, sandbox.path(f"damaged-{kind}.pt", data), expect)


def _read_under_address_limit(path: Path, mmap: bool | None) -> dict[str, Any]:
    """(In the child.) Read a valid file with the address space capped 16 MiB above what the process
    already maps, so the reader's allocations (or mappings) for a 32 MiB tensor fail."""
    import gc

    gc.collect()
    size = _status_bytes("self", "VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20), hard))
    try:
        read_checkpoint(path, mmap=mmap)
        outcome: dict[str, Any] = {"kind": "returned"}
    except BaseException as exc:  # noqa: BLE001
        outcome = {"kind": "raised", "exc": describe_exception(exc)}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return outcome


@pytest.mark.parametrize("container,mmap", [("zip", None), ("zip", False), ("legacy", None), ("pickle", None),
                                            ("safetensors", None), ("safetensors", False)])
def test_out_of_memory_is_not_reported_as_a_damaged_file(sandbox, container, mmap):
    """docs/design.md §3.5: MemoryError (and system errors) are never reported as a damaged download.
    No monkeypatched hook (the reader's internals are being rewritten): the address space is
    really capped, so whatever the reader allocates or maps for a valid 32 MiB tensor fails."""
    tensors = {"w": torch.ones(8 << 20)}
    path = sandbox.path(f"big.{container}.pt")
    if container == "safetensors":
        synth.save_state_dict(tensors, path, "safetensors")
    else:
        synth.save_object(tensors, path, container)
    report = sandbox.run(_read_under_address_limit, path, mmap)
    assert report.kind == "returned", report
    outcome = report.value
    if outcome["kind"] == "returned":
        return  # it fit (a lazy mapping, say): nothing to report
    exc = outcome["exc"]
    assert _qualname(CheckpointError) not in exc["mro"], \
        f"out of memory reported as {exc['type']}: {exc['message']}"
    assert "download" not in exc["message"].lower(), exc["message"]
    memory = _qualname(MemoryError) in exc["mro"] or _qualname(OSError) in exc["mro"] or (
        # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory"
        exc["type"] == "builtins.RuntimeError" and "allocate memory" in exc["message"])
    assert memory, f"out of memory surfaced as {exc['type']}: {exc['message'][:300]}"


# == 13. the command line ===========================================================================
def _unsafe_names_pickle(p: Pickled, names: list[tuple[str, str]]) -> bytes:
    items = [(Op.data("w"), p.tensor("0", torch.arange(4.0)))]
    for i, (module, name) in enumerate(names):
        items.append((Op.data(f"g{i}"), Op.call(Op.stack_glob(module, name))))
    return Op.dict(*items)


def _run_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pool", *args], capture_output=True, timeout=timeout,
                          cwd=REPO, env=env, check=False)


def test_inspect_escapes_control_characters(sandbox):
    """``python -m pool inspect`` lists every global escaped: no raw ESC, CR or BEL from a name."""
    p = Pickled("pickle")
    names = [("evil\x1b[31m.mod", "Na\rme\x1b]0;pwned\x07"), ("os", "system\x1b[2J\r")]
    path = p.write(sandbox.path("escape.pt"), _unsafe_names_pickle(p, names), protocol=4)
    proc = _run_cli(["inspect", str(path)])
    out, err = proc.stdout, proc.stderr
    assert b"system" in out, (proc.returncode, out, err)  # the globals are listed
    assert proc.returncode != 0  # an unsafe global: exit status 1
    for stream, text in (("stdout", out), ("stderr", err)):
        for byte in (b"\x1b", b"\r", b"\x07"):
            assert byte not in text, f"raw {byte!r} on {stream}: {text[-600:]!r}"
    assert not sandbox.marker.exists()


def test_inspect_survives_names_that_are_not_unicode(sandbox):
    """A global name with a lone surrogate (STACK_GLOBAL decodes with surrogatepass): listed
    escaped, not a UnicodeEncodeError reported as a bug in pool. (In process, stdout as strict
    UTF-8 as on a pipe: a subprocess costs two seconds of imports.)"""
    p = Pickled("pickle")
    body = _unsafe_names_pickle(p, [("mod\udcff", "name\ud800")])
    path = p.write(sandbox.path("surrogate.pt"), body, protocol=4)
    report = sandbox.run(_cli_in_process, ["inspect", str(path)])
    assert report.kind == "returned", report
    code, out, err = report.value
    assert "bug" not in err.lower() and "Traceback" not in err, err
    assert re.search(r"^ +mod.*name", out, re.M), out  # the global is listed


def _cli_in_process(args: list[str]) -> tuple[int, str, str]:
    """(In the child.) ``python -m pool ...`` without a new interpreter: pool.cli.main, its output
    through text streams like a real stdout/stderr on a pipe (UTF-8, strict; stderr
    backslashreplace). Returns the exit status and the bytes written, decoded for the test
    (surrogateescape, so that whatever was written shows)."""
    from pool.cli import main

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    sys.stdout, sys.stderr = out, err
    try:
        code = main(args)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return (code, out_bytes.getvalue().decode("utf-8", "surrogateescape"),
            err_bytes.getvalue().decode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("case", ["blob-torchscript", "cd-offset-torchscript", "tar-fifo", "fifo"])
def test_inspect_runs_nothing_and_never_hangs(sandbox, case):
    if case == "blob-torchscript":
        path = _blob_file(sandbox, "torchscript", "pickle")
    elif case == "cd-offset-torchscript":
        path = sandbox.path("cd.pt", central_directory_offset_lies(rf.torchscript_gadget(sandbox.marker)))
    elif case == "tar-fifo":
        path = sandbox.path("tar-fifo.pt", tar_with_fifo())
    else:
        path = _special(sandbox, "fifo")
    report = sandbox.run(_cli_in_process, ["inspect", str(path)])
    assert report.kind == "returned", report
    code, out, err = report.value
    assert code != 0 or "UNSAFE" in out, (code, out, err)
    assert "bug" not in err.lower(), err
    assert not sandbox.marker.exists(), "inspect ran the payload"
    assert not report.written, report.written


def test_verify_runs_nothing_from_a_hostile_pool(sandbox):
    enc = _blob_file(sandbox, "torchscript", "pickle")
    head = sandbox.path("head.pt", central_directory_offset_lies(rf.torchscript_gadget(sandbox.marker)))
    config = sandbox.path("pool.yaml")
    config.write_text(f"models:\n  evil: {str(enc)!r}\nclassification_heads:\n  evil: {str(head)!r}\n")
    report = sandbox.run(_cli_in_process, ["verify", str(config)])
    assert report.kind == "returned", report
    code, out, err = report.value
    assert code == 1, (code, out, err)
    assert not sandbox.marker.exists(), "verify ran the payload"
    assert not report.written, report.written


# == more: opcodes with side doors ===================================================================
def _ext_call(marker: Path) -> bytes:
    return b"\x82\xf0" + Op.tuple(Op.data(touch_command(marker))) + b"R"


def _with_extension(fn: Callable[..., Any], *args: Any) -> Any:
    """(In the child.) Register copyreg extension 0xF0 = posix.system, as a library might register
    its own codes, then call fn."""
    copyreg.add_extension("posix", "system", 0xF0)
    return fn(*args)


def test_ext_opcode_gadget_is_live(sandbox):
    path = sandbox.path("ext.pt", rf.pickle_of(Op.dict((Op.data("x"), _ext_call(sandbox.marker)))))
    report = sandbox.run(_with_extension, unrestricted_load, path, "pickle")
    assert sandbox.marker.exists(), report


@pytest.mark.parametrize("container", CONTAINERS)
def test_ext_opcode_goes_through_the_allowlist(sandbox, container):
    """EXT1 names a global through copyreg's registry, not by name: it must not bypass the rules."""
    p = Pickled(container)
    body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0))),
                   (Op.data("x"), _ext_call(sandbox.marker)))
    path = p.write(sandbox.path(f"ext.{container}.pt"), body)
    report = sandbox.run(_with_extension, try_apis, path, READER_APIS)
    assert report.kind == "returned", report
    for rec in report.value:
        if rec["api"] in LENIENT_APIS and rec["kind"] == "returned":
            continue
        assert rec["kind"] == "raised", rec
        assert any(_qualname(e) in rec["exc"]["mro"] for e in CODE_ERRORS), rec["exc"]
    assert not sandbox.marker.exists(), "the EXT1 gadget ran"
    assert not report.written


# == more: zip end records and headers that two parsers read differently ============================
def _other_members() -> list[rf.ZipMember]:
    members = benign_zip_members()
    members[0] = rf.ZipMember(b"archive/data.pkl", other_state_pickle())
    return members


def archive_in_the_comment() -> bytes:
    """The benign archive's end record gets a comment that is a whole second archive (offsets
    absolute): zipfile takes the end record at the very end of the file, the one inside the
    comment; a parser taking the first end record whose comment reaches the end reads the other."""
    benign = benign_zip()
    start = len(benign)
    hidden = rf.zip_bytes(_other_members(), prefix=b"\0" * start)[start:]
    return benign[:-2] + struct.pack("<H", len(hidden)) + hidden


def zip64_and_32_bit_end_records_disagree() -> bytes:
    """The 32-bit end record points at one central directory, the ZIP64 record (which zipfile
    prefers whenever its locator is there) at another."""
    out = bytearray()
    dirs = []
    for members in (benign_zip_members(), _other_members()):
        entries = []
        for m in members:
            entries.append(rf.central_entry(m, len(out)))
            out += rf.local_record(m, len(out))
        offset = len(out)
        out += b"".join(entries)
        dirs.append((len(entries), len(out) - offset, offset))
    z64_offset = len(out)
    (n64, size64, off64), (n32, size32, off32) = dirs[1], dirs[0]
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n64, n64, size64, off64)
    out += struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1)
    return bytes(out) + rf.eocd(n32, size32, off32)


def local_header_disagrees(what: str) -> bytes:
    data = bytearray(benign_zip())
    if what == "name":  # the local header of data/0 names another member (same length)
        at = data.index(b"archive/data/0")
        data[at:at + 14] = b"archive/data/9"
    else:  # the local header of data.pkl claims 10 bytes fewer than the central directory
        at = data.index(b"PK\x03\x04")
        csize, usize = struct.unpack("<II", data[at + 18:at + 26])
        data[at + 18:at + 26] = struct.pack("<II", csize - 10, usize - 10)
    return bytes(data)


def test_zip_end_record_variants_are_read_differently_by_zipfile():
    benign_pkl = rf.zip_read_from_first_eocd(benign_zip())["archive/data.pkl"]
    for data in (archive_in_the_comment(), zip64_and_32_bit_end_records_disagree()):
        assert zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl") == other_state_pickle()
        assert rf.zip_read_from_first_eocd(data)["archive/data.pkl"] == benign_pkl


@pytest.mark.parametrize("kind", ["archive-in-the-comment", "zip64-and-32-bit-disagree", "local-name-differs",
                                  "local-size-differs"])
def test_zip_records_that_parsers_read_differently_are_refused(sandbox, kind):
    data = {"archive-in-the-comment": archive_in_the_comment,
            "zip64-and-32-bit-disagree": zip64_and_32_bit_end_records_disagree,
            "local-name-differs": lambda: local_header_disagrees("name"),
            "local-size-differs": lambda: local_header_disagrees("size")}[kind]()
    assert_refused(sandbox, sandbox.path(f"zip-{kind}.pt", data), CorruptCheckpointError)


# == more: calls that are not REDUCE, globals that are not literal ===================================
def _side_door(kind: str, marker: Path, p: Pickled) -> bytes:
    cmd = Op.data(touch_command(marker))
    if kind == "INST":  # INST module\nname\n: calls the class with the MARKed arguments
        return b"(" + cmd + b"ios\nsystem\n"
    if kind == "OBJ":
        return b"(" + Op.glob("os", "system") + cmd + b"o"
    if kind == "STACK_GLOBAL-from-memo":  # the module name comes out of the memo, not a literal
        index = p._next_memo
        p._next_memo += 1
        module = Op.str("os") + Op.put(index) + b"0" + Op.get(index)
        return module + Op.str("system") + b"\x93" + Op.tuple(cmd) + b"R"
    if kind == "STACK_GLOBAL-from-a-call":  # ... or out of a call: builtins.str("os")
        module = Op.call(Op.glob("builtins", "str"), Op.data("os"))
        return module + Op.str("system") + b"\x93" + Op.tuple(cmd) + b"R"
    raise ValueError(kind)


SIDE_DOORS = ("INST", "OBJ", "STACK_GLOBAL-from-memo", "STACK_GLOBAL-from-a-call")


def _side_door_file(sb: Sandbox, kind: str, container: str) -> Path:
    p = Pickled(container)
    tensor = p.tensor("0", torch.arange(4.0))
    body = Op.dict((Op.data("w"), tensor), (Op.data("x"), _side_door(kind, sb.marker, p)))
    return p.write(sb.path(f"side-{kind}.{container}.pt"), body, protocol=4)


@pytest.mark.parametrize("kind", SIDE_DOORS)
def test_side_door_gadgets_are_live(sandbox, kind):
    assert_live(sandbox, _side_door_file(sandbox, kind, "zip"), "zip")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", SIDE_DOORS)
def test_side_door_gadgets_are_refused(sandbox, kind, container):
    assert_refused(sandbox, _side_door_file(sandbox, kind, container), CODE_ERRORS)


# == more: the legacy stream's other pickles ============================================================
def legacy_with_gadget(where: str, marker: Path) -> bytes:
    """A legacy file whose magic / protocol / sys_info / storage-key pickle calls os.system: a reader
    that is restricted only for the main pickle runs it."""
    gadget = pickle.dumps(rf.Reduce(os.system, (touch_command(marker),)), protocol=2)
    p = Pickled("legacy")
    main = rf.pickle_of(tiny_state_body(p))
    magic = pickle.dumps(rf.LEGACY_MAGIC, protocol=2)
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    parts = {"magic": magic, "protocol": pickle.dumps(1001, protocol=2), "sys_info": sys_info,
             "main": main, "keys": pickle.dumps(list(p.storages), protocol=2)}
    parts[where] = gadget
    data = b"".join(parts.values())
    for s in p.storages.values():
        data += struct.pack("<q", s.numel) + s.raw
    return data


LEGACY_PARTS = ("protocol", "sys_info", "keys")


def _legacy_gadget_file(sb: Sandbox, where: str, container: str) -> Path:
    data = legacy_with_gadget(where, sb.marker)
    if container == "legacy":
        return sb.path(f"legacy-gadget-{where}.pt", data)
    blob = rf.Reduce(torch.storage._load_from_bytes, (data,))  # the same stream as a storage blob
    path = sb.path(f"blob-gadget-{where}.pt")
    return synth.save_object({"w": torch.arange(4.0), "blob": blob}, path, "pickle")


@pytest.mark.parametrize("container", ["legacy", "pickle"])
@pytest.mark.parametrize("where", LEGACY_PARTS)
def test_legacy_stream_gadgets_are_live(sandbox, where, container):
    assert_live(sandbox, _legacy_gadget_file(sandbox, where, container), container)


@pytest.mark.parametrize("container", ["legacy", "pickle"])
@pytest.mark.parametrize("where", LEGACY_PARTS)
def test_legacy_stream_gadgets_are_refused(sandbox, where, container):
    assert_refused(sandbox, _legacy_gadget_file(sandbox, where, container), CODE_ERRORS)


def test_legacy_storage_key_listed_twice_is_refused(sandbox):
    """The key list names storage 0 twice, with different bytes each time: which is the tensor?"""
    p = Pickled("legacy")
    main = rf.pickle_of(tiny_state_body(p))
    s0, s1 = p.storages["0"], p.storages["1"]
    data = rf.legacy_preamble() + main + pickle.dumps(["0", "1", "0"], protocol=2)
    for raw in (s0.raw, s1.raw, bytes(reversed(s0.raw))):
        data += struct.pack("<q", len(raw) // 4) + raw
    assert_refused(sandbox, sandbox.path("legacy-key-twice.pt", data), CorruptCheckpointError)


# == more: shapes of the object graph =================================================================
def test_a_dict_that_contains_itself_is_refused(sandbox):
    p = Pickled("pickle")
    index = p._next_memo
    p._next_memo += 1
    tensor = p.tensor("0", torch.arange(4.0))
    body = b"}" + Op.put(index) + b"(" + Op.data("w") + tensor + Op.data("self") + Op.get(index) + b"u"
    assert_refused(sandbox, p.write(sandbox.path("self-dict.pt"), body), CheckpointError)


def test_shared_references_that_expand_exponentially_are_refused(sandbox):
    """d0 = {"w": tensor}; d(i) = {"a": d(i-1), "b": d(i-1)}, 60 levels: 2^60 keys from 2 KB."""
    p = Pickled("pickle")
    body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0))))
    for _ in range(60):
        index = p._next_memo
        p._next_memo += 1
        body += Op.put(index) + b"0"
        body += Op.dict((Op.data("a"), Op.get(index)), (Op.data("b"), Op.get(index)))
    path = p.write(sandbox.path("laughs.pt"), body)
    assert_refused(sandbox, path, CheckpointError, apis=QUICK_APIS)


def nested_blobs(levels: int) -> bytes:
    """A storage inside a _load_from_bytes blob inside a blob ... ``levels`` deep (torch.load reads it)."""
    inner = Pickled("legacy")
    blob = inner.finish(inner.storage("0", torch.float32, struct.pack("<4f", 1.5, 2.5, 3.5, 4.5)))
    for _ in range(levels):
        call = Op.call(Op.glob("torch.storage", "_load_from_bytes"), Op.data(blob))
        blob = rf.legacy_preamble() + rf.pickle_of(call) + pickle.dumps([], protocol=2)
    storage = Op.call(Op.glob("torch.storage", "_load_from_bytes"), Op.data(blob))
    return rf.pickle_of(Op.dict((Op.data("w"), rf.rebuild_v2(storage, 0, (4,), (1,)))))


def test_deeply_nested_blobs_end_in_a_typed_error_or_a_bounded_read(sandbox):
    """No legit writer nests blobs; 300 levels must not end in a RecursionError or a crash."""
    path = sandbox.path("nested-blobs.pt", nested_blobs(300))
    assert_refused(sandbox, path, CheckpointError, lenient=READER_APIS)


def test_safetensors_header_with_a_duplicate_key_is_refused(sandbox):
    """JSON allows a key twice; parsers differ on which one counts."""
    header = (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    data = rf.safetensors_bytes({"pad": ("F32", [2])}, raw_header=header)
    assert_refused(sandbox, sandbox.path("dup.safetensors", data), CorruptCheckpointError)


def _big_endian_read(path: Path) -> list[float]:
    return read_checkpoint(path).state_dict["w"].tolist()


def test_big_endian_zip_reads_as_torch_does_or_is_refused(sandbox):
    """A zip whose byteorder record says "big": torch byteswaps; reading it as little-endian would
    hand back other numbers without a word."""
    values = [1.5, -2.25, 3.0]
    p = Pickled("zip")
    body = Op.dict((Op.data("w"), rf.rebuild_v2(p.storage("0", torch.float32, struct.pack(">3f", *values)),
                                                0, (3,), (1,))))
    members = rf.torch_members(rf.pickle_of(body), {"0": struct.pack(">3f", *values)})
    members[1] = rf.ZipMember(b"archive/byteorder", b"big")
    path = sandbox.path("big-endian.pt", rf.zip_bytes(members))
    assert torch.load(path, weights_only=True)["w"].tolist() == values
    report = sandbox.run(_big_endian_read, path)
    if report.kind == "returned":
        assert report.value == values, f"read {report.value}, the file holds {values}"
    else:
        assert report.kind == "raised" and _qualname(CheckpointError) in report.exc["mro"], report


# == more: tensor views that do not fit their storage ===============================================
def _view(p: Pickled, kind: str) -> bytes:
    raw = struct.pack("<4f", 1.5, 2.5, 3.5, 4.5)
    storage = p.storage("0", torch.float32, raw)
    views = {
        "negative-stride": (3, (4,), (-1,)), "negative-offset": (-1, (4,), (1,)),
        "numel-overflows-int64": (0, (1 << 40, 1 << 40), (0, 0)), "float-size": (0, (4.0,), (1,)),
        "size-is-a-string": (0, "abcd", (1,)), "stride-shorter-than-size": (0, (2, 2), (1,)),
        "negative-size": (0, (-4,), (1,)),
    }
    if kind in views:
        offset, size, stride = views[kind]
        return rf.rebuild_v2(storage, offset, size, stride)
    if kind == "v3-dtype-wider-than-storage":  # 16 bytes read as 4 float64 = 32 bytes
        return rebuild_v3(storage, (4,), Op.glob("torch", "float64"))
    if kind == "parameter-of-a-non-tensor":
        return Op.call(Op.glob("torch._utils", "_rebuild_parameter"), Op.data(b"1234"), Op.data(False),
                       Op.ordered_dict())
    raise ValueError(kind)


TENSOR_VIEWS = ("negative-stride", "negative-offset", "numel-overflows-int64", "float-size",
                "size-is-a-string", "stride-shorter-than-size", "negative-size",
                "v3-dtype-wider-than-storage", "parameter-of-a-non-tensor")


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", TENSOR_VIEWS)
def test_tensor_views_that_do_not_fit_are_refused(sandbox, kind, container):
    p = Pickled(container)
    body = Op.dict((Op.data("w"), _view(p, kind)))
    assert_refused(sandbox, p.write(sandbox.path(f"view-{kind}.{container}.pt"), body), CheckpointError)


# == more: module records ==============================================================================
def _module_record(params: list[tuple[bytes, bytes]], modules: list[tuple[bytes, bytes]]) -> bytes:
    """An nn.Module as torch.save (protocol 2) writes one: copyreg._reconstructor, then BUILD with
    its __dict__."""
    record = Op.call(Op.glob("copyreg", "_reconstructor"), Op.glob("torch.nn.modules.module", "Module"),
                     Op.glob("builtins", "object"), Op.data(None))
    state = Op.dict((Op.data("training"), Op.data(True)), (Op.data("_parameters"), Op.dict(*params)),
                    (Op.data("_buffers"), Op.dict()), (Op.data("_modules"), Op.dict(*modules)))
    return Op.build(record, state)


def test_shared_submodules_that_expand_exponentially_are_refused(sandbox):
    """The module-tree form of the shared-reference bomb: each module's two children are one
    module, 60 levels deep."""
    p = Pickled("pickle")
    body = _module_record([(Op.data("weight"), p.tensor("0", torch.arange(4.0)))], [])
    for _ in range(60):
        index = p._next_memo
        p._next_memo += 1
        body += Op.put(index) + b"0"
        body += _module_record([], [(Op.data("a"), Op.get(index)), (Op.data("b"), Op.get(index))])
    path = p.write(sandbox.path("module-laughs.pt"), body)
    assert_refused(sandbox, path, CheckpointError, apis=QUICK_APIS)


@pytest.mark.parametrize("num_heads", [0, -2, 3, 10**9, "2"])
def test_pickled_head_count_that_cannot_build_is_refused(sandbox, small_encoder, num_heads):
    """The head count comes from the pickled attention module's record (shapes cannot say it):
    one that does not divide the width, or is no positive int, ends in a typed error."""
    import copy

    encoder = copy.deepcopy(small_encoder)
    for block in encoder.model.visual.transformer.resblocks:
        block.attn.__dict__["num_heads"] = num_heads
    path = synth.save_object(encoder, sandbox.path(f"heads-{num_heads}.pt"), "zip")
    assert_refused(sandbox, path, CheckpointError, apis=("ImageEncoder.load",))


# == round 2: findings of a second red team ==========================================================
# Each test below is one finding of the second round, shrunk to the smallest file that still
# crosses the reader's limit; where a limit is a large constant, it is lowered in the child
# (``setup``) and the file crosses the lowered limit through the same code path.
class Tripwire(BaseException):
    """Raised in the child by a spy where the reader must never get to. A BaseException: no
    handler of the reader's turns it into a typed error, so it surfaces as itself."""


def _inspect_in_child(sb: Sandbox, path: Path) -> tuple[int, str, str]:
    """``python -m pool inspect path`` in a forked child: bounded, no crash report, nothing written."""
    report = sb.run(_cli_in_process, ["inspect", str(path)])
    assert report.kind == "returned", report
    assert report.elapsed < TIME_LIMIT_S and report.peak_extra < MEMORY_LIMIT, report
    code, out, err = report.value
    assert "bug" not in err.lower() and "Traceback" not in err, err
    assert not report.written, report.written
    return code, out, err


# -- finding 1: a block index that str.isdigit() accepts and int() does not -----------------------------
@pytest.mark.parametrize("index", ["\u00b2", "\u2460"], ids=["superscript-two", "circled-one"])
def test_block_index_must_be_an_ascii_number(sandbox, index):
    """``visual.transformer.resblocks.².ln_1.weight``: '²' and '①' are digits to ``str.isdigit()``
    but int() refuses them. The loader and inspect end in ArchitectureMismatchError, not ValueError."""
    tensors = {**vit_tensors(), f"visual.transformer.resblocks.{index}.ln_1.weight": ("F32", [8])}
    path = sandbox.path(f"block-index-{ord(index):x}.safetensors", rf.safetensors_bytes(tensors))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=("ImageEncoder.load",))
    code, out, _ = _inspect_in_child(sandbox, path)
    assert code == 0 and re.search(r"^kind +encoder", out, re.M), (code, out)  # described, no crash


# -- finding 2: a width no head count divides ----------------------------------------------------------
@pytest.mark.parametrize("tower", ["image", "text"])
def test_attention_heads_must_split_the_width(sandbox, tower):
    """No pickled head count: heads = width // 64. A width of 129 (the image tower's, or the text
    width read off ``visual.proj``) does not split into 2 heads; open_clip's MultiheadAttention
    would fail an assert. A typed error, before anything is built."""
    shapes = vit_tensors(width=129, patch=1, grid=1, embed=1) if tower == "image" else vit_tensors(embed=129)
    path = sandbox.path(f"width-129-{tower}.safetensors", rf.safetensors_bytes(shapes))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=("ImageEncoder.load",))


# -- finding 3: integer and bool weights -----------------------------------------------------------------
NOT_FLOAT = {
    "head-I64": ("ClassificationHead.load", {"weight": ("I64", [3, 4]), "bias": ("I64", [3])}),
    "head-U8": ("ClassificationHead.load", {"weight": ("U8", [3, 4]), "bias": ("U8", [3])}),
    "head-BOOL": ("ClassificationHead.load", {"weight": ("BOOL", [3, 4]), "bias": ("BOOL", [3])}),
    "head-F32-weight-BOOL-bias": ("ClassificationHead.load", {"weight": ("F32", [3, 4]), "bias": ("BOOL", [3])}),
    "encoder-I64": ("ImageEncoder.load", {k: ("I64", shape) for k, (_, shape) in vit_tensors().items()}),
}


@pytest.mark.parametrize("case", sorted(NOT_FLOAT))
def test_weights_must_be_floating_point(sandbox, case):
    """nn.Parameter of an integer tensor, or load_state_dict(assign=True) of one, raises
    RuntimeError: a head or an encoder whose weights are not floating point is refused, typed."""
    api, tensors = NOT_FLOAT[case]
    path = sandbox.path(f"not-float-{case}.safetensors", rf.safetensors_bytes(tensors))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=(api,))


# -- finding 4: a head bias that does not fit its weight --------------------------------------------------
@pytest.mark.parametrize("shape", [[7], [3, 3], []], ids=["7", "3x3", "scalar"])
def test_head_bias_must_match_its_classes(sandbox, shape):
    """Weight [3, 4]: a bias of any shape but [3] loaded without complaint and failed at forward."""
    path = sandbox.path(f"head-bias-{len(shape)}d.safetensors",
                        rf.safetensors_bytes({"weight": ("F32", [3, 4]), "bias": ("F32", shape)}))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=("ClassificationHead.load",))


# -- finding 5: a head with no inputs (or no classes) -----------------------------------------------------
@pytest.mark.parametrize("shape", [[1 << 28, 0], [(1 << 62) - 1, 0], [0, 4]], ids=["2^28x0", "2^62-1x0", "0x4"])
def test_head_without_classes_or_inputs_is_refused_without_allocating(sandbox, shape):
    """A weight of shape [N, 0] is 0 bytes; without a bias the head made torch.zeros(N) and a clone
    of it (2 GiB from a 100-byte file for N = 2^28; a RuntimeError for 2^62). Refused from the shape."""
    path = sandbox.path(f"head-{shape[0]}x{shape[1]}.safetensors", rf.safetensors_bytes({"weight": ("F32", shape)}))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=("ClassificationHead.load",))


# -- finding 6: zero-element tensors with sizes, strides or offsets beyond int64 ---------------------------
ZERO_ELEMENT_VIEWS = {  # (offset, size, stride): no elements, so no byte is read; Tensor.set_ overflows
    "size-2^70": (0, (0, 1 << 70), (1, 1)),
    "stride-2^66": (0, (0, 3), (1 << 66, 1)),
    "offset-2^64": (1 << 64, (0,), (1,)),
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", sorted(ZERO_ELEMENT_VIEWS))
def test_zero_element_tensors_get_the_range_checks_too(sandbox, kind, container):
    """A tensor with no elements reads no byte, so the bounds check against its storage passed
    it; its size, stride or offset beyond int64 then reached Tensor.set_ (TypeError, ValueError,
    RuntimeError). Every size, stride and offset is checked, whatever the element count."""
    p = Pickled(container)
    offset, size, stride = ZERO_ELEMENT_VIEWS[kind]
    body = Op.dict((Op.data("w"), rf.rebuild_v2(p.storage("0", torch.float32, bytes(16)), offset, size, stride)))
    path = p.write(sandbox.path(f"zero-element-{kind}.{container}.pt"), body)
    assert_refused(sandbox, path, CorruptCheckpointError)


def test_safetensors_zero_element_shape_beyond_int64_is_refused(sandbox):
    """The same in a safetensors header: shape [2^64, 0] spans 0 bytes, as its offsets say."""
    header = b'{"w":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}'
    path = sandbox.path("zero-element-2^64.safetensors", rf.safetensors_bytes({"pad": ("F32", [4])},
                                                                             raw_header=header))
    assert_refused(sandbox, path, CorruptCheckpointError)


# -- finding 7: a safetensors dtype that is no string -----------------------------------------------------
@pytest.mark.parametrize("dtype", ['["F32"]', "{}"], ids=["list", "object"])
def test_safetensors_dtype_must_be_a_string(sandbox, dtype):
    """``"dtype": ["F32"]``: ``dtype not in SAFETENSORS_DTYPES`` raised TypeError (unhashable)."""
    header = ('{"w":{"dtype":' + dtype + ',"shape":[1],"data_offsets":[0,4]}}').encode()
    path = sandbox.path("dtype-not-a-string.safetensors", rf.safetensors_bytes({"pad": ("F32", [1])},
                                                                              raw_header=header))
    assert_refused(sandbox, path, CorruptCheckpointError)
    code, _, err = _inspect_in_child(sandbox, path)
    assert code == 2, (code, err)  # an unreadable file, reported as one (an untyped error exits 1 as a bug)


# -- finding 8: integers too long to print -----------------------------------------------------------------
HUGE_INT = 1 << 16_000  # 4,817 digits, beyond int->str's 4,300-digit limit; one LONG4 of 2 KB


def _huge_int_file(sb: Sandbox, case: str) -> Path:
    container = case.rsplit("-", 1)[1]
    p = Pickled(container)
    if case.startswith("key-"):  # a state-dict key
        body = Op.dict((Op.data(HUGE_INT), p.tensor("0", torch.arange(4.0))))
    elif case == "size-zip":  # a size entry: the refusal message formats the size
        body = Op.dict((Op.data("w"), rf.rebuild_v2(p.storage("0", torch.float32, bytes(16)), 0, (HUGE_INT, 4),
                                                    (4, 1))))
    elif case == "storage-key-list-legacy":  # the legacy stream's list of storage keys
        main = rf.pickle_of(Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0)))))
        data = rf.legacy_preamble() + main + pickle.dumps([HUGE_INT], protocol=2)
        return sb.path(f"huge-int-{case}.pt", data)
    else:
        raise ValueError(case)
    return p.write(sb.path(f"huge-int-{case}.pt"), body)


HUGE_INT_CASES = ("key-zip", "key-legacy", "key-pickle", "size-zip", "storage-key-list-legacy")


@pytest.mark.parametrize("case", HUGE_INT_CASES)
def test_integers_too_long_to_print_end_in_typed_errors(sandbox, case):
    """A 2 KB integer where a state-dict key, a size or a legacy storage key belongs: str() / an
    f-string of it raised ValueError (exceeds the limit for integer string conversion). Refused,
    and described, typed."""
    assert_refused(sandbox, _huge_int_file(sandbox, case), CorruptCheckpointError)


def test_inspect_describes_a_head_whose_attribute_is_too_long_to_print(sandbox):
    """A pickled head whose ``normalize`` is a 4,817-digit integer: inspect's ``normalize={stored}``
    raised ValueError, reported as a bug in pool."""
    p = Pickled("zip")
    state = Op.dict((Op.data("_parameters"), Op.dict((Op.data("weight"), p.tensor("0", torch.ones(3, 4))))),
                    (Op.data("_buffers"), Op.dict()), (Op.data("_modules"), Op.dict()),
                    (Op.data("normalize"), Op.data(HUGE_INT)))
    body = Op.build(Op.newobj(Op.glob("src.modeling", "ClassificationHead")), state)  # as pickle writes it
    path = p.write(sandbox.path("head-huge-normalize.pt"), body)
    code, out, err = _inspect_in_child(sandbox, path)
    assert code == 0 and re.search(r"^kind +head\b", out, re.M), (code, out, err)


# -- finding 9: multiplying huge sizes out ---------------------------------------------------------------
@pytest.mark.parametrize("container", CONTAINERS)
def test_huge_sizes_are_refused_before_any_arithmetic(sandbox, container):
    """A 66 KB file: one 512-Kbit integer (LONG4), memoised and used 64 times as a tensor's size.
    math.prod of the sizes took minutes of CPU; each size is refused as beyond int64 first."""
    p = Pickled(container)
    storage = p.storage("0", torch.float32, bytes(16))  # its memo index first, as the stream has it
    index = p._next_memo
    p._next_memo += 1
    size = b"(" + Op.data((1 << 524_287) - 1) + Op.put(index) + Op.get(index) * 63 + b"t"
    tensor = Op.call(Op.glob("torch._utils", "_rebuild_tensor_v2"), storage, Op.data(0), size,
                     Op.data((1,) * 64), Op.data(False), Op.ordered_dict())
    path = p.write(sandbox.path(f"prod-bomb.{container}.pt"), Op.dict((Op.data("w"), tensor)))
    assert_refused(sandbox, path, CorruptCheckpointError)


# -- finding 10: a model built for as many blocks as the keys name ----------------------------------------
def _no_model_is_built() -> None:
    """(In the child.) Building an open_clip model, by whatever name the loader calls, trips."""
    import open_clip
    import open_clip.model

    import pool.arch
    import pool.modeling

    def trip(*args: Any, **kwargs: Any) -> None:
        raise Tripwire("a model was built for a file whose block keys should have been refused")

    open_clip.model.CLIP = open_clip.CLIP = trip
    for module in (pool.arch, pool.modeling):
        if hasattr(module, "build_clip"):
            module.build_clip = trip


@pytest.mark.parametrize("blocks", [MAX_LAYERS + 1, 8], ids=["more-than-MAX_LAYERS", "blocks-without-weights"])
def test_block_count_is_bounded_before_a_model_is_built(sandbox, blocks):
    """Zero-byte keys ``visual.transformer.resblocks.N.x`` for N up to 20,000 made the loader build a
    20,000-block CLIP (> 10 s, > 1 GB) before it compared keys. The block count is bounded
    (`pool.arch.infer.MAX_LAYERS`) and every block must hold its weights, checked before any model is
    built (a spy makes building one fail the test)."""
    tensors = {**vit_tensors(), **{f"visual.transformer.resblocks.{i}.x": ("F32", [0]) for i in range(1, blocks)}}
    path = sandbox.path(f"blocks-{blocks}.safetensors", rf.safetensors_bytes(tensors))
    assert_refused(sandbox, path, ArchitectureMismatchError, apis=("ImageEncoder.load",), setup=_no_model_is_built)


# -- finding 11: one mapping, many references --------------------------------------------------------
def _shared_mapping_file(sb: Sandbox, pairs: int, refs: int) -> Path:
    """{"w": a real tensor, "k0": OrderedDict([("a", None)] * pairs), "k1".."k<refs-1>": the same
    record again}: the pair is one memoised tuple (2 bytes per pair), the mapping one memoised record."""
    p = Pickled("zip")
    tensor = p.tensor("0", torch.arange(4.0))
    pair, mapping = p._next_memo, p._next_memo + 1
    p._next_memo += 2
    assert pair < 256
    items = b"](" + Op.data(("a", None)) + Op.put(pair) + (b"h" + bytes([pair])) * (pairs - 1) + b"e"
    shared = Op.call(Op.glob("collections", "OrderedDict"), items) + Op.put(mapping)
    body = Op.dict((Op.data("w"), tensor), (Op.data("k0"), shared),
                   *[(Op.data(f"k{i}"), Op.get(mapping)) for i in range(1, refs)])
    return p.write(sb.path(f"shared-mapping-{pairs}x{refs}.pt"), body)


def test_a_mapping_with_more_pairs_than_the_walk_allows_is_refused(sandbox):
    """The pairs of one mapping record count against `pool.record_values.MAX_WALK_ENTRIES` (they were one
    step, however many), so a single reference to one with more pairs than that is refused."""
    path = _shared_mapping_file(sandbox, MAX_WALK_ENTRIES + 1, 1)
    assert_refused(sandbox, path, CorruptCheckpointError)


def test_a_shared_mapping_is_built_once(sandbox):
    """An OrderedDict record of 1,000,000 pairs referenced by 150 keys: the walker rebuilt it at every
    reference (150 million pairs, a hang). Here half of `MAX_WALK_ENTRIES` pairs, referenced 1,000
    times (10^8 pairs if rebuilt each time, minutes): built once, the read returns the file's one
    tensor quickly."""
    path = _shared_mapping_file(sandbox, MAX_WALK_ENTRIES // 2, 1_000)
    report = sandbox.run(try_apis, path, QUICK_APIS)
    assert report.kind == "returned", report
    assert report.elapsed < TIME_LIMIT_S and report.peak_extra < MEMORY_LIMIT, report
    for rec in report.value:
        assert rec["kind"] == "returned", rec
        assert rec["summary"] == "Checkpoint {'w': (4,)}" and not rec["not_from_file"], rec
    assert not report.written


# -- finding 12: module attributes scanned without being charged ------------------------------------------
def test_module_attributes_are_charged_to_the_walk(sandbox):
    """A pickled module whose attributes are all one memoised 999-int tuple: each attribute's check
    looked at 1,000 items uncharged (200,000 attributes: a hang). Charged, enough of them pass
    `MAX_WALK_ENTRIES`; refused, though the module holds a real weight."""
    items = 999
    attrs = MAX_WALK_ENTRIES // (items + 1) + 1
    p = Pickled("zip")
    weight = p.tensor("0", torch.ones(3, 4))
    shared = p._next_memo
    p._next_memo += 1
    extra = [(Op.data("a0"), Op.data((1,) * items) + Op.put(shared))]
    extra += [(Op.data(f"a{i}"), Op.get(shared)) for i in range(1, attrs)]
    state = Op.dict((Op.data("training"), Op.data(False)),
                    (Op.data("_parameters"), Op.dict((Op.data("weight"), weight))),
                    (Op.data("_buffers"), Op.dict()), (Op.data("_modules"), Op.dict()), *extra)
    body = Op.build(Op.newobj(Op.glob("src.modeling", "ClassificationHead")), state)
    assert_refused(sandbox, p.write(sandbox.path("module-attributes.pt"), body), CorruptCheckpointError)


# -- finding 13: one storage blob, many records ------------------------------------------------------------
@pytest.mark.parametrize("where", ["in-place", "in-memory"])
def test_a_shared_storage_blob_is_parsed_once(sandbox, where):
    """One legacy blob passed to many ``torch.storage._load_from_bytes`` records (memo references):
    each record was parsed and its storage copied and kept, over a GiB from a file of a few hundred
    KB. One parse per distinct byte string: a 64 KiB blob (left in the file, `InPlaceBytes`) or a
    32 KiB one (a bytes object), 1.25 GiB worth of records."""
    raw = (64 << 10) if where == "in-place" else (32 << 10)
    records = 5 * MEMORY_LIMIT // 4 // raw
    inner = Pickled("legacy")
    blob = inner.finish(inner.storage("0", torch.float32, b"\x01" * raw))
    first = Op.glob("torch.storage", "_load_from_bytes") + Op.put(0) + Op.tuple(Op.data(blob) + Op.put(1)) + b"R"
    rest = (Op.get(0) + Op.tuple(Op.get(1)) + b"R") * (records - 1)
    path = sandbox.path(f"shared-blob-{where}.pt", rf.pickle_of(b"](" + first + rest + b"e"))
    assert_refused(sandbox, path, CheckpointError, apis=QUICK_APIS)  # no tensors: refused, within bounds


# -- findings 14 and 15: BUILD on what the reader made of a persistent id ---------------------------------
STORAGE_REF_STATES = {"dtype-none": Op.dict((Op.data("dtype"), Op.data(None))),
                      "key-list": Op.dict((Op.data("key"), b"]"))}


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("state", sorted(STORAGE_REF_STATES))
def test_build_cannot_reach_a_storage_reference(sandbox, state, container):
    """BUILD with a dict state on what a storage's persistent id returned: the unpickler wrote into
    the validated (frozen) storage reference's ``__dict__``. The pickle only ever reaches a wrapper
    whose change is refused."""
    p = Pickled(container)
    storage = Op.build(p.storage("0", torch.float32, struct.pack("<4f", 1, 2, 3, 4)), STORAGE_REF_STATES[state])
    body = Op.dict((Op.data("w"), rf.rebuild_v2(storage, 0, (4,), (1,))))
    assert_refused(sandbox, p.write(sandbox.path(f"build-on-storage-{state}.{container}.pt"), body),
                   CorruptCheckpointError)


@pytest.mark.parametrize("offset", [10**9, 1 << 70], ids=["past-the-end", "beyond-int64"])
def test_build_cannot_reach_an_in_place_byte_string(sandbox, offset):
    """Plain pickle: a 70,000-byte string (left in the file by the reader) given a BUILD that sets its
    ``view`` (another legacy stream) and its file ``offset``: EOFError / OverflowError. Refused."""
    inner = Pickled("legacy")
    other = inner.finish(inner.storage("0", torch.float32, bytes(16)))
    state = Op.dict((Op.data("offset"), Op.data(offset)), (Op.data("view"), Op.data(other)))
    blob = Op.build(Op.data(bytes(70_000)), state)
    storage = Op.call(Op.glob("torch.storage", "_load_from_bytes"), blob)
    body = Op.dict((Op.data("w"), rf.rebuild_v2(storage, 0, (4,), (1,))))
    path = sandbox.path(f"build-on-in-place-bytes-{offset.bit_length()}.pt", rf.pickle_of(body))
    assert_refused(sandbox, path, CorruptCheckpointError)


# -- finding 16: opcodes that create nothing ----------------------------------------------------------------
SMALL_OPCODE_LIMIT = 10_000
FREE_OPCODES: dict[str, Callable[[int], bytes]] = {  # memo index free to use -> one unit of filler
    "MEMOIZE": lambda index: b"\x94",
    "BINPUT-one-index": lambda index: Op.put(index),
    "MARK-POP_MARK": lambda index: b"(1",
    "FRAME": lambda index: b"\x95" + bytes(8),
}


def _lower_opcode_limit() -> None:
    pool.pickle_scan.MAX_OPCODES = SMALL_OPCODE_LIMIT


@pytest.mark.parametrize("kind", sorted(FREE_OPCODES))
def test_every_opcode_counts_against_the_scan_limit(sandbox, kind):
    """25 MB of MEMOIZE (or PUT, MARK/POP_MARK, FRAME) after a real state dict: opcodes that create
    no object were not counted, so the scan and the unpickler ran through all of them (> 10 s).
    With `MAX_OPCODES` lowered to 10,000 in the child, 10,001 of them are refused."""
    unit = FREE_OPCODES[kind]
    assert pickle.loads(rf.pickle_of(Op.data("w") + unit(0) * 3, 4)) == "w"  # a valid pickle otherwise
    p = Pickled("zip")
    body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0))))
    filler = unit(p._next_memo) * (SMALL_OPCODE_LIMIT + 1)
    path = p.write(sandbox.path(f"free-opcodes-{kind}.pt"), body + filler, protocol=4)
    assert_refused(sandbox, path, CorruptCheckpointError, setup=_lower_opcode_limit)


def test_memo_entries_are_bounded_at_the_real_limit(sandbox):
    """The same without lowering anything: `MAX_OBJECTS` + 1 MEMOIZE opcodes (2 MB) are refused."""
    p = Pickled("zip")
    body = Op.dict((Op.data("w"), p.tensor("0", torch.arange(4.0)))) + b"\x94" * (pool.pickle_scan.MAX_OBJECTS + 1)
    path = p.write(sandbox.path("memoize.pt"), body, protocol=4)
    assert_refused(sandbox, path, CorruptCheckpointError, apis=("read_checkpoint",))


# -- finding 17: rows of `inspect` forged by line breaks in file text -------------------------------------
FORGED_ROWS = "sha256              " + "0" * 64 + "{sep}kind                head: 10 classes"


def _forging_safetensors(where: str, sep: str) -> bytes:
    forged = "1" + sep + FORGED_ROWS.format(sep=sep)
    header: dict[str, Any] = {"weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}
    if where == "metadata-value":
        header["__metadata__"] = {"a": forged}
    elif where == "metadata-key":
        header["__metadata__"] = {forged: "1"}
    else:  # a tensor name: the "keys" row lists it
        header = {forged: header["weight"]}
    return rf.safetensors_bytes({"pad": ("F32", [1])}, raw_header=json.dumps(header).encode())


def _assert_one_row_each(out: str, sep: str) -> None:
    lines = out.splitlines()
    assert sum(line.startswith("sha256") for line in lines) == 1, out
    assert sum(line.startswith("kind") for line in lines) == 1, out
    for ch in sep.replace("\n", "") + "\x1b":  # inspect writes newlines itself: those are counted above
        assert ch not in out, f"raw {ch!r} from the file on stdout: {out!r}"


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\x85", "\u2028"], ids=["LF", "CRLF", "NEL", "LINE-SEPARATOR"])
@pytest.mark.parametrize("where", ["metadata-value", "metadata-key", "tensor-name"])
def test_inspect_rows_cannot_be_forged_with_line_breaks(sandbox, where, sep):
    """A line break in file text printed raw starts a row of the file's choosing (a second sha256, a
    fake kind): every line break str.splitlines() knows is escaped."""
    path = sandbox.path("forged-rows.safetensors", _forging_safetensors(where, sep))
    code, out, err = _inspect_in_child(sandbox, path)
    assert code == 0, (code, out, err)
    _assert_one_row_each(out, sep)


def test_inspect_rows_cannot_be_forged_on_the_command_line(sandbox):
    """The red team's own case, through ``python -m pool inspect`` on a pipe: a metadata value with
    newlines shows as one escaped row."""
    path = sandbox.path("forged-rows.safetensors", _forging_safetensors("metadata-value", "\n"))
    proc = _run_cli(["inspect", str(path)])
    out, err = proc.stdout.decode("utf-8", "surrogateescape"), proc.stderr.decode("utf-8", "surrogateescape")
    assert proc.returncode == 0, (proc.returncode, out, err)
    _assert_one_row_each(out, "\n")
