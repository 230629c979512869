"""The task-vector atlas (issue 24) beside FusionBench's ``TaskVectorCosSimilarity``, same run.

The pool: the cached ViT-B-32 zip pickle as ``_pretrained_`` and the conftest's fine-tuned zip
pickles (4; 2 under ``--benchmark-disable`` so CI stays light; ``$POOL_BENCH_ATLAS_MODELS``).

- Ours: ``pool.atlas(OpenCLIPVisionModelPool(models=...), progress=False)``: every group's cosines,
  norms and sign conflicts, streamed tensor by tensor over mapped checkpoints.
- Baseline: where fusion_bench imports (Python 3.12+, fusion-bench 0.2.33), FusionBench's own
  ``TaskVectorCosSimilarity(plot_heatmap=False, output_path=tmp)`` run on
  ``pool.fusion_bench.OpenCLIPVisionModelPool`` of the same pool; elsewhere (Python 3.11, CI)
  ``atlas_child.reproduce_fusion_bench``, its algorithm written out (labelled "reproduction").
  It computes the whole-model cosine matrix only: each flattened task vector in float64, all of
  them ``torch.stack``-ed before the first dot product.

Figures: time in process (pytest-benchmark rounds, ``rounds["slow"]``, after one untimed pass; the
other processes' CPU during the rounds and the load average recorded); peak memory in a fresh
child each (`atlas_child.py`): peak RSS (``VmHWM``) and peak anonymous memory (``RssAnon`` sampled
every 5 ms), over the child's own figures after its imports. Checked: the atlas's
``groups["all"].cosine`` equals the baseline's matrix to 1e-10 (in process and in the children).

The large case (opt-in: ``POOL_BENCH_ATLAS_LARGE=1``, never in CI): `atlas_large.py`'s pool of 40
fine-tuned ViT-B-32 image towers (14.4 GB on disk), the atlas in one child, the baseline in another
under ``RLIMIT_AS`` = the machine's memory (MemTotal, lowered to MemAvailable - 1 GiB when less is
free), so that it fails with an allocation error rather than waking the OOM killer (and with
``oom_score_adj`` 1000, so that were the machine to run short anyway the child, not a neighbour,
would go); recorded: how far it got, and its need as computed from the parameter count (labelled
as computed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import atlas_child
import benchlib
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
MB = 1e6
TOLERANCE = 1e-10
try:
    import pool.fusion_bench  # noqa: F401  (ImportError on Python < 3.12 or without fusion-bench)

    BASELINE = "fusion_bench"
except ImportError:
    BASELINE = "reproduction"
BASELINE_LABEL = {"fusion_bench": "atlas_fusion_bench", "reproduction": "atlas_fusion_bench_reproduction"}[BASELINE]
BASELINE_TEXT = {"fusion_bench": "FusionBench TaskVectorCosSimilarity",
                 "reproduction": "FusionBench TaskVectorCosSimilarity's algorithm (reproduction)"}[BASELINE]
LARGE = os.environ.get("POOL_BENCH_ATLAS_LARGE", "").strip() not in ("", "0")

#: the matrices computed in this session: {(arch, who): (names, matrix)}
MATRICES: dict[tuple[str, str], tuple[list[str], np.ndarray]] = {}


def _n_models(disabled: bool) -> int:
    raw = os.environ.get("POOL_BENCH_ATLAS_MODELS", "").strip()
    return min(int(raw) if raw else (2 if disabled else 4), benchlib.N_FINETUNED)


@pytest.fixture(scope="session")
def atlas_models(checkpoints, bench_disabled) -> dict[str, str]:
    models = {"_pretrained_": str(checkpoints["zip"])}
    models.update({f"task{i}": str(checkpoints[f"finetuned_{i}"]) for i in range(_n_models(bench_disabled))})
    return models


def baseline_need(models: dict[str, str]) -> int:
    """Bytes the baseline holds at its peak, estimated: N float64 task vectors, their stack, and
    ``cosine_similarity``'s temporaries (about N more vectors' worth); parameters from the
    pretrained file's size (float32)."""
    parameters = Path(models["_pretrained_"]).stat().st_size // 4
    return 3 * (len(models) - 1) * parameters * 8


