"""The task-vector atlas: how a pool's fine-tuned encoders moved away from ``_pretrained_``.

`atlas` computes, over the pool's regular models, for the whole task vector and for each block
(`pool.atlas_blocks`): the Gram matrix of the task vectors (each one's norm, the pairwise cosine
similarity) and the pairwise sign-conflict rate (the disagreement TIES resolves). It streams:
every checkpoint is mapped (``mmap=True``), and the tensors are taken one key at a time across all
models, in column blocks of `CHUNK` elements, so that the private memory it needs is about
``N x CHUNK x 20`` bytes (a float64 block, its float32 signs) whatever the model's size; no task vector is ever built whole. Differences
are taken and accumulated in float64. `pool.atlas_report` writes the result (JSON, PNG).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .atlas_blocks import block_order, blocks_of
from .atlas_report import write_atlas
from .cache_layout import CACHEABLE
from .deferred import meta_tensors
from .errors import ConfigError, TaskVectorError
from .keys import key_mismatch, task_vector_pair, to_clip_keys
from .task_vectors import PRETRAINED

if TYPE_CHECKING:  # the pool imports nothing of the atlas
    from .modelpool import OpenCLIPVisionModelPool

__all__ = ["Atlas", "AtlasGroup", "Scratch", "atlas", "CHUNK"]

log = logging.getLogger("pool.atlas")

#: Elements per column block. Sign products are summed in float32 and are exact only while a
#: block's counts stay below 2**24: keep CHUNK at or under that.
CHUNK = 1 << 20

State = Mapping[str, torch.Tensor]


@dataclass
class AtlasGroup:
    """The sums of one block of tensors (or all of them), for N task vectors.

    Attributes:
        name: the block (``all``, ``attention``, ``layer.3``, ``layer.3.mlp``...; `pool.atlas_blocks`).
        gram: ``gram[i, j]`` = the dot product of task vectors i and j over the block (float64).
        conflicts: ``conflicts[i, j]`` = how many elements have nonzero, opposite signs in i and j.
        both_nonzero: ``both_nonzero[i, j]`` = how many elements are nonzero in both i and j.
        elements: the block's elements (per model).
        tensors: the block's tensors.
    """

    name: str
    gram: np.ndarray
    conflicts: np.ndarray
    both_nonzero: np.ndarray
    elements: int = 0
    tensors: int = 0

    @classmethod
    def empty(cls, name: str, n: int) -> AtlasGroup:
        """A group with nothing summed yet, for ``n`` models."""
        return cls(name, np.zeros((n, n)), np.zeros((n, n), dtype=np.int64), np.zeros((n, n), dtype=np.int64))

    def add(self, gram: np.ndarray, conflicts: np.ndarray, both: np.ndarray, elements: int, tensors: int) -> None:
        """Add one column block's sums (`_block_sums`)."""
        self.gram += gram
        self.conflicts += conflicts
        self.both_nonzero += both
        self.elements += elements
        self.tensors += tensors

    def merge(self, other: AtlasGroup) -> None:
        """Add another group's sums (one tensor's, to each block it belongs to)."""
        self.add(other.gram, other.conflicts, other.both_nonzero, other.elements, other.tensors)

    @property
    def norm(self) -> np.ndarray:
        """Each task vector's L2 norm over the block (float64, shape ``(N,)``)."""
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """Pairwise cosine similarity over the block, ``(N, N)``; NaN where a task vector is zero there."""
        norm = self.norm
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(self.gram / np.outer(norm, norm), -1.0, 1.0)  # rounding can reach 1 + 2e-16

    @property
    def sign_conflict(self) -> np.ndarray:
        """Pairwise sign-conflict rate, ``(N, N)``: of the elements nonzero in both task vectors, the
        fraction whose signs differ (NaN where no element is nonzero in both)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.conflicts / self.both_nonzero


@dataclass
class Atlas:
    """A pool's task-vector atlas (`atlas`); `pool.atlas_report.write_atlas` writes it.

    Attributes:
        models: the regular models' names, in the pool's order (the matrices' rows and columns).
        pretrained: what ``_pretrained_`` is (its file, or its entry form).
        sources: each model's file (or entry form), in ``models`` order.
        groups: every block's `AtlasGroup`, ``all`` first (`pool.atlas_blocks.block_order`).
        layers: the residual blocks (``layer.0`` ... ``layer.{layers-1}``).
        seconds: the wall time of the computation.
    """

    models: list[str]
    pretrained: str
    sources: list[str]
    groups: dict[str, AtlasGroup] = field(default_factory=dict)
    layers: int = 0
    seconds: float = 0.0

    def write(self, out_dir: Any, *, plots: bool = True) -> list[Any]:
        """Write ``atlas.json`` and, when matplotlib is installed and ``plots``, the PNG figures
        into ``out_dir`` (`pool.atlas_report.write_atlas`); returns the files written."""
        return write_atlas(self, out_dir, plots=plots)

    def norms_by_layer(self, kind: str | None = None) -> np.ndarray:
        """Each model's task-vector norm per residual block, ``(layers, N)`` (NaN where absent).

        Args:
            kind: None for the whole block, or ``attention`` / ``mlp`` for that part of it.
        """
        suffix = f".{kind}" if kind else ""
        rows = []
        for layer in range(self.layers):
            group = self.groups.get(f"layer.{layer}{suffix}")
            rows.append(group.norm if group is not None else np.full(len(self.models), math.nan))
        return np.array(rows).reshape(self.layers, len(self.models))


class Scratch:
    """The column-block buffers of one atlas run, allocated once and reused for every key: fresh
    ``(N, CHUNK)`` blocks per key would leave freed memory in the allocator's heap and let the
    private memory creep up key after key.

    Args:
        n: the models.
        chunk: elements per column block.
    """

    def __init__(self, n: int, chunk: int) -> None:
        self.block = torch.empty((n, chunk), dtype=torch.float64)  # the task vectors' columns
        self.base = torch.empty(chunk, dtype=torch.float64)  # _pretrained_'s columns
        self.sign = torch.empty((n, chunk), dtype=torch.float32)
        self.nonzero = torch.empty((n, chunk), dtype=torch.float32)
        self._wide: torch.Tensor | None = None  # float64 signs, only for float64 checkpoints

    def signs(self, rows: torch.Tensor, narrow: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The signs of ``rows`` (``-1, 0, 1`` in float32) and their absolute values, in the buffers.

        ``narrow``: the differences are of tensors of 32 bits or fewer, so each is 0 or at least
        float32's smallest subnormal and keeps its sign when narrowed to float32 first (twice as fast
        as taking it in float64).
        """
        m = rows.shape[1]
        sign, nonzero = self.sign[:, :m], self.nonzero[:, :m]
        if narrow:
            sign.copy_(rows)
            torch.sign(sign, out=sign)
        else:
            if self._wide is None:
                self._wide = torch.empty_like(self.block)
            wide = self._wide[:, :m]
            torch.sign(rows, out=wide)
            sign.copy_(wide)
        torch.abs(sign, out=nonzero)
        return sign, nonzero


def _block_sums(rows: torch.Tensor, scratch: Scratch, narrow: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One column block's Gram matrix (float64), sign conflicts and both-nonzero counts.

    ``rows`` is ``(N, m)`` float64 with ``m <= CHUNK``. With ``s`` the signs (-1, 0, 1) and
    ``a = |s|``: ``a @ a.T`` counts the elements nonzero in both, ``s @ s.T`` is agreements minus
    disagreements among them, so disagreements = ``(a @ a.T - s @ s.T) / 2``. Those sums are of
    integers below 2**24 and so exact in float32.
    """
    gram = (rows @ rows.T).numpy()
    sign, nonzero = scratch.signs(rows, narrow)
    both = nonzero @ nonzero.T
    conflicts = (both - sign @ sign.T) / 2
    return gram, conflicts.round().to(torch.int64).numpy(), both.round().to(torch.int64).numpy()


def _state(pool: OpenCLIPVisionModelPool, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """One model's tensors under CLIP keys (mapped from its file where the container allows), and
    how the atlas names its source."""
    entry = pool.entry(name)
    if entry.path is None:  # a Hydra or module entry: the module's own tensors, in their own dtype as a file's
        # not load_model: the pool's dtype and device would cast and move them (a module instance in place)
        module = pool._module(entry, None, None)
        return to_clip_keys(module.state_dict(), source=entry.label), entry.form
    checkpoint = pool.read_entry(entry, mmap=True)
    if checkpoint.container in CACHEABLE and checkpoint.cache_entry is None:  # the containers mmap cannot map
        log.warning("%s: %s is a %s file, which cannot be mapped: its tensors are held in memory for the "
                    "whole atlas (`openclip-pool convert` writes a safetensors copy that maps)",
                    entry.label, entry.path, checkpoint.container)
    # deferred: a transformers folder's fused q/k/v are made key by key, not copied up front
    return to_clip_keys(checkpoint.state_dict, source=str(entry.path), deferred=True), str(entry.path)


#: keys one model may have and another lack: a transformers CLIPVisionModel has no projection
#: (the text-side leftovers are `pool.keys.task_vector_pair`'s)
_ONE_SIDED = ("visual.proj",)


def _shared_keys(names: list[str], states: list[State], base: State) -> list[str]:
    """The floating-point keys the atlas covers: ``_pretrained_``'s, less the keys some models lack
    by their form (text-side leftovers, `pool.keys.task_vector_pair`; the projection a vision-only
    transformers model has not, `_ONE_SIDED`); every pair must line up on the rest. Shapes are
    compared on meta tensors: nothing deferred is made."""
    base_meta = meta_tensors(base)
    keys = [k for k, v in base_meta.items() if v.is_floating_point()]
    for name, state in zip(names, states, strict=True):
        finetuned, pretrained = task_vector_pair(meta_tensors(state), base_meta)
        for key in _ONE_SIDED:
            if (key in finetuned) != (key in pretrained):
                log.info("models.%s: %s is on one side only (a vision-only model has no projection): the "
                         "atlas leaves it out", name, key)
                finetuned.pop(key, None)
                pretrained.pop(key, None)
        problem = key_mismatch(finetuned, pretrained, PRETRAINED)
        if problem:
            raise TaskVectorError(f"models.{name}: no task vector against {PRETRAINED}: {problem}")
        keys = [k for k in keys if k in finetuned]
    return keys


def _check_finite(gram: np.ndarray, key: str, names: list[str], pretrained: str) -> None:
    """Refuse a tensor whose task vectors hold NaN or infinity (the sums would be NaN, and NaN has
    no sign): name the models, the tensor and what to do."""
    bad = [name for name, value in zip(names, np.diag(gram), strict=True) if not math.isfinite(value)]
    if bad:
        raise TaskVectorError(
            f"{key}: the task vector of {', '.join('models.' + b for b in bad)} holds NaN or infinite values "
            f"(that model's {key} or {PRETRAINED}'s, {pretrained}, has non-finite weights): its norm, cosines and "
            "sign conflicts would be undefined. Check that checkpoint (`openclip-pool verify` runs a forward "
            "pass) or leave it out of the pool.")


def _progress(enabled: bool | None, total: int) -> tqdm:
    """A tqdm bar over the tensors on stderr (default: only when stderr is a terminal)."""
    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc="atlas", unit="tensor", file=sys.stderr, disable=not show, leave=False)


def atlas(pool: OpenCLIPVisionModelPool | Any, *, progress: bool | None = None, chunk: int = CHUNK) -> Atlas:
    """The task-vector atlas of a pool: per block, the Gram matrix of the task vectors (norms,
    pairwise cosine similarity) and the pairwise sign-conflict rate, streamed tensor by tensor.

    Args:
        pool: an `OpenCLIPVisionModelPool` with ``_pretrained_`` and at least one regular model,
            or anything `OpenCLIPVisionModelPool.from_config` reads (a YAML path, a mapping).
        progress: a tqdm bar over the tensors on stderr; None: only when stderr is a terminal.
        chunk: elements per column block (at most `CHUNK`; smaller bounds memory further).

    Returns:
        The `Atlas`.

    Raises:
        ConfigError: the pool has no ``_pretrained_`` or no regular model.
        TaskVectorError: a model does not line up with ``_pretrained_`` key for key.
        CheckpointError: a file cannot be read (the message names the entry).

    Example:
        >>> result = atlas("pool.yaml")  # doctest: +SKIP
        >>> result.groups["all"].cosine  # doctest: +SKIP
    """
    if not 0 < chunk <= CHUNK:
        raise ConfigError(f"atlas: chunk={chunk}; it must be between 1 and {CHUNK} elements")
    if not hasattr(pool, "model_names"):
        from .modelpool import OpenCLIPVisionModelPool

        pool = OpenCLIPVisionModelPool.from_config(pool)
    names = list(pool.model_names)
    if not pool.has_pretrained or not names:
        raise ConfigError(f"atlas: the pool needs {PRETRAINED} and at least one other model; it has "
                          f"{pool.all_model_names or 'no models'}. Task vectors are taken against {PRETRAINED}.")
    start = time.perf_counter()
    base, pretrained = _state(pool, PRETRAINED)
    loaded = [_state(pool, name) for name in names]
    states = [state for state, _ in loaded]
    keys = _shared_keys(names, states, base)
    result = Atlas(names, pretrained, [source for _, source in loaded])
    groups: dict[str, AtlasGroup] = {}
    scratch = Scratch(len(names), chunk)
    with torch.no_grad(), _progress(progress, len(keys)) as bar:
        for key in keys:
            gram = _add_tensor(groups, key, base[key], [state[key] for state in states], chunk, scratch)
            _check_finite(gram, key, names, pretrained)
            bar.update(1)
    result.groups = {name: groups[name] for name in block_order(groups)}
    result.layers = sum(1 for name in groups if name.startswith("layer.") and name.count(".") == 1)
    result.seconds = time.perf_counter() - start
    log.info("atlas of %d models over %d tensors (%s elements) in %.2f s", len(names), len(keys),
             f"{groups['all'].elements:,}" if groups else 0, result.seconds)
    return result


def _add_tensor(groups: dict[str, AtlasGroup], key: str, base: torch.Tensor, tensors: list[torch.Tensor],
                chunk: int, scratch: Scratch | None = None) -> np.ndarray:
    """Add one key's task vectors (``tensors[i] - base``) to every block the key belongs to.

    Returns:
        The key's Gram matrix (a non-finite diagonal: a NaN or infinite weight).
    """
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    numel = flat_base.numel()
    n = len(tensors)
    scratch = scratch if scratch is not None else Scratch(n, chunk)
    sums = AtlasGroup.empty(key, n)
    narrow = all(t.element_size() <= 4 for t in (base, *tensors))
    for lo in range(0, numel, chunk):
        hi = min(lo + chunk, numel)
        rows, p = scratch.block[:, :hi - lo], scratch.base[:hi - lo]
        p.copy_(flat_base[lo:hi])
        for i, flat in enumerate(flats):
            rows[i].copy_(flat[lo:hi])  # widened to float64 (exact), then the subtraction in float64
            rows[i].sub_(p)
        sums.add(*_block_sums(rows, scratch, narrow), elements=hi - lo, tensors=0)
    sums.tensors = 1
    for name in blocks_of(key):
        groups.setdefault(name, AtlasGroup.empty(name, n)).merge(sums)
    return sums.gram
