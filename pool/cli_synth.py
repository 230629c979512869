"""``python -m pool synth DIR``: write a synthetic checkpoint tree in the task-arithmetic layout
(every container and form, heads, zeroshot) with random weights, and its pool config."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from . import synth
from .arch import arch_for_name
from .cli_common import EXIT_OK, stderr_tty
from .errors import UsageError
from .report import Style, human_size, human_time, table

__all__ = ["run"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``synth`` as parsed (`pool.cli.build_parser`).

    Returns:
        The exit status (0 written).

    Raises:
        UsageError: bad ``--tasks``, or DIR is no folder or holds a tree (without ``--force``).
        ConfigError: ``--arch`` names no open_clip ViT.
    """
    arch: Any = synth.TINY
    if args.arch and args.arch.lower() != "tiny":
        arch_for_name(args.arch)  # ConfigError (exit 2) for an unknown name, listing known ones
        arch = args.arch
    tasks: Sequence[str] = synth.DEFAULT_TASKS
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if not all(c.isalnum() or c in "-_" for c in t)]
        if not tasks or bad:
            raise UsageError(f"--tasks {args.tasks!r}: give comma-separated task names made of letters, "
                             f"digits, - and _ (e.g. Cars,DTD,MNIST){'; bad: ' + ', '.join(bad) if bad else ''}.")
        lowered = [t.lower() for t in tasks]
        if len(set(lowered)) != len(lowered):
            raise UsageError(f"--tasks {args.tasks!r}: task names must differ (case-insensitively).")
    root = Path(args.directory).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder.")
    if (root / "pool.yaml").exists() and not args.force:
        raise UsageError(f"{root / 'pool.yaml'} exists; refusing to overwrite a checkpoint tree. Pass "
                         "--force to write over it, or choose an empty folder.")
    start = time.perf_counter()
    if stderr_tty():
        print(f"writing a {arch if isinstance(arch, str) else 'tiny'} checkpoint tree ...", file=sys.stderr,
              end="\r", flush=True)
    tree = synth.write_tree(root, arch=arch, tasks=tasks)
    seconds = time.perf_counter() - start
    files = sorted(tree.files.values())
    total = sum(p.stat().st_size for p in files)
    rows = [[str(p.relative_to(tree.root)), human_size(p.stat().st_size)] for p in files]
    cfg = OmegaConf.load(tree.config)
    lines = [out.bold(f"wrote a {tree.model_name or 'tiny'} checkpoint tree ({len(cfg.models)} models, "
                      f"{len(cfg.classification_heads)} heads, {human_size(total)}, random weights) in "
                      f"{human_time(seconds)}"),
             f"  root    {tree.root.absolute()}",
             f"  config  {tree.config.absolute()}",
             "",
             table(["file", "size"], rows, right=(1,)),
             "",
             f"next: openclip-pool verify {tree.config}"]
    print("\n".join(lines))
    return EXIT_OK
