"""Helpers shared by the test files (imported as ``helpers``: pytest's default import mode puts
``tests/`` on ``sys.path``, as for ``redteam_files``).

* `SMALL_ARCH`: the small ViT config (16 px, one layer, width 32) several files build encoders from.
* zip files: `zip_records`, `rewrite_zip`, `edit_data_pkl` (copy an archive with records edited,
  replaced or added) and `member_spans` (where each stored record's bytes lie in the file, from its
  local header).
* isolation: `run_isolated` calls a function in a forked child with a watchdog and reports how it
  ended (return value, exception, hang, crash) and the child's own peak RSS above its baseline
  (`Report.peak_extra`); `reset_peak_rss` / `peak_rss_above` measure inside such a child. A peak
  measured in the test process itself (``ru_maxrss``) cannot fail once any earlier test peaked
  higher, so memory bounds are checked in children; each measurement starts from a trimmed heap
  (`release_free_heap`), so that an allocation reusing memory the parent freed is seen too.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import io
import os
import pickle
import select
import signal
import struct
import tempfile
import threading
import time
import traceback
import weakref
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pool.arch import VisionArch

# -- a small architecture -------------------------------------------------------------------------
SMALL_ARCH = VisionArch(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                        embed_dim=8, quick_gelu=True, text_context_length=4, text_vocab_size=16,
                        text_width=16)


# -- zip archives ---------------------------------------------------------------------------------
def zip_records(data: bytes) -> dict[str, bytes]:
    """Every record of the archive ``data``, by name, in directory order."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def rewrite_zip(data: bytes, edit: Callable[[str, bytes], bytes] | None = None, *,
                add: Mapping[str, bytes] | None = None) -> bytes:
    """A stored (uncompressed) copy of the archive ``data``: each record's bytes through
    ``edit(name, body)`` (unchanged without one), then the records of ``add`` appended."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, body in zip_records(data).items():
            dst.writestr(name, body if edit is None else edit(name, body))
        for name, body in (add or {}).items():
            dst.writestr(name, body)
    return out.getvalue()


def edit_data_pkl(data: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """A copy of the torch zip ``data`` with its ``<prefix>/data.pkl`` record through ``edit``."""
    return rewrite_zip(data, lambda name, body: edit(body) if name.endswith("/data.pkl") else body)


def member_spans(data: bytes) -> dict[str, range]:
    """Where each record's stored bytes lie in the archive ``data``: after its local header (30
    bytes, the name, and the local extra field, whose length may differ from the central
    directory's: torch pads records to 64-byte alignment there)."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            at = info.header_offset
            if data[at:at + 4] != b"PK\x03\x04":
                raise ValueError(f"{info.filename}: no local header at {at}")
            name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
            start = at + 30 + name_len + extra_len
            spans[info.filename] = range(start, start + info.compress_size)
    return spans


# -- isolation: a call in a forked child, its outcome and its own peak memory -----------------------
TIME_LIMIT_S = 10.0
MEMORY_LIMIT = 1 << 30  # extra peak RSS a hostile read may cost
KILL_AT = 3 << 29  # the watchdog ends a child whose RSS grows by 1.5 GiB


