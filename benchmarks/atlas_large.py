"""The large atlas pool: many ViT-B-32-sized fine-tuned image towers, synthesized once.

    python benchmarks/atlas_large.py [--models N]   # write it (once) under benchmarks/.cache/atlas-large
    python benchmarks/atlas_large.py --remove       # delete it (same as: rm -rf benchmarks/.cache/atlas-large)

``_pretrained_`` is the image tower of the cached ViT-B-32 state dict (`benchlib.ensure_checkpoints`;
152 tensors, 87.8 M parameters, 351 MB in float32); each fine-tuned copy adds ``1e-3`` times fresh
normal noise to every tensor (its own seed), so the task vectors are distinct and close to
orthogonal. Each file is a torch zip state dict (``torch.save``), 351 MB; 40 copies (the default,
``$POOL_BENCH_ATLAS_LARGE_N``) take 14.4 GB with ``_pretrained_``. With 40 models FusionBench's
``TaskVectorCosSimilarity`` needs 40 x 87.8 M x 8 B = 28.1 GB for its float64 task vectors, and as
much again for their ``torch.stack``: more than a 24 GiB machine has. Under ``$POOL_BENCH_CACHE``
when set. A manifest written last marks a complete set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

ARCH = "ViT-B-32"
FORMAT = 1
DEFAULT_MODELS = int(os.environ.get("POOL_BENCH_ATLAS_LARGE_N", "40"))
NOISE = 1e-3


def large_dir() -> Path:
    return benchlib.cache_dir() / "atlas-large"


def _paths(n: int) -> dict[str, Path]:
    root = large_dir()
    return {"_pretrained_": root / "pretrained.pt", **{f"task{i}": root / f"task{i}.pt" for i in range(n)}}


def _complete(paths: dict[str, Path], n: int) -> bool:
    manifest = large_dir() / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        return meta.get("format") == FORMAT and meta.get("models", 0) >= n and all(
            p.exists() and p.stat().st_size == meta["sizes"][k] for k, p in paths.items())
    except (OSError, ValueError, KeyError):
        return False


def ensure_large_pool(n: int = DEFAULT_MODELS, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """``{name: path}`` of the large pool (``_pretrained_`` + ``task0`` .. ``task{n-1}``), written once."""
    import torch

    paths = _paths(n)
    if _complete(paths, n):
        return paths
    base_file = benchlib.ensure_checkpoints(ARCH, log=log)["state_dict"]
    full = torch.load(base_file, mmap=True, weights_only=True)
    base = {k: v.clone() for k, v in full.items() if ".visual." in f".{k}" and v.is_floating_point()}
    del full
    root = large_dir()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"[benchmarks] synthesizing the large atlas pool under {root}: _pretrained_ + {n} fine-tuned "
        f"{ARCH} image towers ({sum(v.numel() for v in base.values()) / 1e6:.1f} M parameters each)")
    benchlib._atomic(paths["_pretrained_"], lambda p: torch.save(base, p))
    for i in range(n):
        path = paths[f"task{i}"]
        if not path.exists() or path.stat().st_size != paths["_pretrained_"].stat().st_size:
            generator = torch.Generator().manual_seed(10_000 + i)
            tuned = {k: v + NOISE * torch.randn(v.shape, generator=generator) for k, v in base.items()}
            benchlib._atomic(path, lambda p, tuned=tuned: torch.save(tuned, p))
            del tuned
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "arch": ARCH, "models": n, "sizes": sizes},
                                                   indent=1))
    log(f"[benchmarks] large atlas pool: {len(paths)} files, {sum(sizes.values()) / 1e9:.1f} GB in "
        f"{time.perf_counter() - start:.0f} s")
    return paths


def remove() -> None:
    shutil.rmtree(large_dir(), ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=DEFAULT_MODELS, help="fine-tuned copies (default %(default)s)")
    parser.add_argument("--remove", action="store_true", help=f"delete {large_dir()}")
    args = parser.parse_args()
    if args.remove:
        remove()
        print(f"removed {large_dir()}")
        return
    paths = ensure_large_pool(args.models)
    print(f"{len(paths)} files under {large_dir()}")


if __name__ == "__main__":
    main()
