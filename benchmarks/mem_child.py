"""Child process for the memory benchmarks: load, touch every weight, report peak RSS.

    python benchmarks/mem_child.py baseline              # imports only (the yardstick)
    python benchmarks/mem_child.py one PATH              # ImageEncoder.load(PATH) + one forward
    python benchmarks/mem_child.py torch_load PATH       # torch.load(PATH, weights_only=True), no mmap
    python benchmarks/mem_child.py pool PATH [PATH ...]  # OpenCLIPVisionModelPool.named_models()

Every mode imports the same modules first, so the import-only baseline subtracts cleanly. Each
encoder runs one forward on a single image, which reads every weight: with mmap'd tensors the
weights then count in RSS as file-backed pages (``RssFile``), without mmap as anonymous memory
(``RssAnon``). Prints one JSON line; ``peak_kb`` is ``ru_maxrss`` (kB on Linux).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: F401  (ImageEncoder imports it lazily; import it in every mode)
import torch

import pool
from pool.modeling import ImageEncoder


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def touch(encoder: torch.nn.Module) -> None:
    size = encoder.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with torch.no_grad():
        encoder(torch.zeros(1, 3, size, size))


def main() -> None:
    torch.set_num_threads(1)
    mode, paths = sys.argv[1], sys.argv[2:]
    # warm the lazy imports the load path uses, so they do not count as loading
    from pool.arch.names import _registry

    _registry()
    stages = {"imports": status()}
    if mode == "one":
        encoder = ImageEncoder.load(paths[0])
        stages["loaded"] = status()
        touch(encoder)
        stages["forward"] = status()
    elif mode == "torch_load":
        sd = torch.load(paths[0], weights_only=True)
        stages["loaded"] = status()
        del sd
    elif mode == "pool":
        pool_cls = getattr(pool, "OpenCLIPVisionModelPool", None)
        if pool_cls is None:
            from pool.modelpool import OpenCLIPVisionModelPool as pool_cls
        models = {f"task{i}": str(p) for i, p in enumerate(paths)}
        model_pool = pool_cls(models=models)
        count = 0
        for name, encoder in model_pool.named_models():
            touch(encoder)
            stages[name] = status()
            count += 1
            del encoder
            gc.collect()
        if count != len(paths):
            raise SystemExit(f"named_models() yielded {count} encoders, expected {len(paths)}")
    elif mode != "baseline":
        raise SystemExit(f"unknown mode {mode}")
    stages["end"] = status()
    print(json.dumps({"mode": mode, "stages": stages, "peak_kb": stages["end"]["ru_maxrss"]}))


if __name__ == "__main__":
    main()