def status_bytes(pid: int | str, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_exception(exc: BaseException) -> dict[str, Any]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a hostile str() must not break the report
        message = f"<unprintable {type(exc).__name__}>"
    return {"type": qualname(type(exc)), "mro": tuple(qualname(c) for c in type(exc).__mro__),
            "message": message[:20000],
            "tb": "".join(traceback.format_exception(exc))[-3000:]}


@dataclass
class Report:
    """What one isolated call did."""

    kind: str  # returned | raised | timeout | memory | signal | exit
    value: Any = None
    exc: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    peak_extra: int = 0
    detail: str = ""
    written: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.kind == "raised":
            what = f"raised {self.exc['type']}: {self.exc['message'][:400]}"
        elif self.kind == "returned":
            what = f"returned {self.value!r}"[:2000]
        else:
            what = f"{self.kind} {self.detail}"
        return f"{what} ({self.elapsed:.2f} s, +{self.peak_extra / 2**20:.0f} MiB peak)"


def _send(fd: int, message: Any) -> None:
    data = pickle.dumps(message)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


_pools_seen: tuple[frozenset, weakref.WeakSet] | None = None


def _parent_thread_pools() -> list[Any]:
    """(In the parent.) The ThreadPoolExecutors that may have worker threads (none without other
    threads than this one). Found by one walk of the heap per set of live threads, not per child:
    an executor starts its workers as threads, so a pool with workers unseen so far changes the
    set. (The walk costs ~0.1 s once other test files have filled the heap.)"""
    global _pools_seen
    import concurrent.futures.thread as cft
    import gc

    live = threading.enumerate()
    if len(live) == 1:
        return []
    key = frozenset((t.ident, t.native_id, t.name) for t in live)
    if _pools_seen is None or _pools_seen[0] != key:
        found = weakref.WeakSet(obj for obj in gc.get_objects()
                                if issubclass(type(obj), cft.ThreadPoolExecutor))  # type(): no hook runs
        _pools_seen = (key, found)
    return list(_pools_seen[1])


def _forget_parent_thread_pools(pools: list[Any]) -> None:
    """(In the child.) A ThreadPoolExecutor made before the fork believes in worker threads that
    the child does not have: work submitted to it would never run. Give each one a fresh start
    (only needed when the parent had threads: after other test files read with a thread pool)."""
    import queue

    for obj in pools:
        obj._threads = set()
        obj._idle_semaphore = threading.Semaphore(0)
        obj._work_queue = queue.SimpleQueue()
        obj._shutdown_lock = threading.Lock()


def _child(fd: int, fn: Callable[..., Any], args: tuple, kill_at: int, workdir: Path | None,
           parent_pools: list[Any]) -> None:
    status = 0
    try:
        faulthandler.disable()  # a crash is reported as a signal; no interpreter dump on the terminal
        torch.set_num_threads(1)  # forked after OpenMP started: a parallel region would never return
        if parent_pools:
            _forget_parent_thread_pools(parent_pools)
        if workdir is not None:
            os.chdir(workdir)
            os.environ["TMPDIR"] = str(workdir)
            tempfile.tempdir = str(workdir)
        baseline = reset_peak_rss()  # the peak RSS (VmHWM) now counts from here
        _send(fd, ("baseline", baseline))
        stop = threading.Event()

        def watchdog() -> None:  # the parent watches too: a C call holding the GIL starves this thread
            while not stop.wait(0.05):
                if status_bytes("self", "VmRSS") - baseline > kill_at:
                    os._exit(77)

        threading.Thread(target=watchdog, daemon=True).start()
        start = time.monotonic()
        try:
            result: dict[str, Any] = {"kind": "returned", "value": fn(*args)}
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            result = {"kind": "raised", "exc": describe_exception(exc)}
        result["elapsed"] = time.monotonic() - start
        stop.set()
        result["peak_extra"] = status_bytes("self", "VmHWM") - baseline
        try:
            _send(fd, ("result", result))
        except Exception:  # noqa: BLE001 - an unpicklable value: send its repr
            result["value"] = repr(result.get("value"))[:4000]
            _send(fd, ("result", result))
    except BaseException:  # noqa: BLE001
        status = 70
    finally:
        os._exit(status)


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = TIME_LIMIT_S, kill_at: int = KILL_AT,
                 workdir: Path | None = None) -> Report:
    """Call ``fn(*args)`` in a forked child and report how it ended.

    The child resets its peak RSS, reports its RSS baseline, runs fn, then reports the outcome
    (return value or exception), the elapsed time and the peak RSS above the baseline. A watchdog
    in the child and the parent's own polling end it with SIGKILL once its RSS grows by ``kill_at``
    (``memory``); the parent kills it after ``timeout`` plus up to 1 s for the report to arrive
    (``timeout``); a crash is ``signal``.
    """
    r, w = os.pipe()
    parent_pools = _parent_thread_pools()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        _child(w, fn, args, kill_at, workdir, parent_pools)
    os.close(w)
    started = time.monotonic()
    buf = bytearray()
    messages: dict[str, Any] = {}
    killed, peak_seen, status = "", 0, None
    try:
        while True:
            ready, _, _ = select.select([r], [], [], 0.05)
            eof = False
            if ready:
                chunk = os.read(r, 1 << 20)
                eof = not chunk
                buf += chunk
                while len(buf) >= 8 and len(buf) >= 8 + struct.unpack("<Q", buf[:8])[0]:
                    n = struct.unpack("<Q", buf[:8])[0]
                    tag, payload = pickle.loads(bytes(buf[8:8 + n]))
                    messages[tag] = payload
                    del buf[:8 + n]
            if "baseline" in messages and "result" not in messages:
                extra = status_bytes(pid, "VmRSS") - messages["baseline"]
                peak_seen = max(peak_seen, extra)
                if extra > kill_at:
                    killed = "memory"
            if not killed and time.monotonic() - started > timeout + min(1.0, timeout):
                killed = "timeout"
            if killed:
                os.kill(pid, signal.SIGKILL)
            if eof or killed:
                _, status = os.waitpid(pid, 0)
                break
    finally:
        os.close(r)
    elapsed = time.monotonic() - started
    if killed:
        detail = f"after {elapsed:.1f} s" if killed == "timeout" else f"(RSS +{peak_seen >> 20} MiB)"
        return Report(killed, elapsed=elapsed, peak_extra=peak_seen, detail=detail)
    if "result" in messages:
        res = messages["result"]
        return Report(res["kind"], value=res.get("value"), exc=res.get("exc", {}), elapsed=res["elapsed"],
                      peak_extra=max(res["peak_extra"], peak_seen))
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return Report("signal", elapsed=elapsed, detail=f"killed by {signal.Signals(sig).name}")
    code = os.WEXITSTATUS(status)
    return Report("memory" if code == 77 else "exit", elapsed=elapsed, peak_extra=peak_seen,
                  detail=f"exit status {code}")


