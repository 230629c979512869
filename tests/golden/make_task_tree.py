"""Write a task-arithmetic checkpoint tree with open_clip 2.0.2 itself, for the FusionBench tests.

    PYTHONPATH=/path/to/open_clip-2.0.2 python tests/golden/make_task_tree.py OUTDIR

OUTDIR gets ``zeroshot.pt`` (torch zip), ``Cars/finetuned.pt`` (legacy torch.save) and
``DTD/finetuned.pt`` (plain ``pickle.dump``), each a pickled ``src.modeling.ImageEncoder`` of the
tiny QuickGELU architecture of make_golden.py with distinct weights (the fine-tuned ones are the
zero-shot weights moved by a seeded step), plus ``head_Cars.pt`` (zip) and ``head_DTD.pt`` (plain
pickle). The layout of the published checkpoints; ``nox -s fusion_bench`` writes it and points
tests/test_fusion_bench.py at it (``POOL_FUSION_TREE``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import (
    build_encoder,
    build_head,
    install_src_modeling,
    open_clip_version,
    register_configs,
    write_container,
)

ARCH = "tiny-vit-quickgelu"
TASKS = (("Cars", "legacy", "zip"), ("DTD", "pickle", "pickle"))


def main(argv: list[str] | None = None) -> int:
    import open_clip

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    version = open_clip_version(open_clip)
    if version != "2.0.2":
        print(f"need open_clip 2.0.2 first on PYTHONPATH, got {version} from {open_clip.__file__}", file=sys.stderr)
        return 2
    register_configs(open_clip)
    modeling = install_src_modeling()
    out.mkdir(parents=True, exist_ok=True)
    write_container(build_encoder(modeling, ARCH), out / "zeroshot.pt", "zip")
    for i, (task, container, head_container) in enumerate(TASKS):
        encoder = build_encoder(modeling, ARCH)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # "fine-tuning": a seeded step away from the zero-shot weights
            for _, param in sorted(encoder.named_parameters()):
                param.add_(torch.randn(param.shape, generator=generator), alpha=0.01)
        (out / task).mkdir(exist_ok=True)
        write_container(encoder, out / task / "finetuned.pt", container)
        head = build_head(modeling, ARCH)
        with torch.no_grad():
            head.weight.mul_(1.0 + i)
        write_container(head, out / f"head_{task}.pt", head_container)
    print(f"wrote a task tree with open_clip {version} under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
