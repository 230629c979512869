"""The checks of one pool entry, as ``python -m pool verify`` makes them (`VerifyRun`).

A model is loaded, its weights read (memory-mapped pages touched, so a cold file's reading is
timed here), a forward pass made on a small random batch and its task vector against
``_pretrained_`` checked (`pool.task_vectors`); a head is loaded and fed the features of the
encoder of the same name. Each step is timed, and a failure is recorded on the entry's
`pool.verify_report.EntryResult`, never raised. `pool.verify` runs these over a whole pool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .arch import VisionArch, known_architectures, name_for_arch
from .checkpoint import Checkpoint, read_checkpoint, sniff_container
from .configsafety import redact_strings
from .entries import Entry
from .errors import PoolError, TaskVectorError
from .integrity import IntegrityResult, check_integrity
from .lock import PoolLock, tensors_digest
from .modeling import check_head_fits
from .modelpool import OpenCLIPVisionModelPool
from .task_vectors import PRETRAINED, task_vector_norm
from .verify_report import Architecture, EntryResult, ForwardCheck, HeadCheck, Integrity, TaskVector

_T = TypeVar("_T")

__all__ = ["arch_label", "read_weights", "task_vector", "VerifyRun"]

log = logging.getLogger("pool.verify")  # verify's logger, as before these checks had a module of their own

#: The forward pass's batch size.
_BATCH = 2
#: One byte of every this many is touched to read a weight's pages.
_PAGE = 4096


def arch_label(arch: VisionArch | None) -> str:
    """``ViT-B-32`` when open_clip has a config with these shapes, else a compact description.

    Args:
        arch: the architecture, or None when it is not known.

    Returns:
        The open_clip name, ``ViT p<patch> w<width> L<layers> <size>px`` for a custom ViT, or
        ``"?"`` for None.

    Example:
        >>> from pool.arch import arch_for_name
        >>> from pool.synth import TINY
        >>> arch_label(arch_for_name("ViT-B-16")), arch_label(TINY), arch_label(None)
        ('ViT-B-16', 'ViT p8 w128 L2 32px', '?')
    """
    if arch is None:
        return "?"
    name = name_for_arch(arch)
    if name:
        return name
    return f"ViT p{arch.patch_size} w{arch.width} L{arch.layers} {arch.image_size}px"


def read_weights(module: torch.nn.Module) -> int:
    """Touch one byte of every page of every weight, so that memory-mapped weights are read from
    the file now (and timed as such) rather than inside the first forward. On an accelerator the
    weights are already in its memory: waits for the copies.

    Args:
        module: the loaded model or head.

    Returns:
        The bytes covered.
    """
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
        if tensor.device.type == "cpu":
            flat = torch.empty(0, dtype=torch.uint8).set_(storage)
            flat[::_PAGE].sum()
    if any(t.device.type == "cuda" for t in module.parameters()):
        torch.cuda.synchronize()
    return total


def task_vector(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> TaskVector:
    """The task vector's report: the L2 norm of ``state - base`` over every float tensor
    (`pool.task_vectors.task_vector_norm`), after checking both have the same keys and shapes.

    Args:
        state: the fine-tuned encoder's state dict.
        base: ``_pretrained_``'s state dict.

    Returns:
        The `pool.verify_report.TaskVector`.

    Raises:
        TaskVectorError: the keys or shapes differ, or the norm is not finite.
    """
    norm, count = task_vector_norm(state, base, _not_a_copy)
    if not math.isfinite(norm):
        raise TaskVectorError(f"task vector against {PRETRAINED}: its norm is {norm} (non-finite weights)")
    return TaskVector(against=PRETRAINED, tensors=count, l2_norm=norm)


def _not_a_copy(problem: str) -> TaskVectorError:
    return TaskVectorError(f"task vector against {PRETRAINED}: {problem}; this model is not a "
                           f"fine-tuned copy of {PRETRAINED}.")


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _param_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where the module's weights are (an entry's or the pool's own ``device`` may place them)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else default


def _arch_text(result: EntryResult) -> str | None:
    """What a lock records as an entry's architecture: a model's (and its activation), a head's size."""
    arch, head = result.architecture, result.head
    if arch is not None and arch.inferred:
        return f"{arch.inferred}{', QuickGELU' if arch.quick_gelu else ''}"
    if head is not None:
        return f"head {head.classes} classes x {head.input_dim}, normalize={head.normalize}"
    return None


