"""Shared benchmark helpers: synthesized checkpoints (cached), the run's results and ratios.

Checkpoints are random weights at the real sizes of the named architecture, written in every form
the wild has (``pool.synth``), cached under ``benchmarks/.cache/<arch>/`` (or ``$POOL_BENCH_CACHE``)
and never downloaded. Used by the pytest benchmarks, ``mem_child.py`` and ``gpu_bench.py``; it
imports nothing beyond torch and ``pool``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

CACHE_FORMAT = 1
#: Encoder forms benchmarked, in display order: (label, file name, container/format).
FORMS = (
    ("zip", "zip.pt", "zip"),
    ("legacy", "legacy.pt", "legacy"),
    ("pickle", "pickle.pt", "pickle"),
    ("state_dict", "state_dict.pt", "torch"),
    ("safetensors", "model.safetensors", "safetensors"),
)
#: fine-tuned copies synthesized for the pool benchmarks (verify, named_models): 4 by default (the
#: pool of issue 23's verify measurement), ``$POOL_BENCH_FINETUNED`` for more (8: the 2026-11-27 figures)
N_FINETUNED = int(os.environ.get("POOL_BENCH_FINETUNED", "4"))
DEFAULT_ARCHS = ("ViT-B-32",)
ALL_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")

# Targets of issue 6, as ratios measured in the same run: (numerator, denominator, op, bound).
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "zip / torch.load (copying)": ("zip", "floor_nommap", "<=", 3.0),  # issue 21: the default copies, as torch.load does
    "read zip state dict / floor": ("read_zip", "floor", "<=", 1.5),  # issue 2: the reader alone
    "manual / zip": ("manual", "zip", ">=", 10.0),
    "legacy / read legacy bytes": ("legacy", "read_legacy", "<=", 3.0),
    "pickle / read pickle bytes": ("pickle", "read_pickle", "<=", 3.0),
    "verify / hand loop": ("verify", "hand_loop", "<=", 1.5),  # issue 11: the command, its default
    "verify (integrity) / hand loop": ("verify_integrity", "hand_loop", "<=", 1.5),  # issue 23: the API
    "verify (no integrity) / hand loop": ("verify_no_integrity", "hand_loop", "<=", 1.5),
    # issue 23: verify's integrity pass against reading the same bytes (1 MiB chunks), warm page cache
    "integrity zip / read bytes": ("integrity_zip", "read_chunks_zip", "", 0.0),
    "integrity zip / read + crc32": ("integrity_zip", "read_crc32_zip", "", 0.0),
    "integrity safetensors / read bytes": ("integrity_safetensors", "read_chunks_safetensors", "", 0.0),
    "verify 2 processes / 1 process": ("verify_2proc", "verify_1proc", "", 0.0),  # issue 13 (informative)
    # issue 24: the task-vector atlas against FusionBench's TaskVectorCosSimilarity (or, where
    # fusion_bench cannot be imported, its algorithm reproduced), same pool, same run (informative)
    "atlas / FusionBench cos similarity": ("atlas", "atlas_fusion_bench", "", 0.0),
    "atlas / FusionBench reproduction": ("atlas", "atlas_fusion_bench_reproduction", "", 0.0),
    # informative, no target in the issue:
    "state_dict / torch.load (copying)": ("state_dict", "floor_nommap", "", 0.0),
    "safetensors / torch.load (copying)": ("safetensors", "floor_nommap", "", 0.0),
    # issue 15: the conversion cache. A hit of a pickled file against loading a safetensors file
    "cached pickle / safetensors": ("cached_pickle", "safetensors", "<=", 1.5),
    "cached legacy / safetensors": ("cached_legacy", "safetensors", "<=", 1.5),
    "read cached pickle / read safetensors": ("read_cached_pickle", "read_safetensors", "<=", 1.5),
    "first cached load / pickle": ("cache_fill_pickle", "pickle", "", 0.0),  # the one-time cost (informative)
    # issue 21: tensors in private memory by default. The floor: the file's bytes read into fresh memory
    "state dict, default / fresh read (warm)": ("copy_ours_warm", "copy_fresh_read_warm", "<=", 1.1),
    "state dict, default / fresh read (cold)": ("copy_ours_cold", "copy_fresh_read_cold", "<=", 1.1),
    "state dict, default / torch.load (warm)": ("copy_ours_warm", "copy_torch_load_warm", "", 0.0),
    "state dict, default / torch.load (cold)": ("copy_ours_cold", "copy_torch_load_cold", "", 0.0),
    "state dict, mmap=True touched / default (warm)": ("copy_ours_mmap_touched_warm", "copy_ours_warm", "", 0.0),
    "state dict, mmap=True touched / default (cold)": ("copy_ours_mmap_touched_cold", "copy_ours_cold", "", 0.0),
    "zip pickle, default / fresh read (warm)": ("copy_ours_zip_warm", "copy_fresh_read_warm", "", 0.0),
}
MEMORY_NAMED_MODELS = f"named_models x{N_FINETUNED}"
MEMORY_TARGETS: dict[str, float] = {"one encoder (zip)": 1.3, "named_models x8": 3.0, MEMORY_NAMED_MODELS: 3.0}

# Time to first features (issue 15): ``ImageEncoder.load`` + one forward, warm and cold page cache,
# beside the usual user path (torch.load without mmap, open_clip.create_model, load_state_dict,
# encode_image) of the same run. Figures are recorded as ``ttff_<cache>_<form>``.
TTFF_CACHES = ("warm", "cold")
#: "pickle_cache": the plain pickle served by the conversion cache (a hit), where pool.cache exists.
TTFF_FORMS = (*(label for label, _, _ in FORMS), "pickle_cache")
TTFF_BASELINE = "baseline"
TTFF_TEXT = {
    **{label: f"ImageEncoder.load({label}) + forward" for label, _, _ in FORMS},
    "pickle_cache": "ImageEncoder.load(pickle, cache_dir=...) + forward (conversion cache hit)",
    TTFF_BASELINE: ("torch.load(state_dict, weights_only=True) + open_clip.create_model + "
                    "load_state_dict(strict=False) + encode_image"),
}


def ttff_label(form: str, cache: str) -> str:
    """The figure label of a time-to-first-features result: ``ttff_<warm|cold>_<form>``."""
    return f"ttff_{cache}_{form}"


def ttff_table(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (form, warm/cold) figure present: ours, the same run's baseline, the ratio."""
    rows = []
    for form in TTFF_FORMS:
        for cache in TTFF_CACHES:
            ours = figures.get(ttff_label(form, cache))
            if ours is None:
                continue
            base = figures.get(ttff_label(TTFF_BASELINE, cache))
            base_s = base["seconds"] if base else None
            rows.append({"form": form, "page_cache": cache, "ours": TTFF_TEXT.get(form, form),
                         "ours_s": ours["seconds"], "baseline": TTFF_TEXT[TTFF_BASELINE], "baseline_s": base_s,
                         "ratio": ours["seconds"] / base_s if base_s else None,
                         "rounds": ours.get("rounds"), "baseline_rounds": base.get("rounds") if base else None,
                         "batch": ours.get("batch"), "cold_method": ours.get("cold_method"),
                         "baseline_cold_method": base.get("cold_method") if base else None,
                         "resident_before_max": ours.get("resident_before_max"),
                         "others_cpu_cores": ours.get("others_cpu_cores"),
                         "baseline_others_cpu_cores": base.get("others_cpu_cores") if base else None})
    return rows


