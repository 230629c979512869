"""Fuzz the reader with mutated and truncated golden files (open_clip 2.0.2 writers, every container).

Every outcome is a correct read (a state dict of tensors) or a `pool.errors.CheckpointError`
subclass: never another exception, never a hang, and nothing from the file ever runs. Bounded and
derandomised by default (the ``ci`` Hypothesis profile, conftest.py) so a run is fast and
repeatable; ``POOL_HYPOTHESIS_PROFILE=fuzz`` tries thousands of random mutations instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import resource
import signal
import sys
import threading
from pathlib import Path

import open_clip.model  # noqa: F401  (legacy reads compare class sources with importable modules)
import pytest
import torch
from helpers import edit_data_pkl, examples, member_spans
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.checkpoint import read_checkpoint
from pool.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

GOLDEN = Path(__file__).parent / "data" / "golden"
ARCH = "tiny-vit-quickgelu"
FILES = {
    "zip": GOLDEN / f"enc_{ARCH}.zip.pt",
    "legacy": GOLDEN / f"enc_{ARCH}.legacy.pt",
    "pickle": GOLDEN / f"enc_{ARCH}.pickle.pt",
    "state_dict": GOLDEN / f"enc_{ARCH}.state_dict.pt",
    "head_pickle": GOLDEN / f"head_{ARCH}.pickle.pt",
}
HANG_SECONDS = 20
# An address-space cap during each read: a few mutated bytes can ask the C unpickler for GiBs (huge
# FRAME / BINBYTES8 lengths are only reserved, a huge memo index is also touched: see
# test_memo_index_bomb). Under the cap those fail fast with MemoryError -> CorruptCheckpointError.
MEMORY_HEADROOM = 1 << 30
FUZZ = settings(max_examples=examples(25), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the file bytes and where their regions lie, computed once per module -------------------------
def _pickle_spans(data: bytes, start: int, count: int) -> int:
    """End offset of ``count`` consecutive pickles starting at ``start``."""
    buf = io.BytesIO(data)
    buf.seek(start)
    for _ in range(count):
        for _op in pickletools.genops(buf):
            pass
    return buf.tell()


def _zip_regions(data: bytes) -> tuple[list[range], list[range]]:
    pickled, tensors = [], []
    for name, span in member_spans(data).items():
        if name.endswith("data.pkl"):
            pickled.append(span)
        elif "/data/" in name and len(span):
            tensors.append(span)
    return pickled, tensors


def _legacy_regions(data: bytes) -> tuple[list[range], list[range]]:
    end = _pickle_spans(data, 0, 5)  # magic, protocol, sys_info, object, storage keys
    return [range(0, end)], [range(end, len(data))]


_BLOB_HEADER = {"SHORT_BINBYTES": 2, "BINBYTES": 5, "BINBYTES8": 9}


def _plain_pickle_regions(data: bytes) -> tuple[list[range], list[range]]:
    """Outer pickle + nested legacy pickles vs the raw storage bytes inside the nested blobs."""
    tensors: list[range] = []
    for op, arg, pos in pickletools.genops(data):
        if op.name in _BLOB_HEADER and isinstance(arg, bytes) and arg[:1] == b"\x80":
            start = pos + _BLOB_HEADER[op.name]
            raw = _pickle_spans(arg, 0, 5)  # the blob is a legacy torch file
            if raw < len(arg):
                tensors.append(range(start + raw, start + len(arg)))
    covered = sorted(tensors, key=lambda r: r.start)
    pickled, cursor = [], 0
    for r in covered:
        pickled.append(range(cursor, r.start))
        cursor = r.stop
    pickled.append(range(cursor, len(data)))
    return [r for r in pickled if len(r)], tensors


def _regions(kind: str, data: bytes) -> tuple[list[range], list[range]]:
    if data[:4] == b"PK\x03\x04":
        return _zip_regions(data)
    if kind == "legacy":
        return _legacy_regions(data)
    return _plain_pickle_regions(data)


BYTES = {kind: path.read_bytes() for kind, path in FILES.items()}
REGIONS = {kind: _regions(kind, data) for kind, data in BYTES.items()}
_SHAPES: dict[str, dict] = {}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the mutated files are written (pytest's temporary tree: removed with it)."""
    return tmp_path_factory.mktemp("golden_fuzz")


