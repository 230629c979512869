"""The atlas's figures (`pool.atlas_core.Atlas` -> PNG bytes), drawn with matplotlib's object API (no
pyplot state, no display needed). Importing this module needs matplotlib; `pool.atlas_report`
writes the JSON without it.

* ``cosine.png``, ``sign_conflict.png``: heatmaps over the whole task vectors, model names on
  both axes, a colour bar, the values in the cells up to `ANNOTATE_MAX` models;
* ``cosine_by_block.png``: the cosine heatmap of each kind of block (embeddings, attention, MLP,
  norms, output) on one colour scale;
* ``norms_by_layer.png``: each task vector's norm per residual block (whole, attention, MLP);
* ``cosine_by_layer.png``: pairwise cosine per residual block: one line per pair up to
  `PAIR_LINES_MAX` pairs, else the mean with the min-max band.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atlas_blocks import KINDS

if TYPE_CHECKING:  # the atlas imports this module (through its report) to draw itself
    from .atlas_core import Atlas

__all__ = ["draw_all", "ANNOTATE_MAX", "PAIR_LINES_MAX"]

#: write the values in the heatmap cells up to this many models
ANNOTATE_MAX = 12
#: one line per pair in the per-layer cosine plot up to this many pairs
PAIR_LINES_MAX = 15
_DPI = 120


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _side(n: int) -> float:
    return max(4.0, 0.55 * n + 2.5)


def _heatmap(fig: Figure, ax, matrix: np.ndarray, labels: Sequence[str], *, vmin: float, vmax: float,
             cmap: str, label: str | None, annotate: bool, diagonal: str | None) -> None:
    """One heatmap: the diagonal greyed (``diagonal`` written in it), a colour bar (unless ``label``
    is None: the caller draws one for several), values in cells."""
    n = len(labels)
    shown = np.array(matrix, dtype=float)
    if diagonal is not None:
        np.fill_diagonal(shown, np.nan)
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=_with_grey(cmap), vmin=vmin, vmax=vmax)
    if label is not None:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(label)
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=labels)
    if not annotate:
        return
    middle = (vmin + vmax) / 2
    for i, j in itertools.product(range(n), range(n)):
        value = matrix[i][j]
        if i == j and diagonal is not None:
            text, dark = diagonal, False
        elif value is None or not math.isfinite(value):
            text, dark = "n/a", False
        else:
            text, dark = f"{value:.2f}", abs(value - middle) > (vmax - vmin) * 0.3
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _with_grey(name: str):
    """A copy of a colour map that draws missing cells light grey."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#dddddd")


def _cosine_scale(matrices: Sequence[np.ndarray]) -> float:
    """The colour scale's half-width: the largest |cosine| off the diagonal (at least 0.05)."""
    largest = 0.05
    for m in matrices:
        off = np.abs(m[~np.eye(len(m), dtype=bool)])
        off = off[np.isfinite(off)]
        if off.size:
            largest = max(largest, float(off.max()))
    return min(1.0, math.ceil(largest * 20) / 20)


def _subtitle(result: Atlas) -> str:
    return f"{len(result.models)} task vectors against _pretrained_ ({result.pretrained})"


def cosine_png(result: Atlas) -> bytes:
    """``cosine.png``: pairwise cosine similarity of the whole task vectors."""
    matrix = result.groups["all"].cosine
    scale = _cosine_scale([matrix])
    fig = Figure(figsize=(_side(len(result.models)) + 1, _side(len(result.models))))
    ax = fig.add_subplot()
    _heatmap(fig, ax, matrix, result.models, vmin=-scale, vmax=scale, cmap="RdBu_r", label="cosine similarity",
             annotate=len(result.models) <= ANNOTATE_MAX, diagonal="1")
    ax.set_title(f"Task-vector cosine similarity\n{_subtitle(result)}", fontsize=10, wrap=True)
    return _png(fig)


def sign_conflict_png(result: Atlas) -> bytes:
    """``sign_conflict.png``: pairwise sign-conflict rate of the whole task vectors."""
    matrix = result.groups["all"].sign_conflict
    fig = Figure(figsize=(_side(len(result.models)) + 1, _side(len(result.models))))
    ax = fig.add_subplot()
    _heatmap(fig, ax, matrix, result.models, vmin=0.0, vmax=1.0, cmap="magma_r",
             label="fraction of shared nonzero elements with opposite signs",
             annotate=len(result.models) <= ANNOTATE_MAX, diagonal="0")
    ax.set_title(f"Task-vector sign conflicts\n{_subtitle(result)}", fontsize=10, wrap=True)
    return _png(fig)