def _image_size(encoder: torch.nn.Module) -> int | None:
    arch = getattr(encoder, "arch", None)
    if arch is not None:
        return int(arch.image_size)
    visual = getattr(getattr(encoder, "model", None), "visual", None)
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if isinstance(size, int) else None


class VerifyRun:
    """One verify run: the pool, its options, and the pretrained state dict kept for task vectors.

    Args:
        pool: the pool whose entries are checked.
        device: where to load and run (None: the CPU).
        integrity: check each file's checksums / header before loading it.
        debug: keep each failure's traceback in its result.
        on_result: called with each complete `EntryResult` (None: nothing is called).
        lock: check each entry against this lock file (``verify --locked``), or None.
        records: when a dict, each entry's lock record is put there by label (``python -m pool lock``).
        lock_dir: the folder a record's ``path`` is relative to (default: ``lock``'s folder).
    """

    def __init__(self, pool: OpenCLIPVisionModelPool, *, device: str | None, integrity: bool, debug: bool,
                 on_result: Callable[[EntryResult], None] | None, lock: PoolLock | None = None,
                 records: dict[str, dict[str, Any]] | None = None, lock_dir: Path | None = None) -> None:
        self.pool, self.device, self.integrity, self.debug = pool, device, integrity, debug
        self.lock, self.records = lock, records
        self.locking = lock is not None or records is not None
        self.lock_dir = lock_dir or (lock.path.parent if lock is not None else None)
        self._files: dict[str, IntegrityResult] = {}
        self._seen_globals: dict[str, dict[str, str]] = {}  # what each load's own read listed
        self.dev = torch.device(device) if device else torch.device("cpu")
        self.on_result = on_result or (lambda _result: None)
        self.base_state: dict[str, torch.Tensor] | None = None
        self.base_tried = False  # _pretrained_ loaded (or failed) already, as an entry or for task vectors
        known_architectures()  # open_clip's import and configs, once per process: no entry's load time

    def step(self, result: EntryResult, stage: str, fn: Callable[[], _T], timing: str | None = None) -> _T | None:
        """Run one check of an entry; a failure is recorded on the entry (and later steps skipped).

        Args:
            result: the entry's result, where a failure and the timing go.
            stage: the step's name in the report (``load``, ``forward``, ...).
            fn: the check.
            timing: the `pool.verify_report.Timings` field its seconds go to (None: not timed).

        Returns:
            What ``fn`` returned; None when it failed or an earlier step had.
        """
        if not result.ok:
            return None
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # every failure is reported, the run goes on
            if timing == "integrity_s":  # the pass's cost shows on a file it refused too
                result.timings.integrity_s = time.perf_counter() - start
            result.failed(exc, stage=stage, debug=self.debug)
            log.debug("%s failed at %s", result.label, stage, exc_info=True)
            return None
        if timing:
            setattr(result.timings, timing, time.perf_counter() - start)
        return value

    def _file_checks(self, entry: Entry, result: EntryResult) -> None:
        def file() -> None:
            if entry.path is not None:
                result.file = str(entry.path.absolute())
                result.container = sniff_container(entry.path)

        self.step(result, "file", file)
        if self.integrity or self.locking:  # one pass: the CRC32s and, when locking, the sha256
            self.step(result, "integrity" if self.integrity else "lock", lambda: self._integrity(entry, result),
                      "integrity_s")

    def _integrity(self, entry: Entry, result: EntryResult) -> None:
        if entry.path is None:
            if self.integrity:
                result.integrity = Integrity(False, f"a {entry.form} entry has no file to check")
            return
        res = check_integrity(entry.path, digest=self.locking, crc=self.integrity)
        if self.integrity:
            result.integrity = Integrity(res.checked, res.detail)
        if self.locking:
            self._files[result.label] = res

    def _lock(self, entry: Entry, result: EntryResult, module: torch.nn.Module) -> None:
        """The entry's lock record (`pool.lock`): kept for ``lock``, compared for ``--locked``."""
        file = self._files.pop(result.label, None)
        record = {"path": self._path_text(entry), "form": entry.form, "container": result.container,
                  "size": file.size if file else None, "sha256": file.sha256 if file else None,
                  "architecture": _arch_text(result), "globals": self._globals(entry),
                  "tensors": tensors_digest(module)}
        if self.records is not None:
            self.records[result.label] = record
        if self.lock is not None:
            self.lock.check(result.label, record)

    def _path_text(self, entry: Entry) -> str | None:
        """The entry's file as the lock records it: relative to the lock's folder when under it; a
        hub entry's ``hf://org/name@<commit>`` (the same on every machine; a moved ref is a drift)."""
        if entry.path is None:
            return None
        if entry.hub_source is not None:
            return entry.hub_source
        path = entry.path.absolute()
        if self.lock_dir is not None and path.is_relative_to(self.lock_dir):
            return path.relative_to(self.lock_dir).as_posix()
        return self.pool.redact(os.fspath(path))

    def _loading(self) -> contextlib.AbstractContextManager[None]:
        """Around a load when locking: the globals its read lists are kept (`_note_globals`)."""
        return self.pool.observing_reads(self._note_globals) if self.locking else contextlib.nullcontext()

    def _note_globals(self, entry: Entry, ckpt: Checkpoint) -> None:
        """Keep the globals a load's read of the file itself listed (not a conversion cache's copy)."""
        if ckpt.cache_entry is None:
            self._seen_globals[entry.label] = {str(g): g.verdict for g in ckpt.globals}

    def _globals(self, entry: Entry) -> dict[str, str]:
        """Every global the entry's file names, with the allowlist's verdict: as the load's own read
        listed them, else (a load served by the cache) from the file itself, nothing loaded."""
        if entry.path is None:
            return {}
        seen = self._seen_globals.pop(entry.label, None)
        if seen is not None:
            return seen
        ckpt = read_checkpoint(entry.path, map_location="meta", cache_dir=False,
                               allow_globals=self.pool.allow_globals)
        return {str(g): g.verdict for g in ckpt.globals}

    def _finish(self, result: EntryResult) -> EntryResult:
        """The one place a result's text is made safe to report: every value the config took from
        the environment is shown as its ``${oc.env:NAME}`` instead (text, stderr lines, JSON, JUnit
        and pytest output all print results)."""
        redact_strings(result, self.pool.redact)
        return result

    def model(self, entry: Entry) -> tuple[EntryResult, torch.nn.Module | None, torch.Tensor | None]:
        """Check a model: its file, load, weights, forward pass and task vector.

        Args:
            entry: the model's entry.

        Returns:
            ``(result, encoder, features)``: the encoder and its features on the random batch when
            it passed (for its head), else None.
        """
        res = EntryResult(entry.name, "models", entry.form)
        if entry.model_name:
            res.architecture = Architecture(configured=entry.model_name)
        self._file_checks(entry, res)
        with self._loading():
            encoder = self.step(res, "load", lambda: self.pool.load_model(entry.name, device=self.device), "load_s")
        if encoder is not None:
            arch = getattr(encoder, "arch", None)
            res.architecture = Architecture(
                inferred=arch_label(arch) if arch is not None else None,
                description=arch.describe() if arch is not None else None,
                configured=entry.model_name, matches_config=True if entry.model_name else None,
                quick_gelu=getattr(arch, "quick_gelu", None))
            res.params = sum(p.numel() for p in encoder.parameters())
            self.step(res, "weights", lambda: read_weights(encoder), "weights_s")
            if self.locking:
                self.step(res, "lock", lambda: self._lock(entry, res, encoder), "lock_s")
        features = self.step(res, "forward", lambda: self._forward(encoder, res), "forward_s")
        if entry.name == PRETRAINED:
            self.base_tried = True
        if encoder is not None and res.ok:
            self._task_vector(entry, encoder, res)
        return self._finish(res), (encoder if res.ok else None), features

    def _task_vector(self, entry: Entry, encoder: torch.nn.Module, res: EntryResult) -> None:
        """Keep ``_pretrained_``'s state dict, or check a fine-tuned model's task vector against it."""
        if entry.name == PRETRAINED:
            self.base_state = {k: v.detach() for k, v in encoder.state_dict().items()}
        elif (base := self.base()) is not None:
            res.task_vector = self.step(res, "task vector", lambda: task_vector(encoder.state_dict(), base),
                                        "task_vector_s")
        elif self.pool.has_pretrained:
            res.task_vector = TaskVector(skipped=f"{PRETRAINED} did not pass its checks")
        else:
            res.task_vector = TaskVector(skipped=f"the pool has no {PRETRAINED}")

    def base(self) -> dict[str, torch.Tensor] | None:
        """``_pretrained_``'s state dict for task vectors.

        When this process did not check it as an entry (another shard did), it is loaded and
        checked here once, unreported (its own entry reports it), so that every shard decides as
        one process would.

        Returns:
            The state dict; None if ``_pretrained_`` does not pass or the pool has none.
        """
        if self.base_state is None and not self.base_tried and self.pool.has_pretrained:
            self.base_tried = True
            scratch = EntryResult(PRETRAINED, "models", "")
            encoder = self.step(scratch, "load", lambda: self.pool.load_model(PRETRAINED, device=self.device))
            self.step(scratch, "forward", lambda: self._forward(encoder, scratch))
            if encoder is not None and scratch.ok:
                self.base_state = {k: v.detach() for k, v in encoder.state_dict().items()}
            else:
                log.debug("%s did not pass its checks: %s", PRETRAINED, scratch.error)
        return self.base_state

    def _forward(self, encoder: torch.nn.Module | None, res: EntryResult) -> torch.Tensor | None:
        if encoder is None:
            return None
        size = _image_size(encoder)
        if size is None:
            res.forward = ForwardCheck(skipped="not an ImageEncoder: image size unknown")
            return None
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(_BATCH, 3, size, size, generator=generator)
        images = images.to(device=_param_device(encoder, self.dev), dtype=_param_dtype(encoder))
        encoder.eval()
        with torch.no_grad():
            out = encoder(images)
        embed = getattr(encoder, "embed_dim", None)
        res.forward = ForwardCheck(input=[_BATCH, 3, size, size], output=list(out.shape),
                                   finite=bool(torch.isfinite(out).all()))
        if out.dim() != 2 or out.shape[0] != _BATCH or (embed is not None and out.shape[1] != embed):
            raise PoolError(f"forward pass on a {_BATCH}x3x{size}x{size} batch gave shape {tuple(out.shape)}, "
                            f"expected ({_BATCH}, {embed})")
        if not res.forward.finite:
            raise PoolError(f"forward pass on a random {_BATCH}x3x{size}x{size} batch gave non-finite "
                            "features (NaN or inf): the weights are damaged")
        return out

    def head(self, entry: Entry, encoder: torch.nn.Module | None, features: torch.Tensor | None,
             paired_ok: bool | None) -> EntryResult:
        """Check a head: its file, load, pairing with the encoder of the same name, and logits.

        Args:
            entry: the head's entry.
            encoder: the encoder of the same name when it passed, else None (the head is checked alone).
            features: that encoder's features on the random batch (None: random features).
            paired_ok: whether the model of the same name passed; None when there is none.

        Returns:
            The head's result.
        """
        res = EntryResult(entry.name, "classification_heads", entry.form)
        self._file_checks(entry, res)
        with self._loading():
            head = self.step(res, "load", lambda: self.pool.load_classification_head(entry.name, device=self.device),
                             "load_s")
        if head is None:
            return self._finish(res)
        res.params = sum(p.numel() for p in head.parameters())
        normalize = getattr(head, "normalize", None)
        info = res.head = HeadCheck(
            classes=getattr(head, "out_features", None), input_dim=getattr(head, "in_features", None),
            normalize=bool(normalize) if normalize is not None else None,
            paired_with=f"models.{entry.name}" if paired_ok is not None else None)
        if self.locking:
            self.step(res, "lock", lambda: self._lock(entry, res, head), "lock_s")
        if encoder is not None:
            self.step(res, "pairing", lambda: check_head_fits(encoder, head, entry.name))
            info.encoder_embed_dim = getattr(encoder, "embed_dim", None)
        elif paired_ok is False:
            info.note = f"models.{entry.name} failed, so this head was checked alone"

        def logits() -> None:
            feats = features
            if feats is None or not res.ok:
                feats = torch.randn(_BATCH, info.input_dim or 1, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                out = head(feats.to(device=_param_device(head, self.dev), dtype=_param_dtype(head)))
            info.logits = list(out.shape)
            if not bool(torch.isfinite(out).all()):
                raise PoolError("logits are not finite (NaN or inf): the head's weights are damaged")

        self.step(res, "logits", logits, "forward_s")
        return self._finish(res)
