"""Child process for the atlas benchmarks: one pass of the atlas or its baseline, its peak memory.

    python benchmarks/atlas_child.py MODE SPEC.json

``MODE``:

- ``imports``: the imports alone (the yardstick);
- ``atlas``: ``pool.atlas(OpenCLIPVisionModelPool(models=...), progress=False)``;
- ``fusion_bench``: FusionBench 0.2.33's own ``TaskVectorCosSimilarity(plot_heatmap=False,
  output_path=...)`` on ``pool.fusion_bench.OpenCLIPVisionModelPool`` (Python 3.12+ with
  fusion-bench installed);
- ``reproduction``: the same algorithm written out here (`reproduce_fusion_bench`) where
  fusion_bench cannot be imported (Python 3.11).

``SPEC.json``: ``{"models": {"_pretrained_": path, name: path, ...}, "limit_as": bytes or null,
"sample_s": seconds}``. ``limit_as`` sets ``RLIMIT_AS`` (the address space) before anything is
loaded, so a pass that needs more than that fails with an allocation error instead of waking the
OOM killer; the child then reports the error and how far it got, and exits 0.

Memory: ``VmHWM`` (peak RSS, the kernel's exact high-water mark: anonymous and mapped file pages
together) and the peak of ``RssAnon`` sampled every ``sample_s`` (default 5 ms) by a thread.
Mapped checkpoint pages are page cache (shared, reclaimable); anonymous memory is what must fit
in RAM. Prints one JSON line last: the matrix, the seconds of the pass (imports excluded), the
memory figures, and ``progress`` (task vectors built before the end or the failure).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPeak")


def status() -> dict[str, int]:
    """``/proc/self/status`` memory fields, kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0])
    return out


class AnonSampler(threading.Thread):
    """Samples ``RssAnon`` (and ``RssFile``) every ``interval`` s; keeps the maxima (kB).

    Torch releases the GIL in its tensor operations, so the thread keeps sampling while a large
    buffer is being filled; a peak shorter than the interval can be missed (``VmHWM`` cannot).
    """

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.max_anon = 0
        self.max_file = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            s = status()
        except (OSError, MemoryError, ValueError):
            return
        self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
        self.max_file = max(self.max_file, s.get("RssFile", 0))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def reproduce_fusion_bench(modelpool: Any, progress: list[int]) -> tuple[list[str], list[list[float]]]:
    """FusionBench 0.2.33's ``TaskVectorCosSimilarity.run`` (``trainable_only=True``, no
    down-sampling), step for step, for Pythons where fusion_bench cannot be imported.

    Per fine-tuned model: its trainable parameters (``trainable_state_dict``) minus the pretrained
    model's in float32 (``state_dict_sub``), flattened in sorted key order
    (``state_dict_to_vector``: ``parameters_to_vector``), through numpy, to float64; then
    ``torch.stack`` of all of them and ``cosine_similarity`` for every pair.
    """
    def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}

    with torch.no_grad():
        pretrained = modelpool.load_pretrained_model()
        vectors = []
        for _name, finetuned in modelpool.named_models():
            a, b = trainable(finetuned), trainable(pretrained)
            if set(a) != set(b):
                raise ValueError("the models' trainable parameters differ")
            diff = {k: a[k] - b[k] for k in a}
            flat = torch.nn.utils.parameters_to_vector([v.reshape(-1) for _, v in sorted(diff.items())])
            vectors.append(torch.from_numpy(flat.cpu().float().numpy()).to(torch.float64))
            del a, diff, flat, finetuned
            progress[0] += 1
        stacked = torch.stack(vectors, dim=0)
        progress[1] = 1
        n = len(modelpool)
        cos = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                cos[i, j] = torch.nn.functional.cosine_similarity(stacked[i], stacked[j], dim=0)
                cos[j, i] = cos[i, j]
    return list(modelpool.model_names), cos.tolist()


def fusion_bench_cos_similarity() -> type:
    """FusionBench's ``TaskVectorCosSimilarity`` class.

    fusion-bench 0.2.33's ``fusion_bench.method.analysis`` package imports its violin-plot module,
    which imports seaborn, a package fusion-bench does not declare; where seaborn is missing, the
    module that defines the class (which needs seaborn only to plot, off here) is loaded from its
    file instead. Same class, same code.
    """
    try:
        from fusion_bench.method.analysis.task_vector_cos_similarity import TaskVectorCosSimilarity
    except ModuleNotFoundError as exc:
        if exc.name != "seaborn":
            raise
        import importlib.util

        import fusion_bench.method

        name = "fusion_bench.method.analysis.task_vector_cos_similarity"
        module = sys.modules.get(name)
        if module is None:
            path = Path(fusion_bench.method.__file__).parent / "analysis" / "task_vector_cos_similarity.py"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        TaskVectorCosSimilarity = module.TaskVectorCosSimilarity
    return TaskVectorCosSimilarity


