"""Shared benchmark helpers: synthesized checkpoints (cached), the run's results and ratios.

Checkpoints are random weights at the real sizes of the named architecture, written in every form
the wild has (``pool.synth``), cached under ``benchmarks/.cache/<arch>/`` (or ``$POOL_BENCH_CACHE``)
and never downloaded. Used by the pytest benchmarks, ``mem_child.py`` and ``gpu_bench.py``; it
imports nothing beyond torch and ``pool``.
"""

from __future__ import annotations

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
N_FINETUNED = 8
DEFAULT_ARCHS = ("ViT-B-32",)
ALL_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")

# Targets of issue 6, as ratios measured in the same run: (numerator, denominator, op, bound).
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "zip / floor": ("zip", "floor", "<=", 3.0),
    "read zip state dict / floor": ("read_zip", "floor", "<=", 1.5),  # issue 2: the reader alone
    "manual / zip": ("manual", "zip", ">=", 10.0),
    "legacy / read legacy bytes": ("legacy", "read_legacy", "<=", 3.0),
    "pickle / read pickle bytes": ("pickle", "read_pickle", "<=", 3.0),
    "verify / hand loop": ("verify", "hand_loop", "<=", 1.5),  # issue 11
    "verify 2 processes / 1 process": ("verify_2proc", "verify_1proc", "", 0.0),  # issue 13 (informative)
    # informative, no target in the issue:
    "state_dict / floor": ("state_dict", "floor", "", 0.0),
    "safetensors / floor": ("safetensors", "floor", "", 0.0),
    "zip / floor (no mmap)": ("zip", "floor_nommap", "", 0.0),
}
MEMORY_TARGETS: dict[str, float] = {"one encoder (zip)": 1.3, "named_models x8": 3.0}


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


def time_it(benchmark: Any, fn: Callable[[], Any], *, rounds: int, warmup: int = 1) -> tuple[float, int]:
    """Median seconds of ``fn``: through pytest-benchmark when enabled, once by hand when not."""
    if getattr(benchmark, "disabled", False):
        start = time.perf_counter()
        benchmark.pedantic(fn, rounds=1, iterations=1)  # disabled: pytest-benchmark calls fn once
        return time.perf_counter() - start, 1
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = benchmark.stats.stats
    return float(stats.median), int(stats.rounds)


def median(values: list[float]) -> float:
    return float(statistics.median(values))
