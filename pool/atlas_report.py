"""Write a task-vector atlas (`pool.atlas_core.Atlas`): ``atlas.json`` (one versioned schema, below) and,
when matplotlib is installed, the PNG figures `pool.atlas_plots` draws.

``atlas.json``, schema ``openclip-pool.atlas`` version 1 (keys sorted, no times: the same pool gives
the same bytes)::

    {"schema": "openclip-pool.atlas", "version": 1, "written_by": "openclip-pool <version>",
     "models": [N names], "pretrained": "<file>", "sources": {"<name>": "<file>"},
     "layers": L, "definitions": {...},
     "blocks": {"all": BLOCK, "embeddings": BLOCK, "attention": BLOCK, "mlp": BLOCK, "norm": BLOCK,
                "output": BLOCK, ["text": BLOCK, "other": BLOCK,] "layer.0": BLOCK,
                "layer.0.attention": BLOCK, "layer.0.mlp": BLOCK, ...}}
    BLOCK = {"tensors": int, "elements": int, "norm": [N], "cosine": [[N x N]],
             "sign_conflict": [[N x N]], "gram": [[N x N]], "conflicts": [[N x N]],
             "both_nonzero": [[N x N]]}

Matrices are row-major in ``models`` order; a value that is undefined (the cosine of a zero task
vector, the conflict rate where no element is nonzero in both) is ``null``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import UsageError
from .writer import write_bytes_atomic

if TYPE_CHECKING:  # the atlas imports this module to write itself
    from .atlas_core import Atlas, AtlasGroup

__all__ = ["SCHEMA", "SCHEMA_VERSION", "JSON_NAME", "atlas_dict", "check_out_dir", "write_atlas", "PLOTS_HINT"]

log = logging.getLogger("pool.atlas")

SCHEMA = "openclip-pool.atlas"
SCHEMA_VERSION = 1
JSON_NAME = "atlas.json"
#: what to install for the figures
PLOTS_HINT = "pip install matplotlib (or the project's `atlas` extra: pip install \"openclip-pool[atlas]\")"

DEFINITIONS = {
    "task_vector": "finetuned - pretrained over the floating-point tensors both have, taken in float64",
    "gram": "gram[i][j] = sum over the block's elements of task_vector_i * task_vector_j (float64)",
    "norm": "L2 norm of each task vector over the block: sqrt(gram[i][i])",
    "cosine": "gram[i][j] / (norm[i] * norm[j])",
    "conflicts": "elements where task vectors i and j are both nonzero and of opposite sign",
    "both_nonzero": "elements where task vectors i and j are both nonzero",
    "sign_conflict": "conflicts[i][j] / both_nonzero[i][j]",
}


def _plain(values: np.ndarray) -> Any:
    """A matrix or vector as JSON lists, NaN and infinities as None, counts as ints."""
    if values.ndim > 1:
        return [_plain(row) for row in values]
    if values.dtype.kind in "iu":
        return [int(v) for v in values]
    return [float(v) if math.isfinite(v) else None for v in values]


def _block(group: AtlasGroup) -> dict[str, Any]:
    return {"tensors": group.tensors, "elements": group.elements, "norm": _plain(group.norm),
            "cosine": _plain(group.cosine), "sign_conflict": _plain(group.sign_conflict),
            "gram": _plain(group.gram), "conflicts": _plain(group.conflicts),
            "both_nonzero": _plain(group.both_nonzero)}


def atlas_dict(result: Atlas) -> dict[str, Any]:
    """The atlas as the JSON object ``atlas.json`` holds (the module docstring gives the schema).

    Args:
        result: an `Atlas`.

    Returns:
        A dict of plain JSON values.
    """
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "written_by": f"openclip-pool {__version__}",
            "models": list(result.models), "pretrained": result.pretrained,
            "sources": dict(zip(result.models, result.sources, strict=True)), "layers": result.layers,
            "definitions": DEFINITIONS, "blocks": {name: _block(g) for name, g in result.groups.items()}}


def check_out_dir(out_dir: str | Path) -> Path:
    """The folder the atlas is written to, checked before anything is computed: it (or the first
    of its parents that exists) must be a folder.

    Args:
        out_dir: the folder (``~`` expanded); it need not exist yet.

    Returns:
        The folder's path.

    Raises:
        UsageError: it, or a parent of it, is a file.
    """
    folder = Path(out_dir).expanduser()
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                what = "is a file" if place == folder else f"lies below {place}, which is a file"
                raise UsageError(f"--out {folder} {what}; the atlas writes {JSON_NAME} and PNG figures into a "
                                 "folder. Give a folder name (it is created if missing).")
            break
    return folder


def write_atlas(result: Atlas, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``atlas.json`` and, when matplotlib is installed and ``plots``, the PNG figures.

    Each file is written atomically (`pool.writer.write_bytes_atomic`); other files in
    ``out_dir`` are left alone.

    Args:
        result: an `Atlas`.
        out_dir: the folder (created if needed).
        plots: draw the figures (`pool.atlas_plots.draw_all`).

    Returns:
        The files written, ``atlas.json`` first.

    Raises:
        UsageError: ``out_dir``, or a parent of it, is a file (`check_out_dir`).
    """
    folder = check_out_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(atlas_dict(result), indent=1, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(folder / JSON_NAME, text.encode("utf-8"))
    written = [folder / JSON_NAME]
    if plots:
        try:
            from .atlas_plots import draw_all  # matplotlib is optional
        except ImportError:
            log.warning("matplotlib is not installed: wrote %s only; for the PNG figures, %s",
                        folder / JSON_NAME, PLOTS_HINT)
            return written
        for name, png in draw_all(result):
            write_bytes_atomic(folder / name, png)
            written.append(folder / name)
    return written