# -- a cold page cache -----------------------------------------------------------------------------
class ColdCacheUnavailable(RuntimeError):
    """Neither ``/proc/sys/vm/drop_caches`` nor ``posix_fadvise(DONTNEED)`` could empty the cache."""


_DROP_CACHES_ERROR: list[str] = []  # why drop_caches failed once (then it is not tried again)
#: ``$POOL_BENCH_COLD`` values: off (the default), the benchmark's own files, the whole machine
COLD_OFF = ("", "0", "off", "no", "false")
COLD_FILES = ("1", "on", "yes", "true", "fadvise")
COLD_MACHINE = ("drop_caches", "auto")


def cold_method() -> str | None:
    """The cold-page-cache method asked for, None when cold rounds are off (the default).

    ``$POOL_BENCH_COLD`` (or ``pytest benchmarks --cold[=drop_caches]``, which sets it): unset or
    ``0``: no cold rounds (skipped). ``1`` / ``fadvise``: ``posix_fadvise(DONTNEED)`` on the files
    the benchmark reads, nothing else. ``drop_caches``: ``sync; echo 3 > /proc/sys/vm/drop_caches``,
    the page cache of the whole machine (root only; every other process re-reads its files after
    it). ``auto``: drop_caches where allowed, else fadvise. Raises ValueError for anything else.
    """
    raw = os.environ.get("POOL_BENCH_COLD", "").strip().lower()
    if raw in COLD_OFF:
        return None
    if raw in COLD_FILES:
        return "fadvise"
    if raw in COLD_MACHINE:
        return raw
    raise ValueError(f"POOL_BENCH_COLD={raw!r}: use 0 (off, the default), 1 or fadvise (the benchmark's files), "
                     "drop_caches (the whole machine's page cache) or auto")


