"""Benchmark fixtures: architectures, cached synthesized checkpoints, the ratio summary.

Architectures: ``$POOL_BENCH_ARCHS`` (comma separated, or ``all`` for ViT-B-32, ViT-B-16,
ViT-L-14); unset, or with ``--benchmark-disable``, ViT-B-32 alone. Checkpoints are synthesized
once under ``benchmarks/.cache/`` (or ``$POOL_BENCH_CACHE``; random weights at the real size;
never downloaded).

Cold page cache rounds are opt-in: ``--cold`` (evict the benchmark's own files with
``posix_fadvise``), ``--cold=drop_caches`` (the whole machine's page cache, as root), or
``$POOL_BENCH_COLD`` (``1``/``fadvise``, ``drop_caches``, ``auto``); without either, every
benchmark parametrized ``cache="cold"`` is skipped, and nothing touches the page cache.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

# The conversion cache (pool.cache) is opt-in through this variable: a benchmark that means to time
# a cache hit passes cache_dir= itself, so none (nor any child process) uses one by accident.
os.environ.pop("OPENCLIP_POOL_CACHE_DIR", None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cold", nargs="?", const="fadvise", default=None, choices=("fadvise", "drop_caches", "auto"),
                     help="also time with a cold page cache: evict the benchmark's files (fadvise, the default of "
                          "--cold) or drop the whole machine's page cache (drop_caches, root); same as "
                          "$POOL_BENCH_COLD. Off unless given.")


def pytest_configure(config: pytest.Config) -> None:
    cold = config.getoption("--cold", default=None)
    if cold:  # benchlib.drop_page_cache (and the child processes) read the variable
        os.environ["POOL_BENCH_COLD"] = cold
    try:
        benchlib.cold_method()  # a bad $POOL_BENCH_COLD fails here, before any synthesis
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the cold page cache rounds unless asked for (``--cold`` / ``$POOL_BENCH_COLD``)."""
    if benchlib.cold_method() is not None:
        return
    skip = pytest.mark.skip(reason="cold page cache rounds are opt-in: pytest benchmarks --cold (or POOL_BENCH_COLD=1)")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("cache") == "cold":
            item.add_marker(skip)


def _disabled(config: pytest.Config) -> bool:
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:
        return True


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", benchlib.selected_archs(_disabled(metafunc.config)), scope="session")


@pytest.fixture(scope="session")
def bench_disabled(request: pytest.FixtureRequest) -> bool:
    """True for ``--benchmark-disable`` (each benchmark once, as a test)."""
    return _disabled(request.config)


@pytest.fixture(scope="session")
def checkpoints(arch: str) -> dict[str, Path]:
    """``{form: path}`` for ``arch``: zip/legacy/pickle/state_dict/safetensors + finetuned_<i>."""
    return benchlib.ensure_checkpoints(arch)


@pytest.fixture(scope="session")
def rounds(bench_disabled: bool) -> dict[str, int]:
    """Rounds per kind of benchmark (``$POOL_BENCH_ROUNDS`` scales the slow ones,
    ``$POOL_BENCH_COLD_ROUNDS`` the cold-page-cache ones, default 3)."""
    slow = int(os.environ.get("POOL_BENCH_ROUNDS", "5"))
    cold = int(os.environ.get("POOL_BENCH_COLD_ROUNDS", "3"))
    return {"fast": 20, "slow": slow, "manual": max(1, min(slow, 3)), "cold": max(1, cold)}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "open_clip", "safetensors", "numpy", "pool"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except (OSError, ValueError):
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info["pool_versions"] = _versions()
    machine_info["pool_host"] = _host()