def baseline_too_big(models: dict[str, str]) -> str | None:
    """Why the baseline is not run (it would need more than 80% of the memory available now), or None."""
    need, available = baseline_need(models), meminfo()["MemAvailable"]
    if need > 0.8 * available:
        return (f"{BASELINE_TEXT} over {len(models) - 1} models needs about {need / 1e9:.1f} GB (estimated), "
                f"more than 80% of the {available / 1e9:.1f} GB available now")
    return None


def skip_unless_baseline_fits(models: dict[str, str]) -> None:
    """Skip rather than run the baseline into the OOM killer (e.g. ViT-L-14 with ``$POOL_BENCH_ARCHS``)."""
    reason = baseline_too_big(models)
    if reason:
        pytest.skip(reason)


def run_atlas(models: dict[str, str]) -> tuple[list[str], np.ndarray]:
    names, cosine, _ = atlas_child.run_atlas(models, [0, 0])
    return names, np.asarray(cosine)


def run_baseline(models: dict[str, str]) -> tuple[list[str], np.ndarray]:
    if BASELINE == "fusion_bench":
        from pool.fusion_bench import OpenCLIPVisionModelPool

        names, cosine = atlas_child.run_fusion_bench(OpenCLIPVisionModelPool(models=models), [0, 0])
    else:
        from pool import OpenCLIPVisionModelPool

        names, cosine = atlas_child.reproduce_fusion_bench(OpenCLIPVisionModelPool(models=models), [0, 0])
    return names, np.asarray(cosine)


def _matrix(arch: str, who: str, models: dict[str, str]) -> tuple[list[str], np.ndarray]:
    if (arch, who) not in MATRICES:
        MATRICES[arch, who] = (run_atlas if who == "atlas" else run_baseline)(models)
    return MATRICES[arch, who]


def max_abs_diff(ours: tuple[list[str], np.ndarray], theirs: tuple[list[str], np.ndarray]) -> float:
    """The largest difference of two matrices of the same models (asserted: same names, shapes)."""
    assert ours[0] == theirs[0], f"model order differs: {ours[0]} vs {theirs[0]}"
    assert ours[1].shape == theirs[1].shape == (len(ours[0]), len(ours[0]))
    return float(np.max(np.abs(ours[1] - theirs[1])))


def _timed(benchmark, arch: str, label: str, role: str, fn, rounds: int, models: dict[str, str],
           who: str) -> None:
    """``fn(models)`` timed in process: one untimed warm-up (benchmarks enabled), then ``rounds``;
    the other processes' CPU during the rounds (``others_cpu_cores``) and the load average kept."""
    results: list[tuple[list[str], np.ndarray]] = []
    if not getattr(benchmark, "disabled", False):
        results.append(fn(models))
    load = os.getloadavg()
    seconds, n, extra = benchlib.time_with_page_cache(benchmark, lambda: results.append(fn(models)), cache="warm",
                                                      files=lambda: [Path(p) for p in models.values()], rounds=rounds)
    MATRICES[arch, who] = results[-1]
    text = "pool.atlas (every group)" if who == "atlas" else BASELINE_TEXT
    benchlib.record_benchmark(benchmark, arch, label, role, None, seconds, n, models=len(models) - 1, what=text,
                              load_average_before=load, load_average_after=os.getloadavg(), **extra)


def test_atlas_time(benchmark, arch, atlas_models, rounds):
    """Ours: ``pool.atlas`` over ``_pretrained_`` + N fine-tuned encoders, in process."""
    benchmark.group = f"{arch} atlas"
    _timed(benchmark, arch, "atlas", "ours", run_atlas, rounds["slow"], atlas_models, "atlas")


