"""Verify a pool: load every model and head once, check them, and say which fail and why.

`verify_pool` is what ``python -m pool verify`` runs. For each model (``_pretrained_`` first) it
records the form, container, file, architecture (read from the weights; the configured
``model_name`` is checked against it), parameter count, a forward pass on a small random batch
and the time of each step: the load, reading every weight (memory-mapped pages are touched, so a
cold file's reading is timed here), the forward and the task vector. The head of the same name is
loaded next and fed that encoder's features; each fine-tuned model's task vector against
``_pretrained_`` is checked (same keys and shapes) and its L2 norm reported. Unpaired heads are
checked alone. One encoder is in memory at a time (plus the pretrained state dict, kept for the
task vectors). A failing entry never stops the others. The report's types are in
`pool.verify_report`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from .arch import VisionArch, known_architectures, name_for_arch
from .checkpoint import sniff_container
from .configsafety import redact_strings
from .entries import Entry
from .errors import ConfigError, PoolError, TaskVectorError
from .integrity import check_integrity
from .keys import key_mismatch, task_vector_pair
from .modeling import check_head_fits
from .modelpool import PRETRAINED, OpenCLIPVisionModelPool
from .sharding import shard_units
from .verify_report import (
    Architecture,
    EntryResult,
    ForwardCheck,
    HeadCheck,
    Integrity,
    TaskVector,
    VerifyReport,
    versions,
)

T = TypeVar("T")

__all__ = ["EntryResult", "VerifyReport", "verify_pool", "prepare_pool", "versions", "arch_label",
           "TaskVectorError", "shard_entries", "verify_order", "EntryChecker"]

log = logging.getLogger(__name__)

BATCH = 2
PAGE = 4096


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


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def prepare_pool(config: str | Path, *, instantiate: bool = True
                 ) -> tuple[OpenCLIPVisionModelPool, list[Entry], list[Entry]]:
    """Read a pool config and resolve every entry, raising one ConfigError listing all problems.

    The problems are the ones the user fixes in the YAML: unknown keys, unknown model_name, no
    entries. Nothing is loaded yet.

    Args:
        config: the pool YAML file (anything `OpenCLIPVisionModelPool.from_config` reads).
        instantiate: False for the data-only mode (``verify --no-instantiate``): a config with
            Hydra keys or resolver calls is refused before anything is resolved.

    Returns:
        ``(pool, models, heads)``: the pool and its model and head entries, ``_pretrained_``
        first among the models; what `verify_pool` takes.

    Raises:
        ConfigError: the config cannot be read, has unknown or malformed entries or unknown
            model names (all listed in one message), or has no models and no heads; in the
            data-only mode, it has a Hydra key or a resolver call.

    Example:
        >>> from pool.verify import prepare_pool
        >>> pool, models, heads = prepare_pool("pool.yaml")  # doctest: +SKIP
        >>> [entry.label for entry in models]  # doctest: +SKIP
        ['models._pretrained_', 'models.cars']
    """
    from .arch import arch_for_name

    modelpool_log = logging.getLogger("pool.modelpool")
    quiet = _DropMessage("the pool has no models")  # verify reports emptiness itself, as an error
    modelpool_log.addFilter(quiet)
    try:
        pool = OpenCLIPVisionModelPool.from_config(config, instantiate=instantiate)
    finally:
        modelpool_log.removeFilter(quiet)
    problems: list[str] = []
    models: list[Entry] = []
    heads: list[Entry] = []
    for section, names, out in (("models", pool.all_model_names, models),
                                ("classification_heads", pool.classification_head_names, heads)):
        for name in names:
            try:
                entry = pool.entry(name, section)
                if entry.model_name:
                    arch_for_name(entry.model_name)
                out.append(entry)
            except ConfigError as exc:
                problems.append(str(exc) if str(exc).startswith(section) else f"{section}.{name}: {exc}")
    if problems:
        raise ConfigError(pool.redact(f"{config}: " + " ".join(problems)))
    if not models and not heads:
        raise ConfigError(f"{config}: the config has no models and no classification_heads; "
                          "nothing to verify.")
    models.sort(key=lambda e: e.name != PRETRAINED)  # _pretrained_ first: task vectors need it
    return pool, models, heads


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _param_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where the module's weights are (an entry's or the pool's own ``device`` may place them)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else default


def _image_size(encoder: torch.nn.Module) -> int | None:
    arch = getattr(encoder, "arch", None)
    if arch is not None:
        return int(arch.image_size)
    visual = getattr(getattr(encoder, "model", None), "visual", None)
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if isinstance(size, int) else None


def read_weights(module: torch.nn.Module) -> int:
    """Touch one byte of every page of every weight, so that memory-mapped weights are read from
    the file now (and timed as such) rather than inside the first forward. Returns the bytes
    covered. On an accelerator the weights are already in its memory: waits for the copies."""
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
            flat[::PAGE].sum()
    if any(t.device.type == "cuda" for t in module.parameters()):
        torch.cuda.synchronize()
    return total


def task_vector(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> TaskVector:
    """The L2 norm of ``state - base`` over every float tensor (each tensor's norm accumulated in
    float64), after checking both have the same keys and shapes."""
    state, base = task_vector_pair(state, base)
    problem = key_mismatch(state, base, PRETRAINED)
    if problem:
        raise TaskVectorError(f"task vector against {PRETRAINED}: {problem}; this model is not a "
                              f"fine-tuned copy of {PRETRAINED}.")
    total = 0.0
    count = 0
    with torch.no_grad():
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            diff = v - base[k].to(device=v.device, dtype=v.dtype)
            total += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            count += 1
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise TaskVectorError(f"task vector against {PRETRAINED}: its norm is {norm} (non-finite weights)")
    return TaskVector(against=PRETRAINED, tensors=count, l2_norm=norm)


class _Run:
    """One verify run: the pool, options, and the pretrained state dict kept for task vectors."""

    def __init__(self, pool: OpenCLIPVisionModelPool, *, device: str | None, integrity: bool, debug: bool,
                 on_result: Callable[[EntryResult], None] | None) -> None:
        self.pool, self.device, self.integrity, self.debug = pool, device, integrity, debug
        self.dev = torch.device(device) if device else torch.device("cpu")
        self.on_result = on_result or (lambda _result: None)
        self.base_state: dict[str, torch.Tensor] | None = None
        self.base_tried = False  # _pretrained_ loaded (or failed) already, as an entry or for task vectors
        known_architectures()  # open_clip's import and configs, once per process: no entry's load time

    def step(self, result: EntryResult, stage: str, fn: Callable[[], T], timing: str | None = None) -> T | None:
        """Run one check of an entry; a failure is recorded on the entry (and later steps skipped)."""
        if not result.ok:
            return None
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # every failure is reported, the run goes on
            result.failed(exc, stage=stage, debug=self.debug)
            log.debug("%s failed at %s", result.label, stage, exc_info=True)
            return None
        if timing:
            setattr(result.timings, timing, time.perf_counter() - start)
        return value

    def file_checks(self, entry: Entry, result: EntryResult) -> None:
        def file() -> None:
            if entry.path is not None:
                result.file = str(entry.path.absolute())
                result.container = sniff_container(entry.path)

        self.step(result, "file", file)
        if self.integrity:
            self.step(result, "integrity", lambda: self._integrity(entry, result))

    @staticmethod
    def _integrity(entry: Entry, result: EntryResult) -> None:
        if entry.path is None:
            result.integrity = Integrity(False, f"a {entry.form} entry has no file to check")
            return
        res = check_integrity(entry.path)
        result.integrity = Integrity(res.checked, res.detail)

    def finish(self, result: EntryResult) -> EntryResult:
        """The one place a result's text is made safe to report: every value the config took from
        the environment is shown as its ``${oc.env:NAME}`` instead (text, stderr lines, JSON, JUnit
        and pytest output all print results)."""
        redact_strings(result, self.pool.redact)
        return result

    def model(self, entry: Entry) -> tuple[EntryResult, torch.nn.Module | None, torch.Tensor | None]:
        res = EntryResult(entry.name, "models", entry.form)
        if entry.model_name:
            res.architecture = Architecture(configured=entry.model_name)
        self.file_checks(entry, res)
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
        features = self.step(res, "forward", lambda: self._forward(encoder, res), "forward_s")
        if entry.name == PRETRAINED:
            self.base_tried = True
        if encoder is not None and res.ok:
            if entry.name == PRETRAINED:
                self.base_state = {k: v.detach() for k, v in encoder.state_dict().items()}
            elif (base := self.base()) is not None:
                res.task_vector = self.step(res, "task vector", lambda: task_vector(encoder.state_dict(), base),
                                            "task_vector_s")
            else:
                res.task_vector = TaskVector(skipped=f"{PRETRAINED} did not pass its checks" if self.pool.has_pretrained
                                             else f"the pool has no {PRETRAINED}")
        return self.finish(res), (encoder if res.ok else None), features

    def base(self) -> dict[str, torch.Tensor] | None:
        """``_pretrained_``'s state dict for task vectors. When this process did not check it as an
        entry (another shard did), it is loaded and checked here once, unreported (its own entry
        reports it), so that every shard decides as one process would; None if it does not pass."""
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
        images = torch.randn(BATCH, 3, size, size, generator=generator).to(device=_param_device(encoder, self.dev),
                                                                          dtype=_param_dtype(encoder))
        encoder.eval()
        with torch.no_grad():
            out = encoder(images)
        embed = getattr(encoder, "embed_dim", None)
        res.forward = ForwardCheck(input=[BATCH, 3, size, size], output=list(out.shape),
                                   finite=bool(torch.isfinite(out).all()))
        if out.dim() != 2 or out.shape[0] != BATCH or (embed is not None and out.shape[1] != embed):
            raise PoolError(f"forward pass on a {BATCH}x3x{size}x{size} batch gave shape {tuple(out.shape)}, "
                            f"expected ({BATCH}, {embed})")
        if not res.forward.finite:
            raise PoolError(f"forward pass on a random {BATCH}x3x{size}x{size} batch gave non-finite "
                            "features (NaN or inf): the weights are damaged")
        return out

    def head(self, entry: Entry, encoder: torch.nn.Module | None, features: torch.Tensor | None,
             paired_ok: bool | None) -> EntryResult:
        res = EntryResult(entry.name, "classification_heads", entry.form)
        self.file_checks(entry, res)
        head = self.step(res, "load", lambda: self.pool.load_classification_head(entry.name, device=self.device),
                         "load_s")
        if head is None:
            return self.finish(res)
        res.params = sum(p.numel() for p in head.parameters())
        normalize = getattr(head, "normalize", None)
        info = res.head = HeadCheck(
            classes=getattr(head, "out_features", None), input_dim=getattr(head, "in_features", None),
            normalize=bool(normalize) if normalize is not None else None,
            paired_with=f"models.{entry.name}" if paired_ok is not None else None)
        if encoder is not None:
            self.step(res, "pairing", lambda: check_head_fits(encoder, head, entry.name))
            info.encoder_embed_dim = getattr(encoder, "embed_dim", None)
        elif paired_ok is False:
            info.note = f"models.{entry.name} failed, so this head was checked alone"

        def logits() -> None:
            feats = features
            if feats is None or not res.ok:
                feats = torch.randn(BATCH, info.input_dim or 1, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                out = head(feats.to(device=_param_device(head, self.dev), dtype=_param_dtype(head)))
            info.logits = list(out.shape)
            if not bool(torch.isfinite(out).all()):
                raise PoolError("logits are not finite (NaN or inf): the head's weights are damaged")

        self.step(res, "logits", logits, "forward_s")
        return self.finish(res)


def verify_pool(pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                config_label: str, device: str | None = None, integrity: bool = False, debug: bool = False,
                progress: Callable[[str], None] | None = None,
                on_result: Callable[[EntryResult], None] | None = None) -> VerifyReport:
    """Check every entry of a prepared pool (`prepare_pool`) and return the report.

    Args:
        pool, models, heads: what `prepare_pool` returned (``_pretrained_`` first).
        config_label: how the report names the config.
        device: where to load and run (default CPU).
        integrity: check each file's checksums / header before loading it.
        debug: keep each failure's traceback in the report.
        progress: called with an entry's label when its check starts.
        on_result: called with each `EntryResult` as soon as it is complete (to stream it).

    Returns:
        The `VerifyReport`; it never raises for an entry's failure, which is recorded instead.

    Example:
        >>> import tempfile
        >>> from pool.synth import write_tree
        >>> from pool.verify import prepare_pool, verify_pool
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     pool, models, heads = prepare_pool(write_tree(tmp, tasks=["Cars"]).config)
        ...     report = verify_pool(pool, models, heads, config_label="a tiny tree")
        >>> for entry in report.entries:
        ...     print(entry.label, entry.ok)
        models._pretrained_ True
        models.cars True
        classification_heads.cars True
        models.cars_state_dict True
        models.cars_safetensors True
    """
    start = time.perf_counter()
    run = _Run(pool, device=device, integrity=integrity, debug=debug, on_result=on_result)
    tick = progress or (lambda _label: None)
    head_by_name = {e.name: e for e in heads}
    results: list[EntryResult] = []

    def done(result: EntryResult) -> None:
        results.append(result)
        run.on_result(result)

    for entry in models:
        tick(entry.label)
        res, encoder, features = run.model(entry)
        head_entry = head_by_name.pop(entry.name, None)
        if head_entry is not None:
            res.paired_head = head_entry.label
        done(res)
        if head_entry is not None:
            tick(head_entry.label)
            done(run.head(head_entry, encoder, features, paired_ok=res.ok))
        del encoder, features
    for entry in head_by_name.values():
        tick(entry.label)
        done(run.head(entry, None, None, paired_ok=None))
    return VerifyReport(config_label, str(run.dev), integrity, results, time.perf_counter() - start,
                        versions=versions(), allowed_globals=sorted(pool.allow_globals))


def verify_order(models: list[Entry], heads: list[Entry]) -> list[str]:
    """Entry labels in the order `verify_pool` checks them: each model followed by its head of the
    same name, then the heads with no model.

    Args:
        models, heads: the entries, as `prepare_pool` returns them.

    Returns:
        The labels (``models.<name>``, ``classification_heads.<name>``).
    """
    head_names = {h.name for h in heads}
    model_names = {m.name for m in models}
    out = []
    for model in models:
        out.append(model.label)
        if model.name in head_names:
            out.append(f"classification_heads.{model.name}")
    return out + [h.label for h in heads if h.name not in model_names]


def shard_entries(models: list[Entry], heads: list[Entry], rank: int, world_size: int
                  ) -> tuple[list[Entry], list[Entry]]:
    """The entries rank ``rank`` of ``world_size`` checks: deterministic, balanced by file size
    (`pool.sharding.shard_units`), a model and its head of the same name together.

    Args:
        models, heads: every entry, as `prepare_pool` returns them.
        rank, world_size: this process and the number of processes.

    Returns:
        ``(models, heads)`` of this rank, in the order verify checks them.
    """
    head_by_name = {e.name: e for e in heads}
    units: list[tuple[Entry | None, Entry | None]] = [(m, head_by_name.pop(m.name, None)) for m in models]
    units += [(None, h) for h in head_by_name.values()]

    sizes = [sum(e.file_size for e in unit if e is not None) for unit in units]
    mine = shard_units(units, sizes, rank, world_size)
    return [m for m, _ in mine if m is not None], [h for _, h in mine if h is not None]


class EntryChecker:
    """Checks one pool entry at a time, as verify would (what the pytest items run): a model's
    load, weights, forward and task vector; a head with the encoder of the same name.

    Args:
        pool, models, heads: what `prepare_pool` returned.
        device: where to load and run (default CPU).
        integrity: check each file's checksums / header first.

    Example:
        >>> checker = EntryChecker(*prepare_pool("pool.yaml"))  # doctest: +SKIP
        >>> checker.check("models.cars").ok  # doctest: +SKIP
        True
    """

    def __init__(self, pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                 device: str | None = None, integrity: bool = False) -> None:
        self.run = _Run(pool, device=device, integrity=integrity, debug=True, on_result=None)
        self.models = {e.name: e for e in models}
        self.heads = {e.name: e for e in heads}

    @property
    def labels(self) -> list[str]:
        """Every entry's label, in verify's order (each model followed by its head)."""
        return verify_order(list(self.models.values()), list(self.heads.values()))

    def entry(self, label: str) -> Entry:
        """The resolved entry of a label.

        Args:
            label: ``models.<name>`` or ``classification_heads.<name>``.

        Returns:
            Its `pool.entries.Entry`.

        Raises:
            KeyError: no entry has that label.
        """
        section, _, name = label.partition(".")
        return (self.models if section == "models" else self.heads)[name]

    def check(self, label: str) -> EntryResult:
        """Check one entry; a head is checked with the encoder of the same name, if any.

        Args:
            label: ``models.<name>`` or ``classification_heads.<name>``.

        Returns:
            The entry's `EntryResult` (a failure is recorded in it, never raised).
        """
        section, _, name = label.partition(".")
        if section == "models":
            result, _, _ = self.run.model(self.models[name])
            if name in self.heads:
                result.paired_head = f"classification_heads.{name}"
            return result
        model = self.models.get(name)
        if model is None:
            return self.run.head(self.heads[name], None, None, paired_ok=None)
        model_result, encoder, features = self.run.model(model)
        return self.run.head(self.heads[name], encoder, features, paired_ok=model_result.ok)