def drop_page_cache(files: list[Path]) -> str:
    """Empty the page cache before a cold round; returns the method used.

    Only what `cold_method` asks for (``$POOL_BENCH_COLD``): ``fadvise`` (``1``) evicts ``files``
    alone (``posix_fadvise(POSIX_FADV_DONTNEED)``); ``drop_caches`` empties the whole machine's page
    cache (``sync; echo 3 > /proc/sys/vm/drop_caches``: libraries too, so import everything first),
    never unless named; ``auto`` tries drop_caches, then fadvise. Neither evicts pages a process
    still maps: drop every tensor of the previous round first (this runs a ``gc.collect()``).
    Raises `ColdCacheUnavailable` when cold rounds are off or nothing worked.
    """
    gc.collect()
    try:
        forced = cold_method()
    except ValueError as exc:
        raise ColdCacheUnavailable(str(exc)) from None
    if forced is None:
        raise ColdCacheUnavailable("cold page cache rounds are opt-in: pytest benchmarks --cold, or POOL_BENCH_COLD=1")
    errors: list[str] = []
    if forced in COLD_MACHINE:
        if not _DROP_CACHES_ERROR:
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
                return "drop_caches"
            except OSError as exc:  # not root, or a container without a writable /proc/sys
                _DROP_CACHES_ERROR.append(f"drop_caches: {exc}")
        errors.extend(_DROP_CACHES_ERROR)
    if forced in ("auto", "fadvise"):
        try:
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            return "fadvise"
        except (OSError, AttributeError) as exc:  # AttributeError: no posix_fadvise on this OS
            errors.append(f"posix_fadvise: {exc}")
    raise ColdCacheUnavailable("cannot empty the page cache: " + "; ".join(errors))


def resident_fraction(path: Path) -> float | None:
    """The fraction of ``path``'s pages in the page cache now (``mincore``), None where unknown.

    Maps the file without touching it, so it reads nothing in itself: the cold rounds record it
    just before each timed region, as evidence that they really start cold.
    """
    import ctypes
    import mmap

    try:
        size = os.path.getsize(path)
        if size == 0:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return (pages - bytes(vec).count(0)) / pages
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError, ValueError):
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("POOL_BENCH_CACHE", HERE / ".cache"))


