"""Turn a benchmark run into ``benchmarks/results/<date>-<machine>.json`` and one PNG chart.

    python benchmarks/report.py --bench-json RUN.json [--bench-json MORE.json] [--gpu-json gpu_bench.json] \
        [--machine NAME] [--date YYYY-MM-DD]

``RUN.json`` is pytest-benchmark's ``--benchmark-json`` output of ``pytest benchmarks`` (several
runs, e.g. one per architecture, merge); ``gpu_bench.json`` is what ``gpu_bench.py --out`` wrote.
The JSON holds the machine, the versions, every figure beside its baseline and each ratio against
its target, and, for ``test_ttff.py`` runs, a ``ttff`` table per architecture (form x warm/cold
page cache: ours, the same run's baseline, the ratio, rounds, the cold method). The PNG (written
when matplotlib is importable) shows load time per form against the baselines of the same run:
CPU figures when there are any, else the GPU checkpoint-to-device ones, else time to first features.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

BASELINE_TEXT = {
    "floor": "torch.load(state_dict, mmap=True, weights_only=True)",
    "floor_nommap": "torch.load(state_dict, weights_only=True)",
    "read_legacy": "open(legacy file).read()",
    "read_pickle": "open(plain pickle file).read()",
    "manual": "careful manual path: unsafe torch.load + shims, create_model, load_state_dict",
}
OURS_TEXT = {label: f"ImageEncoder.load({label})" for label, _, _ in benchlib.FORMS}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "machine"


def _from_benchmarks(run: dict[str, Any]) -> dict[str, Any]:
    """Rebuild figures from each benchmark's extra_info (runs without the pool_summary hook)."""
    benchlib.RESULTS.clear()
    archs: dict[str, Any] = {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info", {})
        arch = info.get("arch")
        if not arch:
            continue
        if info.get("role") == "memory":
            name = info["label"].removeprefix("memory: ")
            archs.setdefault(arch, {}).setdefault("memory", {})[name] = {
                k: v for k, v in info.items() if k not in ("arch", "label", "role")}
        elif str(info.get("label", "")).startswith("ttff_"):  # time to first features: keep the method etc.
            benchlib.record(arch, info["label"], info["median_s"], **{
                k: v for k, v in info.items() if k not in ("arch", "label", "median_s", "file_bytes")})
        elif "median_s" in info:
            benchlib.record(arch, info["label"], info["median_s"], rounds=info.get("rounds"), role=info.get("role"))
    for arch in benchlib.RESULTS:
        archs.setdefault(arch, {})["figures"] = benchlib.RESULTS[arch]
        archs[arch]["ratios"] = benchlib.ratios(arch)
    return archs


def collect_cpu(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    machine: dict[str, Any] = {}
    archs: dict[str, Any] = {}
    for path in paths:
        run = json.loads(path.read_text())
        info = run.get("machine_info", {})
        host = info.get("pool_host", {})
        machine = {"node": info.get("node"), "cpu": host.get("cpu_model") or info.get("cpu", {}).get("brand_raw"),
                   "cpus": host.get("cpus"), "mem_gib": host.get("mem_gib"), "torch_threads": host.get("torch_threads"),
                   "python": info.get("python_version"), "versions": info.get("pool_versions", {}),
                   "commit": (run.get("commit_info") or {}).get("id"), "datetime": run.get("datetime")}
        summary = run.get("pool_summary", {}).get("archs") or _from_benchmarks(run)
        for arch, data in summary.items():
            archs.setdefault(arch, {}).update({k: v for k, v in data.items() if v})
    for data in archs.values():  # every figure beside its baseline, for the reader
        figures = data.get("figures", {})
        def text(label: str) -> str:
            return OURS_TEXT.get(label) or BASELINE_TEXT.get(label, label)

        data["table"] = [
            {"ratio": name, "numerator": text(benchlib.TARGETS[name][0]), "numerator_s": r["numerator_s"],
             "denominator": text(benchlib.TARGETS[name][1]), "denominator_s": r["denominator_s"],
             "value": r["ratio"], "target": r["target"], "met": r["met"]}
            for name, r in data.get("ratios", {}).items()]
        for name, m in data.get("memory", {}).items():
            target = benchlib.MEMORY_TARGETS.get(name)
            m["target"] = f"<= {target:g}" if target else ""
            m["met"] = (m["ratio"] <= target) if target else None
        data["figures"] = figures
        ttff = benchlib.ttff_table(figures)  # time to first features: form x warm/cold beside the baseline
        if ttff:
            data["ttff"] = ttff
    return machine, archs


#: characters per line of a panel title (the ratios): it is centred over the bars, right of the long labels
TITLE_WIDTH = 90


def _wrap(text: str, width: int = TITLE_WIDTH) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _ratio_lines(parts: list[str], width: int = TITLE_WIDTH) -> list[str]:
    """The ratios, ``; ``-joined, broken between ratios (within one only when it alone is too long)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "; " + part
        else:
            lines.append(part)
    return [_wrap(line, width) for line in lines]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (then no PNG: ``pip install -e ".[bench]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig: Any, path: Path) -> None:
    """Write the PNG with every title, label and legend inside it (``bbox_inches="tight"``)."""
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)


def draw_cpu(archs: dict[str, Any], title: str) -> Any:
    """The CPU load-time figure (one panel per architecture), or None without matplotlib or figures."""
    plt = _pyplot()
    if plt is None:
        return None
    order_ours = [label for label, _, _ in benchlib.FORMS]
    order_base = ["floor", "floor_nommap", "read_legacy", "read_pickle", "manual"]
    names = [a for a in archs if any(k in archs[a].get("figures", {}) for k in order_ours + order_base)]
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.2 + 4.6 * len(names)), squeeze=False)
    for ax, arch in zip(axes[:, 0], names, strict=True):
        figures = archs[arch]["figures"]
        rows = [(OURS_TEXT[k], figures[k]["seconds"], "ours") for k in order_ours if k in figures]
        rows += [(BASELINE_TEXT[k], figures[k]["seconds"], "baseline") for k in order_base if k in figures]
        rows.reverse()
        labels = [r[0] for r in rows]
        values = [r[1] for r in rows]
        colors = ["#1f77b4" if r[2] == "ours" else "#b0b0b0" for r in rows]
        bars = ax.barh(range(len(rows)), values, color=colors)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_xlabel("seconds to a ready encoder (log scale; median, warm page cache)")
        parts = [f"{n} = {r['ratio']:.2f}x (target {r['target']})" for n, r in archs[arch].get("ratios", {}).items()
                 if r["target"]]
        ax.set_title("\n".join([arch, *_ratio_lines(parts)]), fontsize=8)
        for bar, value in zip(bars, values, strict=True):
            ax.text(value * 1.05, bar.get_y() + bar.get_height() / 2, f"{value:.3g} s", va="center", fontsize=7)
        ax.set_xlim(min(values) / 2, max(values) * 4)
        ax.grid(axis="x", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color="#1f77b4"), plt.Rectangle((0, 0), 1, 1, color="#b0b0b0")]
    axes[0, 0].legend(handles, ["pool (ours)", "baseline, same run"], loc="upper right", fontsize=8)
    fig.suptitle(_wrap(title, 90), fontsize=10)
    fig.tight_layout()
    return fig


def chart_cpu(archs: dict[str, Any], path: Path, title: str) -> bool:
    if _pyplot() is None:
        print('matplotlib is not installed: no PNG written (pip install -e ".[bench]")')
        return False
    fig = draw_cpu(archs, title)
    if fig is None:
        return False
    _save(fig, path)
    _pyplot().close(fig)
    return True


def chart_ttff(archs: dict[str, Any], path: Path, title: str) -> bool:
    """Time to first features per form, warm and cold page cache, beside the same run's baseline."""
    plt = _pyplot()
    if plt is None:
        return False
    names = [a for a in archs if archs[a].get("ttff")]
    if not names:
        return False
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 0.8 + 3.6 * len(names)), squeeze=False)
    for ax, arch in zip(axes[:, 0], names, strict=True):
        rows = archs[arch]["ttff"]
        forms = list(dict.fromkeys(r["form"] for r in rows))
        bars: list[tuple[str, float, str]] = []
        for cache, color in (("warm", "#1f77b4"), ("cold", "#0b3d66")):
            base = next((r["baseline_s"] for r in rows if r["page_cache"] == cache and r["baseline_s"]), None)
            if base:
                bars.append((f"baseline, {cache}", base, "#b0b0b0" if cache == "warm" else "#707070"))
            bars += [(f"{r['form']}, {cache}", r["ours_s"], color) for f in forms for r in rows
                     if r["form"] == f and r["page_cache"] == cache]
        bars.reverse()
        drawn = ax.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_xlabel("seconds to the first features: load + one forward (median)")
        ax.set_title(f"{arch}, batch {rows[0].get('batch')}", fontsize=9)
        for bar, (_, value, _) in zip(drawn, bars, strict=True):
            ax.text(value * 1.01, bar.get_y() + bar.get_height() / 2, f"{value:.3g} s", va="center", fontsize=7)
        ax.set_xlim(0, max(b[1] for b in bars) * 1.15)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_wrap(title, 90), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def chart_gpu(gpu: dict[str, Any], path: Path, title: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    timings = gpu.get("load_to_gpu", {}).get("timings", {})
    if not timings:
        return False
    rows = list(timings.items())[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.45 * len(rows)))
    values = [r[1]["median_s"] * 1e3 for r in rows]
    colors = ["#1f77b4" if r[0].startswith("ours") else "#b0b0b0" for r in rows]
    bars = ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms, ViT-B-32 checkpoint to GPU (median of 5)")
    for bar, value in zip(bars, values, strict=True):
        ax.text(value * 1.05, bar.get_y() + bar.get_height() / 2, f"{value:.1f} ms", va="center", fontsize=7)
    ax.set_title(_wrap(title, 90), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-json", action="append", type=Path, default=[])
    parser.add_argument("--gpu-json", type=Path)
    parser.add_argument("--machine", help="machine name for the file name (default: derived from the run)")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not args.bench_json and not args.gpu_json:
        parser.error("give --bench-json and/or --gpu-json")
    machine, archs = collect_cpu(args.bench_json) if args.bench_json else ({}, {})
    gpu = json.loads(args.gpu_json.read_text()) if args.gpu_json else None
    if args.machine:
        name = args.machine
    elif gpu and gpu.get("env", {}).get("gpu"):
        name = gpu["env"]["gpu"]
    else:
        name = f"{machine.get('cpus', '?')}cpu-{machine.get('cpu') or machine.get('node') or 'cpu'}"
    stem = f"{args.date}-{_slug(name)}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"date": args.date, "machine_name": name, "machine": machine,
                              "cpu": archs, "gpu": gpu,
                              "targets": {"cpu": {k: f"{v[2]} {v[3]:g}" for k, v in benchlib.TARGETS.items() if v[2]},
                                          "memory": {k: f"<= {v:g}" for k, v in benchlib.MEMORY_TARGETS.items()},
                                          "gpu": {"ours zip / pinned copy": "<= 2", "ours / safetensors.load_file": "< 1",
                                                  "ours / open_clip throughput": "~1 (no slowdown)"}}}
    if any(a.get("ttff") for a in archs.values()):
        result["ttff_note"] = (
            "time to first features (issue 15): ImageEncoder.load + eval() + one forward of a random batch under "
            "torch.no_grad(), beside the same run's baseline (" + benchlib.TTFF_TEXT[benchlib.TTFF_BASELINE] +
            "); warm and cold page cache (cold: emptied before each round, outside the timing, by cold_method); "
            "in process: imports and first-call caches warm in both; ratio = ours / baseline; no targets")
    out_json = args.out_dir / f"{stem}.json"
    out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out_json}")
    versions = machine.get("versions", {}) or (gpu or {}).get("env", {})
    title = (f"pool load time vs baselines, {name}, {args.date} "
             f"(torch {versions.get('torch', '?')}, open_clip {versions.get('open_clip', '?')})")
    png = args.out_dir / f"{stem}.png"
    if archs and chart_cpu(archs, png, title) or (not archs and gpu and chart_gpu(gpu, png, title)):
        print(f"wrote {png}")
    elif archs and chart_ttff(archs, png, title.replace("load time", "time to first features")):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