def summary() -> dict[str, Any]:
    """Figures, ratios and memory results of this run, by architecture."""
    out: dict[str, Any] = {"versions": _versions(), "host": _host(), "archs": {}}
    for arch in sorted(set(benchlib.RESULTS) | set(benchlib.MEMORY)):
        out["archs"][arch] = {"figures": benchlib.RESULTS.get(arch, {}), "ratios": benchlib.ratios(arch),
                              "memory": benchlib.MEMORY.get(arch, {}),
                              "ttff": benchlib.ttff_table(benchlib.RESULTS.get(arch, {}))}
    return out


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    output_json["pool_summary"] = summary()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not benchlib.RESULTS and not benchlib.MEMORY:
        return
    tr = terminalreporter
    mode = "each benchmark once (--benchmark-disable): indicative only" if _disabled(config) else "medians"
    tr.write_sep("=", f"pool benchmarks: ratios in this run ({mode})")
    for arch in sorted(set(benchlib.RESULTS) | set(benchlib.MEMORY)):
        figures = benchlib.RESULTS.get(arch, {})
        loads = {k: v for k, v in figures.items() if not k.startswith("ttff_")}
        if loads:
            tr.write_line(f"{arch}: load times (s)")
            tr.write_line("  " + "  ".join(f"{k}={v['seconds']:.4g}" for k, v in loads.items()))
            tr.write_line(f"  {'ratio':<38} {'value':>8}  {'ours (s)':>9}  {'baseline (s)':>12}  {'target':>7}  met")
            for name, r in benchlib.ratios(arch).items():
                met = {True: "yes", False: "NO", None: "-"}[r["met"]]
                tr.write_line(f"  {name:<38} {r['ratio']:>8.2f}  {r['numerator_s']:>9.4f}  "
                              f"{r['denominator_s']:>12.4f}  {r['target']:>7}  {met}")
            # test_atlas.py: how far the atlas's cosine matrix is from its baseline's (asserted <= 1e-10)
            diffs = {k: v["max_abs_diff_vs_other"] for k, v in loads.items() if "max_abs_diff_vs_other" in v}
            if diffs:
                tr.write_line("  cosine matrices, max |difference| from the other side: " +
                              "  ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
        _write_ttff(tr, arch, benchlib.ttff_table(figures))
        memory = benchlib.MEMORY.get(arch, {})
        if memory:
            tr.write_line(f"{arch}: peak RSS over the import-only baseline, vs one checkpoint's size")
            for name, m in memory.items():
                target = benchlib.MEMORY_TARGETS.get(name)
                met = "-" if target is None else ("yes" if m["ratio"] <= target else "NO")
                tr.write_line(f"  {name:<30} {m['ratio']:>8.2f}  peak +{m['peak_delta_mb']:.0f} MB "
                              f"(anon {m.get('anon_delta_mb', 0):.0f} MB, file-backed {m.get('file_mb', 0):.0f} MB) "
                              f"/ {m['checkpoint_mb']:.0f} MB  target <= {target if target else '-'}  {met}")


def _write_ttff(tr: Any, arch: str, rows: list[dict[str, Any]]) -> None:
    """The time-to-first-features table: load + one forward, ours beside the same run's baseline."""
    if not rows:
        return
    batch = next((r["batch"] for r in rows if r.get("batch")), "?")
    tr.write_line(f"{arch}: time to first features (s), load + one forward of {batch} images; baseline: "
                  "torch.load(state_dict) + create_model + load_state_dict + encode_image")
    tr.write_line(f"  {'form':<14} {'cache':<5} {'ours (s)':>9}  {'baseline (s)':>12}  {'ratio':>6}  rounds  "
                  "cold method  other load (cores, ours/baseline)")
    for r in rows:
        base = f"{r['baseline_s']:>12.4f}" if r["baseline_s"] is not None else f"{'-':>12}"
        ratio = f"{r['ratio']:>6.2f}" if r["ratio"] is not None else f"{'-':>6}"
        load = "/".join("-" if v is None else f"{v:.2f}" for v in (r["others_cpu_cores"], r["baseline_others_cpu_cores"]))
        tr.write_line(f"  {r['form']:<14} {r['page_cache']:<5} {r['ours_s']:>9.4f}  {base}  {ratio}  "
                      f"{r['rounds'] or '-':>6}  {r['cold_method'] or '-':<11}  {load}")