def selected_archs(disabled: bool = False) -> list[str]:
    """``$POOL_BENCH_ARCHS`` (comma separated), else ViT-B-32 alone (always for a disabled run)."""
    raw = os.environ.get("POOL_BENCH_ARCHS", "").strip()
    if disabled or not raw:
        return list(DEFAULT_ARCHS)
    if raw.lower() == "all":
        return list(ALL_ARCHS)
    return [a.strip() for a in raw.split(",") if a.strip()]


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def ensure_checkpoints(arch_name: str, *, finetuned: int = N_FINETUNED, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write (once) every form of a random-weight ``src.modeling.ImageEncoder`` for ``arch_name``.

    Returns ``{form label: path}`` plus ``finetuned_<i>`` zip pickles (distinct weights) for the
    pool benchmarks. Cached: a manifest written last marks a complete set.
    """
    import torch

    from pool import synth
    from pool.arch import arch_for_name

    root = cache_dir() / arch_name
    manifest = root / "manifest.json"
    files = {label: root / fname for label, fname, _ in FORMS}
    files.update({f"finetuned_{i}": root / "finetuned" / f"task{i}.pt" for i in range(finetuned)})
    if manifest.exists():
        try:
            meta = json.loads(manifest.read_text())
            if (meta.get("format") == CACHE_FORMAT and all(
                    k in meta["sizes"] and files[k].exists() and files[k].stat().st_size == meta["sizes"][k]
                    for k in files)):
                return files
        except (ValueError, KeyError, OSError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    (root / "finetuned").mkdir(exist_ok=True)
    start = time.perf_counter()
    log(f"[benchmarks] synthesizing {arch_name} checkpoints under {root} (random weights, real size)")
    arch = arch_for_name(arch_name)
    encoder = synth.make_original_encoder(arch, seed=0)
    for label, _, fmt in FORMS:
        if fmt in synth.ENCODER_CONTAINERS:
            _atomic(files[label], lambda p, fmt=fmt: synth.save_module(encoder, p, fmt))
        else:
            sd = encoder.state_dict()
            _atomic(files[label], lambda p, fmt=fmt, sd=sd: synth.save_state_dict(sd, p, fmt))
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for i in range(finetuned):  # "fine-tuned": the same encoder nudged, distinct bytes per file
            for param in encoder.parameters():
                param.add_(torch.randn(param.shape, generator=generator), alpha=1e-3)
            _atomic(files[f"finetuned_{i}"], lambda p: synth.save_module(encoder, p, "zip"))
    sizes = {k: p.stat().st_size for k, p in files.items()}
    manifest.write_text(json.dumps({"format": CACHE_FORMAT, "arch": arch_name, "sizes": sizes}, indent=1))
    log(f"[benchmarks] {arch_name}: wrote {len(files)} files, {sum(sizes.values()) / 1e9:.1f} GB in "
        f"{time.perf_counter() - start:.0f} s")
    return files


# -- the run's results -----------------------------------------------------------------------------
#: RESULTS[arch][label] = {"seconds": median, "rounds": n, ...}; MEMORY[arch][label] = {...}
RESULTS: dict[str, dict[str, dict[str, Any]]] = {}
MEMORY: dict[str, dict[str, dict[str, Any]]] = {}


def record(arch: str, label: str, seconds: float, **extra: Any) -> None:
    RESULTS.setdefault(arch, {})[label] = {"seconds": seconds, **extra}


def record_benchmark(benchmark: Any, arch: str, label: str, role: str, path: Path | None, seconds: float, n: int,
                     **extra: Any) -> None:
    """One timed figure: into the benchmark's ``extra_info`` (with the file's size) and the run's results."""
    benchmark.extra_info.update({"arch": arch, "label": label, "role": role, "median_s": seconds, "rounds": n,
                                 "file_bytes": path.stat().st_size if path else None, **extra})
    record(arch, label, seconds, rounds=n, role=role, **extra)


def ratios(arch: str) -> dict[str, dict[str, Any]]:
    """Every ratio of TARGETS computable from this run's figures for ``arch``."""
    figures = RESULTS.get(arch, {})
    out: dict[str, dict[str, Any]] = {}
    for name, (num, den, op, bound) in TARGETS.items():
        if num in figures and den in figures and figures[den]["seconds"] > 0:
            value = figures[num]["seconds"] / figures[den]["seconds"]
            met = None if not op else (value <= bound if op == "<=" else value >= bound)
            out[name] = {"ratio": value, "numerator_s": figures[num]["seconds"],
                         "denominator_s": figures[den]["seconds"], "target": f"{op} {bound:g}" if op else "",
                         "met": met}
    return out