def cosine_by_block_png(result: Atlas) -> bytes:
    """``cosine_by_block.png``: one cosine heatmap per kind of block, on one colour scale."""
    kinds = [k for k in KINDS if k in result.groups]
    matrices = [result.groups[k].cosine for k in kinds]
    scale = _cosine_scale(matrices)
    columns = min(3, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    side = _side(len(result.models))
    fig = Figure(figsize=(side * columns + 1.5, side * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, kind, matrix in zip(axes, kinds, matrices, strict=False):
        _heatmap(fig, ax, matrix, result.models, vmin=-scale, vmax=scale, cmap="RdBu_r", label=None,
                 annotate=len(result.models) <= ANNOTATE_MAX // 2, diagonal="1")
        group = result.groups[kind]
        ax.set_title(f"{kind}\n{group.tensors} tensors, {group.elements:,} elements", fontsize=9)
    for ax in axes[len(kinds):]:
        ax.set_axis_off()
    # below the heatmaps: beside them, a narrow figure's colour bar would cover the right-hand titles
    fig.colorbar(axes[0].images[0], ax=list(axes), location="bottom", shrink=0.6,
                 aspect=40).set_label("cosine similarity")
    fig.suptitle(f"Task-vector cosine similarity by block\n{_subtitle(result)}", fontsize=10)
    return _png(fig)


_PARTS = ((None, "whole block"), ("attention", "attention"), ("mlp", "MLP"))
_LINES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


def _style(i: int) -> dict[str, object]:
    """Line ``i``'s colour, line style and marker: ten colours, then the next line style, then the
    next marker, so that up to 200 lines all differ."""
    return {"color": f"C{i % 10}", "linestyle": _LINES[(i // 10) % len(_LINES)],
            "marker": _MARKERS[(i // 40) % len(_MARKERS)], "markersize": 3}


def _layer_panels(result: Atlas, ylabel: str, title: str,
                  draw: Callable[[object, str | None, np.ndarray], None]) -> bytes:
    """Three panels over the residual blocks (whole block, attention, MLP), ``draw(ax, part,
    layers)`` plotting each, one legend on the right."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    layers = np.arange(result.layers)
    for ax, (part, name) in zip(axes, _PARTS, strict=True):
        draw(ax, part, layers)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("residual block (layer)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{title}: {_subtitle(result)}", fontsize=10)
    return _png(fig)


def norms_by_layer_png(result: Atlas) -> bytes:
    """``norms_by_layer.png``: each task vector's norm per residual block (whole, attention, MLP)."""
    def draw(ax, part: str | None, layers: np.ndarray) -> None:
        norms = result.norms_by_layer(part)
        for i, name in enumerate(result.models):
            ax.plot(layers, norms[:, i], label=name, **_style(i))

    return _layer_panels(result, "task-vector L2 norm", "Task-vector norm per layer", draw)


def cosine_by_layer_png(result: Atlas) -> bytes:
    """``cosine_by_layer.png``: pairwise cosine per residual block, per pair or as a band."""
    n = len(result.models)
    pairs = list(itertools.combinations(range(n), 2))

    def draw(ax, part: str | None, layers: np.ndarray) -> None:
        names = [f"layer.{layer}" + (f".{part}" if part else "") for layer in layers]
        cos = np.array([result.groups[g].cosine if g in result.groups else np.full((n, n), np.nan) for g in names])
        values = np.array([cos[:, i, j] for i, j in pairs]).reshape(len(pairs), len(layers))
        if len(pairs) <= PAIR_LINES_MAX:
            for k, ((i, j), line) in enumerate(zip(pairs, values, strict=True)):
                ax.plot(layers, line, label=f"{result.models[i]} / {result.models[j]}", **_style(k))
        else:
            ax.fill_between(layers, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.25,
                            label=f"min-max over {len(pairs)} pairs")
            ax.plot(layers, np.nanmean(values, axis=0), marker="o", markersize=3, label="mean over pairs")
        ax.axhline(0.0, color="grey", linewidth=0.8)

    return _layer_panels(result, "cosine similarity", "Pairwise task-vector cosine per layer", draw)


def draw_all(result: Atlas) -> list[tuple[str, bytes]]:
    """Every figure the atlas has data for, as ``(file name, PNG bytes)``.

    Args:
        result: an `Atlas`.

    Returns:
        ``cosine.png`` and ``sign_conflict.png``; ``cosine_by_block.png``; with residual blocks,
        ``norms_by_layer.png`` and (for two models or more) ``cosine_by_layer.png``.
    """
    figures = [("cosine.png", cosine_png(result)), ("sign_conflict.png", sign_conflict_png(result)),
               ("cosine_by_block.png", cosine_by_block_png(result))]
    if result.layers:
        figures.append(("norms_by_layer.png", norms_by_layer_png(result)))
        if len(result.models) > 1:
            figures.append(("cosine_by_layer.png", cosine_by_layer_png(result)))
    return figures