def test_atlas_baseline_time(benchmark, arch, atlas_models, rounds):
    """Baseline: FusionBench's TaskVectorCosSimilarity (or its reproduction), same pool, in process."""
    benchmark.group = f"{arch} atlas"
    skip_unless_baseline_fits(atlas_models)
    _timed(benchmark, arch, BASELINE_LABEL, "baseline", run_baseline, rounds["slow"], atlas_models, "baseline")


def test_atlas_equals_baseline(arch, atlas_models):
    """``groups["all"].cosine`` is the baseline's matrix to 1e-10."""
    skip_unless_baseline_fits(atlas_models)
    diff = max_abs_diff(_matrix(arch, "atlas", atlas_models), _matrix(arch, "baseline", atlas_models))
    assert diff <= TOLERANCE, f"atlas vs {BASELINE_TEXT}: max abs difference {diff:.3g}"
    for label in ("atlas", BASELINE_LABEL):
        benchlib.RESULTS.get(arch, {}).get(label, {})["max_abs_diff_vs_other"] = diff


# -- peak memory, each in a fresh child ------------------------------------------------------------------
def run_child(mode: str, models: dict[str, str], *, limit_as: int | None = None, timeout: float = 3600) -> dict:
    """`atlas_child.py` MODE in a fresh interpreter (this one's); its last stdout line as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"models": models, "limit_as": limit_as}))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / "atlas_child.py"), mode, str(spec)], capture_output=True,
                              text=True, timeout=timeout)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"atlas_child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = wall
    return result


def memory_figure(result: dict, checkpoint_bytes: int) -> dict[str, Any]:
    """The child's peaks over its own figures after the imports (MB), in test_memory's keys."""
    kb = result["memory_kb"]
    imports = kb["imports"]
    peak = kb["peak_rss"] - imports["VmHWM"]
    anon = kb["peak_anon_sampled"] - imports["RssAnon"]
    file_backed = kb["peak_file_sampled"] - imports["RssFile"]
    return {"peak_mb": kb["peak_rss"] * 1024 / MB, "baseline_peak_mb": imports["VmHWM"] * 1024 / MB,
            "peak_delta_mb": peak * 1024 / MB, "peak_anon_mb": kb["peak_anon_sampled"] * 1024 / MB,
            "anon_delta_mb": anon * 1024 / MB, "file_mb": file_backed * 1024 / MB,
            "checkpoint_mb": checkpoint_bytes / MB, "ratio": peak * 1024 / checkpoint_bytes,
            "anon_sample_s": kb["sample_s"], "anon_samples": kb["samples"], "pass_s": result["seconds"],
            "child_wall_s": result["child_wall_s"], "models": result["models"] - 1,
            "task_vectors_built": result["task_vectors_built"], "matrix_reached": result["matrix_reached"],
            "error": result["error"], "limit_as_gb": result["limit_as"] / 1e9 if result["limit_as"] else None,
            "vm_peak_mb": kb["vm_peak"] * 1024 / MB}


def _memory_name(who: str, n: int, large: bool = False) -> str:
    what = "atlas" if who == "atlas" else f"baseline: {BASELINE_TEXT}"
    return f"{'large: ' if large else ''}{what} x{n}"


def _report(benchmark, arch: str, name: str, figure: dict) -> None:
    benchmark.extra_info.update({"arch": arch, "label": f"memory: {name}", "role": "memory", **figure})
    benchlib.MEMORY.setdefault(arch, {})[name] = figure


@pytest.mark.parametrize("who", ["atlas", "baseline"])
def test_atlas_peak_memory(benchmark, arch, atlas_models, bench_disabled, who):
    """Peak RSS and peak anonymous memory of one pass in a fresh child; its matrix checked too."""
    if who == "baseline" and bench_disabled:
        pytest.skip("the baseline's child runs with benchmarks enabled only (CI time: 20-45 s on 2 cores); "
                    "under --benchmark-disable its algorithm runs once in process, above")
    too_big = baseline_too_big(atlas_models)
    if who == "baseline" and too_big:
        pytest.skip(too_big)
    mode = "atlas" if who == "atlas" else BASELINE
    result: dict = {}
    benchmark.group = f"{arch} atlas memory (child wall time)"
    load = os.getloadavg()
    benchlib.time_it(benchmark, lambda: result.update(run_child(mode, atlas_models)), rounds=1, warmup=0)
    assert result["error"] is None, result["error"]
    diff = None
    if not too_big:  # the atlas alone where the baseline cannot run
        other = _matrix(arch, "baseline" if who == "atlas" else "atlas", atlas_models)
        diff = max_abs_diff((result["names"], np.asarray(result["cosine"])), other)
        assert diff <= TOLERANCE, f"{mode} child vs the other: max abs difference {diff:.3g}"
    figure = memory_figure(result, Path(atlas_models["_pretrained_"]).stat().st_size)
    figure.update(max_abs_diff_vs_other=diff, load_average_before=load, load_average_after=os.getloadavg())
    _report(benchmark, arch, _memory_name(who, len(atlas_models) - 1), figure)


# -- the large case (opt-in) -----------------------------------------------------------------------------
def meminfo() -> dict[str, int]:
    """``/proc/meminfo``, bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def fusion_bench_need(parameters: int, n: int) -> dict[str, float]:
    """COMPUTED, not measured: FusionBench's float64 task vectors, then their ``torch.stack``."""
    vectors = n * parameters * 8
    return {"parameters_per_model": parameters, "float64_vectors_gb": vectors / 1e9,
            "with_stack_gb": 2 * vectors / 1e9}