class OthersCPU:
    """CPU seconds the rest of the machine used while this was running (``/proc/stat`` busy time
    minus this process's and its children's), summed over `start`/`stop` spans (or a ``with``
    block): how much a shared machine disturbed a measurement. ``cores`` is that over the spans'
    wall time (None off Linux).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.wall = 0.0
        self.known = True
        self._start: tuple[float | None, float, float] | None = None

    def start(self) -> None:
        self._start = (self._busy(), self._own(), time.perf_counter())

    def stop(self) -> None:
        if self._start is None:
            return
        busy0, own0, t0 = self._start
        busy1, own1, t1 = self._busy(), self._own(), time.perf_counter()
        self._start = None
        if busy0 is None or busy1 is None:
            self.known = False
            return
        self.seconds += max(0.0, (busy1 - busy0) - (own1 - own0))
        self.wall += t1 - t0

    @property
    def cores(self) -> float | None:
        return self.seconds / self.wall if self.known and self.wall > 0 else None

    def __enter__(self) -> OthersCPU:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def wait_quiet(max_cores: float, timeout: float, window: float = 1.0) -> tuple[float, bool]:
    """Wait until the rest of the machine used at most ``max_cores`` over a ``window``; gives up
    after ``timeout`` s. Returns (seconds waited, whether it was quiet). For shared machines."""
    start = time.perf_counter()
    while True:
        with OthersCPU() as others:
            time.sleep(window)
        if others.cores is None or others.cores <= max_cores:
            return time.perf_counter() - start, True
        if time.perf_counter() - start >= timeout:
            return time.perf_counter() - start, False


def time_it(benchmark: Any, fn: Callable[[], Any], *, rounds: int, warmup: int = 1,
            setup: Callable[[], None] | None = None,
            teardown: Callable[[], None] | None = None) -> tuple[float, int]:
    """Median seconds of ``fn``: through pytest-benchmark when enabled, once by hand when not.

    ``setup`` and ``teardown`` run before and after every round (warm-up rounds too), outside
    the timed region.
    """
    def before() -> None:  # pytest-benchmark takes what setup returns as fn's arguments
        if setup is not None:
            setup()

    def after() -> None:
        if teardown is not None:
            teardown()

    if getattr(benchmark, "disabled", False):
        before()
        start = time.perf_counter()
        benchmark.pedantic(fn, rounds=1, iterations=1)  # disabled: pytest-benchmark calls fn once
        seconds = time.perf_counter() - start
        after()
        return seconds, 1
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1,
                       setup=before if setup is not None else None,
                       teardown=after if teardown is not None else None)
    stats = benchmark.stats.stats
    return float(stats.median), int(stats.rounds)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def time_with_page_cache(benchmark: Any, fn: Callable[[], None], *, cache: str, files: Callable[[], list[Path]],
           rounds: int) -> tuple[float, int, dict[str, Any]]:
    """Time ``fn`` with a warm, or a cold (emptied before each round), page cache.

    Before each round (outside the timing): the cold method, the files' resident share, and with
    ``$POOL_BENCH_QUIET`` = N a wait (at most ``$POOL_BENCH_QUIET_WAIT`` s, default 300) until the
    rest of the machine uses at most N cores. The other processes' CPU during the timed rounds
    goes into extra_info as ``others_cpu_cores``. No warm-up rounds: `_prepare` ran ``fn`` once.
    """
    import pytest  # only the pytest benchmarks time with a page cache (benchlib itself needs torch and pool)

    methods: set[str] = set()
    resident: list[float] = []
    others = OthersCPU()
    quiet = os.environ.get("POOL_BENCH_QUIET", "").strip()
    quiet_wait = float(os.environ.get("POOL_BENCH_QUIET_WAIT", "300"))
    waited: list[float] = []
    noisy = [0]

    def before() -> None:
        if cache == "cold":
            try:
                methods.add(drop_page_cache(files()))
            except ColdCacheUnavailable as exc:
                pytest.skip(str(exc))
        if quiet:
            seconds, ok = wait_quiet(float(quiet), quiet_wait)
            waited.append(seconds)
            noisy[0] += not ok
        if cache == "cold":  # after the wait: nothing may have read the files back meanwhile
            fractions = [f for f in map(resident_fraction, files()) if f is not None]  # None: empty
            if fractions:
                resident.append(max(fractions))
        others.start()

    seconds, n = time_it(benchmark, fn, rounds=rounds, warmup=0, setup=before, teardown=others.stop)
    extra: dict[str, Any] = {}
    if cache == "cold":
        extra["cold_method"] = "+".join(sorted(methods))
    if resident:  # the largest share of a file's pages still cached when a timed round began
        extra["resident_before_max"] = round(max(resident), 4)
    if others.cores is not None:  # how busy the rest of the machine was, cores on average: noise evidence
        extra["others_cpu_cores"] = round(others.cores, 3)
    if quiet:
        extra.update(quiet_cores=float(quiet), quiet_wait_s=round(sum(waited), 1), rounds_not_quiet=noisy[0])
    return seconds, n, extra