def run_fusion_bench(modelpool: Any, progress: list[int]) -> tuple[list[str], list[list[float]]]:
    """FusionBench's own ``TaskVectorCosSimilarity``; the matrix read back from the CSV it writes
    (``repr`` floats: exact). ``progress[0]`` counts its ``get_task_vector`` calls."""
    import csv
    import io

    class Counted(fusion_bench_cos_similarity()):
        def get_task_vector(self, pretrained_model: Any, finetuned_model: Any) -> torch.Tensor:
            vector = super().get_task_vector(pretrained_model, finetuned_model)
            progress[0] += 1
            return vector

    with tempfile.TemporaryDirectory() as out:
        sink = io.StringIO()  # it prints the DataFrame and each model's name
        stdout, sys.stdout = sys.stdout, sink
        try:
            Counted(plot_heatmap=False, output_path=out).run(modelpool)
        finally:
            sys.stdout = stdout
        progress[1] = 1
        with open(os.path.join(out, "task_vector_cos_similarity.csv"), newline="") as f:
            rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, [[float(v) for v in row[1:]] for row in rows[1:]]


def run_atlas(models: dict[str, str], progress: list[int]) -> tuple[list[str], list[list[float]], dict[str, Any]]:
    from pool import OpenCLIPVisionModelPool, atlas

    result = atlas(OpenCLIPVisionModelPool(models=models), progress=False)
    progress[0] = len(result.models)
    progress[1] = 1
    g = result.groups["all"]
    extra = {"groups": len(result.groups), "norm": [float(v) for v in g.norm]}
    return list(result.models), g.cosine.tolist(), extra


def set_limit(limit: int | None) -> None:
    """``RLIMIT_AS`` = ``limit`` bytes; and, should the machine run short anyway, this process is
    the OOM killer's first choice (``oom_score_adj`` 1000), not a neighbour's."""
    if limit:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000\n")
        except OSError:
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def is_allocation_error(exc: BaseException | None) -> bool:
    """A failed allocation: MemoryError, ENOMEM, torch's allocator RuntimeError, or an error raised while
    handling one (a loader may wrap it: its cause or context is searched)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            return True  # ENOMEM: a reader's own mmap of its buffer refused under the limit
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and any(w in text for w in ("allocate", "out of memory", "not enough memory")):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def main() -> None:
    mode, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    models: dict[str, str] = spec.get("models", {})
    # every mode imports the same modules before the yardstick
    import open_clip  # noqa: F401

    from pool import OpenCLIPVisionModelPool

    if mode == "fusion_bench":
        from pool.fusion_bench import OpenCLIPVisionModelPool as pool_cls
    else:
        pool_cls = OpenCLIPVisionModelPool
    gc.collect()
    imports = status()
    set_limit(spec.get("limit_as"))
    sampler = AnonSampler(float(spec.get("sample_s", 0.005)))
    sampler.start()
    progress = [0, 0]  # task vectors built, whether the matrix was reached
    out: dict[str, Any] = {"mode": mode, "error": None, "names": None, "cosine": None}
    start = time.perf_counter()
    try:
        if mode == "atlas":
            out["names"], out["cosine"], extra = run_atlas(models, progress)
            out.update(extra)
        elif mode == "fusion_bench":
            out["names"], out["cosine"] = run_fusion_bench(pool_cls(models=models), progress)
        elif mode == "reproduction":
            out["names"], out["cosine"] = reproduce_fusion_bench(pool_cls(models=models), progress)
        elif mode != "imports":
            raise SystemExit(f"unknown mode {mode}")
    except Exception as exc:  # only allocation failures are results; anything else is re-raised
        if not is_allocation_error(exc):
            raise
        gc.collect()
        out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    seconds = time.perf_counter() - start
    sampler.stop()
    end = status()
    out.update({
        "seconds": seconds, "task_vectors_built": progress[0], "matrix_reached": bool(progress[1]),
        "limit_as": spec.get("limit_as"), "models": len(models),
        "memory_kb": {"imports": imports, "end": end, "peak_rss": end["VmHWM"], "peak_anon_sampled": sampler.max_anon,
                      "peak_file_sampled": sampler.max_file, "samples": sampler.samples,
                      "sample_s": sampler.interval, "vm_peak": end["VmPeak"]},
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