@pytest.mark.skipif(not LARGE, reason="the large atlas pool is opt-in: POOL_BENCH_ATLAS_LARGE=1 (14.4 GB of disk, "
                                      "minutes; never in CI)")
@pytest.mark.parametrize("who", ["atlas", "baseline"])
def test_atlas_large(benchmark, who):
    """The atlas, then the baseline under RLIMIT_AS, on the large pool; each once, in a fresh child."""
    import atlas_large
    import torch

    paths = atlas_large.ensure_large_pool()
    models = {k: str(p) for k, p in paths.items()}
    n = len(models) - 1
    info = meminfo()
    limit = min(info["MemTotal"], info["MemAvailable"] - 2**30)
    base = torch.load(paths["_pretrained_"], mmap=True, weights_only=True)
    parameters = sum(v.numel() for v in base.values() if v.is_floating_point())
    del base
    mode = "atlas" if who == "atlas" else BASELINE
    result: dict = {}
    benchmark.group = "atlas large (child wall time)"
    load = os.getloadavg()
    benchlib.time_it(benchmark, lambda: result.update(run_child(mode, models, limit_as=limit)), rounds=1, warmup=0)
    figure = memory_figure(result, paths["_pretrained_"].stat().st_size)
    figure.update({"mem_total_gb": info["MemTotal"] / 1e9, "mem_available_gb": info["MemAvailable"] / 1e9,
                   "load_average_before": load, "load_average_after": os.getloadavg(),
                   "computed_need": fusion_bench_need(parameters, n)})
    if who == "atlas":
        assert result["error"] is None, result["error"]
        cosine = np.asarray(result["cosine"])
        assert cosine.shape == (n, n) and np.allclose(np.diag(cosine), 1.0)
    key = f"{atlas_large.ARCH} large pool x{n}"  # its own entry: results files merge runs by this key
    _report(benchmark, key, _memory_name(who, n, large=True), figure)
    benchlib.record(key, f"{'atlas' if who == 'atlas' else BASELINE_LABEL}_large", result["seconds"],
                    rounds=1, role="ours" if who == "atlas" else "baseline", models=n, error=result["error"])