def _golden_shapes(kind: str, scratch: Path) -> dict:
    if kind not in _SHAPES:
        outcome = _read(kind, BYTES[kind], scratch)
        assert not isinstance(outcome, CheckpointError), outcome
        _SHAPES[kind] = {k: v.shape for k, v in outcome.state_dict.items()}
    return _SHAPES[kind]


# -- guards ---------------------------------------------------------------------------------------
class _Hang(BaseException):  # BaseException: the reader's `except Exception` must not swallow it
    pass


_GADGET_EVENTS = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "subprocess.Popen",
                  "socket.connect", "ctypes.dlopen", "os.startfile")


class _GadgetAudit:
    """Records process and network audit events while a guarded read is in progress.

    An audit hook cannot be removed, so the hook is added once, on the first guarded read (not on
    import: collecting this file changes nothing), and is a no-op (one attribute check) whenever
    no read is in progress: the rest of the test run never sees it. The switch is process-wide on
    purpose (not a context variable): an event raised in one of the reader's worker threads
    counts too.
    """

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, str]] = []
        self._installed = False
        self._lock = threading.Lock()

    def hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event.startswith(_GADGET_EVENTS):
            try:
                detail = repr(args)[:200]
            except Exception:  # noqa: BLE001 - a hostile repr must not break the hook
                detail = "<unprintable>"
            self.events.append((event, detail))

    @contextlib.contextmanager
    def recording(self):
        with self._lock:
            if not self._installed:
                sys.addaudithook(self.hook)
                self._installed = True
        self.events = []
        self.active = True
        try:
            yield self.events
        finally:
            self.active = False


_AUDIT = _GadgetAudit()


