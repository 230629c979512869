"""``python -m pool atlas CONFIG --out DIR``: the task-vector atlas of a pool (`pool.atlas_core`), written as
``atlas.json`` and PNG figures (`pool.atlas_report`), with a summary on stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .atlas_core import Atlas, atlas
from .atlas_report import PLOTS_HINT, check_out_dir
from .cli_common import EXIT_OK, rel, stderr_tty
from .cli_verify import config_file, pool_from_args
from .report import Style, human_count, human_time, table

__all__ = ["run"]

#: print the whole cosine matrix up to this many models (else the most and least similar pairs)
MATRIX_MAX = 10


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``atlas`` as parsed (`pool.cli.build_parser`).

    Returns:
        0 when the atlas was written.

    Raises:
        ConfigError: CONFIG cannot be used, or the pool has no ``_pretrained_`` or no other model.
        TaskVectorError: a model does not line up with ``_pretrained_``.
        UsageError: ``--out`` (or a parent of it) is a file.
    """
    config = config_file(args.config)
    check_out_dir(args.out)  # before minutes of work, not after
    pool, _, _ = pool_from_args(config, args)
    result = atlas(pool, progress=stderr_tty())
    written = result.write(args.out, plots=not args.no_plots)
    _summary(result, out)
    print(f"wrote {', '.join(rel(p.absolute(), Path.cwd()) for p in written)}")
    if not args.no_plots and len(written) == 1:
        print(out.warn(f"no figures: matplotlib is not installed; {PLOTS_HINT}"))
    return EXIT_OK



def _summary(result: Atlas, out: Style) -> None:
    """The whole-vector figures: norms, and the cosine / sign-conflict matrix (or its extreme pairs)."""
    whole = result.groups["all"]
    print(f"atlas of {len(result.models)} task vectors against _pretrained_ ({result.pretrained}): "
          f"{whole.tensors} tensors, {human_count(whole.elements)} elements per model, "
          f"{result.layers} layers, in {human_time(result.seconds)}")
    cos, conflict, norm = whole.cosine, whole.sign_conflict, whole.norm
    zero = [name for name, value in zip(result.models, norm, strict=True) if value == 0]
    if zero:
        print(out.warn(f"no cosine for {', '.join(zero)}: identical to _pretrained_ (a zero task vector)"))
    if len(result.models) <= MATRIX_MAX:
        headers = ["model", "norm", *(f"cos {name}" for name in result.models)]
        rows = [[name, f"{norm[i]:.4g}", *(f"{cos[i, j]:.3f}" for j in range(len(result.models)))]
                for i, name in enumerate(result.models)]
        print(table(headers, rows))
        print(out.dim("sign conflicts: fraction of the elements nonzero in both with opposite signs"))
        rows = [[name, *(f"{conflict[i, j]:.3f}" for j in range(len(result.models)))]
                for i, name in enumerate(result.models)]
        print(table(["model", *result.models], rows))
        return
    n = len(result.models)
    pairs = sorted(((float(cos[i, j]), result.models[i], result.models[j]) for i in range(n)
                    for j in range(i + 1, n) if np.isfinite(cos[i, j])), reverse=True)
    shown = pairs if len(pairs) <= 10 else pairs[:5] + pairs[-5:]
    rows = [[f"{a} / {b}", f"{c:.3f}"] for c, a, b in shown]
    print(table(["most and least similar pairs", "cosine"], rows))