def release_free_heap() -> None:
    """(In a child.) Hand the free memory of malloc's heaps back to the system (glibc
    ``malloc_trim``). A forked child inherits the parent's heap, and after other tests that heap
    holds free but resident pages: an allocation reusing them adds nothing to the RSS, so a peak
    measured from the RSS would miss it. Trimmed first, each allocation faults in fresh pages."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to trim with
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: ctypes.CDLL | bool | None = None


def reset_peak_rss() -> int:
    """(In a child.) Trim the heap (`release_free_heap`), then reset this process's peak RSS
    (VmHWM) to its current RSS; return that RSS."""
    release_free_heap()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("self", "VmRSS")


def peak_rss_above(baseline: int) -> int:
    """(In a child.) This process's peak RSS since the last `reset_peak_rss`, above ``baseline``."""
    return status_bytes("self", "VmHWM") - baseline


# -- hypothesis -----------------------------------------------------------------------------------
def examples(n: int) -> int:
    """The number of examples for a property test: its own bounded ``n`` under the derandomised
    ``ci`` profile (conftest.py, the default), the active profile's count under any other
    (``POOL_HYPOTHESIS_PROFILE=fuzz``: 2000)."""
    from hypothesis import settings

    current = getattr(settings, "get_current_profile_name", lambda: settings._current_profile)()
    return n if current == "ci" else settings.default.max_examples


def assert_same_tensors(a: Any, b: Any) -> None:
    """Two checkpoints (`pool.checkpoint.Checkpoint`) hold the same tensors, in order, bit for bit."""
    assert list(a.state_dict) == list(b.state_dict)
    for key in a.state_dict:
        x, y = a.state_dict[key], b.state_dict[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key