@contextlib.contextmanager
def _guarded(kind: str):
    """A wall-clock limit, an address-space cap and an audit of process/network events."""

    def on_alarm(signum, frame):
        raise _Hang(f"read did not finish in {HANG_SECONDS} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_SECONDS)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + MEMORY_HEADROOM
    if hard == resource.RLIM_INFINITY or cap < hard:  # a memory bomb fails fast instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        with _AUDIT.recording() as events:
            yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not events, f"a gadget ran: {events}"


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _read(kind: str, data: bytes, scratch: Path):
    """Write ``data`` under ``scratch`` and read it; return the Checkpoint or the CheckpointError
    raised."""
    path = os.path.join(scratch, f"{kind}.pt")
    with open(path, "wb") as f:
        f.write(data)
    with _guarded(kind):
        try:
            return read_checkpoint(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) or os.path.basename(path) in str(exc), exc
            return exc


def _assert_outcome(kind: str, outcome, scratch: Path, *, tensors_only: bool = False) -> None:
    if isinstance(outcome, CheckpointError):
        return
    sd = outcome.state_dict
    assert isinstance(sd, dict) and sd
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    if tensors_only:  # only tensor bytes changed: same keys and shapes, values may differ
        assert {k: v.shape for k, v in sd.items()} == _golden_shapes(kind, scratch)


def _offsets(kind: str, which: int):
    spans = REGIONS[kind][which]
    assert spans, f"{kind}: no region {which}"
    total = sum(len(r) for r in spans)

    def locate(i: int) -> int:
        for r in spans:
            if i < len(r):
                return r.start + i
            i -= len(r)
        raise AssertionError

    return st.integers(0, total - 1).map(locate)


KINDS = list(FILES)


@pytest.mark.parametrize("kind", KINDS)
def test_unmutated_files_read(kind, scratch):
    assert _golden_shapes(kind, scratch)
    assert REGIONS[kind][0] and REGIONS[kind][1], "pickle and tensor regions found"


# -- mutations --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_truncated(kind, scratch):
    data = BYTES[kind]

    @FUZZ
    @given(st.integers(0, len(data) - 1))
    def run(n):
        outcome = _read(kind, data[:n], scratch)
        # a truncated file never reads as if it were whole
        assert isinstance(outcome, CheckpointError), f"{kind} truncated to {n} of {len(data)} bytes read"

    run()


def _overwrite_strategy(kind: str, which: int):
    return st.lists(st.tuples(_offsets(kind, which), st.integers(0, 255)), min_size=1, max_size=8)


def _flip_strategy(kind: str, which: int):
    return st.lists(st.tuples(_offsets(kind, which), st.integers(0, 7)), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_bytes_overwritten(kind, scratch):
    @FUZZ
    @given(_overwrite_strategy(kind, 0))
    def run(edits):
        data = bytearray(BYTES[kind])
        for pos, value in edits:
            data[pos] = value
        _assert_outcome(kind, _read(kind, bytes(data), scratch), scratch)

    run()


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_bits_flipped(kind, scratch):
    @FUZZ
    @given(_flip_strategy(kind, 0))
    def run(flips):
        data = bytearray(BYTES[kind])
        for pos, bit in flips:
            data[pos] ^= 1 << bit
        _assert_outcome(kind, _read(kind, bytes(data), scratch), scratch)

    run()


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_bits_flipped(kind, scratch):
    @FUZZ
    @given(_flip_strategy(kind, 1))
    def run(flips):
        data = bytearray(BYTES[kind])
        for pos, bit in flips:
            data[pos] ^= 1 << bit
        _assert_outcome(kind, _read(kind, bytes(data), scratch), scratch, tensors_only=True)

    run()


# -- explicit gadgets spliced into the golden pickles -----------------------------------------------
def _gadget(marker: Path) -> bytes:
    """GLOBAL 'os system', MARK, STRING cmd, TUPLE, REDUCE, POP: calls os.system(cmd), drops the
    result; cmd creates ``marker``."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR0"


def _splice(kind: str, gadget: bytes) -> bytes:
    data = BYTES[kind]
    if data[:4] == b"PK\x03\x04":  # after PROTO, before the first FRAME
        return edit_data_pkl(data, lambda body: body[:2] + gadget + body[2:])
    if kind == "legacy":  # into the object pickle, the 4th in the file
        start = _pickle_spans(data, 0, 3)
        return data[:start + 2] + gadget + data[start + 2:]
    return data[:2] + gadget + data[2:]


def _nested_blob_gadget(gadget: bytes) -> bytes:
    """A plain pickle whose nested ``torch.storage._load_from_bytes`` blob carries the gadget."""
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    blob = legacy.getvalue()
    start = _pickle_spans(blob, 0, 3)
    evil = blob[:start + 2] + gadget + blob[start + 2:]

    class Blob:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (evil,))

    return pickle.dumps({"state_dict": {"w": Blob()}}, protocol=4)


@pytest.mark.parametrize("kind", [*KINDS, "nested_blob"])
def test_spliced_os_system_gadget_is_refused_and_never_runs(kind, scratch):
    marker = scratch / f"gadget-ran-{kind}"
    gadget = _gadget(marker)
    data = _nested_blob_gadget(gadget) if kind == "nested_blob" else _splice(kind, gadget)
    assert gadget in data
    outcome = _read("pickle" if kind == "nested_blob" else kind, data, scratch)
    assert not marker.exists(), "the gadget ran"
    assert isinstance(outcome, UnsafeCheckpointError), outcome
    assert "os.system" in outcome.globals or "posix.system" in outcome.globals


# Regression: CPython's C Unpickler grows its memo *array* to twice a BINPUT/LONG_BINPUT index and
# fills it, so 5 bytes (``r`` + a 4-byte index) made it allocate and touch up to 32 GiB (a stall or
# the OOM killer). The fuzz found it in the head pickle (a MEMOIZE byte turned into LONG_BINPUT);
# pool/pickle_scan.py now refuses any memo index a sequential pickler would not write before the C
# unpickler sees the bytes.
def test_memo_index_bomb(scratch):
    """9 bytes: PROTO 4, EMPTY_DICT, LONG_BINPUT 0x01000000, STOP -> must not allocate 256 MiB."""
    import tracemalloc

    data = b"\x80\x04}r" + (0x01000000).to_bytes(4, "little") + b"."
    tracemalloc.start()
    try:
        outcome = _read("pickle", data, scratch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, CheckpointError)
    assert peak < 64 << 20, f"a 9-byte file made the reader allocate {peak / 2**20:.0f} MiB"


def test_the_audit_guard_fails_a_read_that_runs_a_gadget(scratch, monkeypatch):
    """The guard every read above runs under is live: a process event during a read fails it (an
    audit event raised by hand: nothing runs), and the same event outside a read is not recorded."""
    def runs_a_gadget(path, *args, **kwargs):
        sys.audit("os.system", b"touch /nonexistent/marker")
        raise CorruptCheckpointError(f"{path}: refused")

    monkeypatch.setattr(sys.modules[__name__], "read_checkpoint", runs_a_gadget)
    with pytest.raises(AssertionError, match="a gadget ran: .*os.system"):
        _read("pickle", b"\x80\x02}.", scratch)
    sys.audit("os.system", b"outside any read")
    assert _AUDIT.events == [("os.system", "(b'touch /nonexistent/marker',)")]
    assert not _AUDIT.active
