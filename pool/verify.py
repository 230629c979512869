"""Verify a pool: load every model and head once, check them, and say which fail and why.

`verify_pool` is what ``python -m pool verify`` runs. For each model (``_pretrained_`` first) it
records the form, container, file, architecture (read from the weights; the configured
``model_name`` is checked against it), parameter count, load time and a forward pass on a small
random batch; the head of the same name is loaded next and fed that encoder's features; each
fine-tuned model's task vector against ``_pretrained_`` is checked (same keys and shapes) and
its L2 norm reported. Unpaired heads are checked alone. One encoder is in memory at a time (plus
the pretrained state dict, kept for the task vectors). A failing entry never stops the others.
"""

from __future__ import annotations

import logging
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import VisionArch, name_for_arch
from .checkpoint import sniff_container
from .entries import Entry
from .errors import ConfigError, PoolError
from .integrity import check_integrity
from .keys import key_mismatch
from .modelpool import PRETRAINED, OpenCLIPVisionModelPool, check_head_fits

__all__ = ["EntryResult", "VerifyReport", "verify_pool", "prepare_pool", "versions", "arch_label"]

log = logging.getLogger(__name__)

BATCH = 2


@dataclass
class EntryResult:
    """The outcome of one pool entry (a model or a head)."""

    name: str
    section: str  # "models" or "classification_heads"
    form: str
    file: str | None = None
    container: str | None = None
    ok: bool = True
    error: str | None = None
    error_type: str | None = None
    integrity: dict[str, Any] | None = None
    architecture: dict[str, Any] | None = None
    params: int | None = None
    load_s: float | None = None
    forward: dict[str, Any] | None = None
    head: dict[str, Any] | None = None
    task_vector: dict[str, Any] | None = None
    traceback: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.section}.{self.name}"

    def fail(self, exc: BaseException, *, stage: str | None = None, debug: bool = False) -> None:
        self.ok = False
        self.error_type = type(exc).__name__
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if not isinstance(exc, PoolError) and not isinstance(exc, OSError):
            message = f"{type(exc).__name__}: {message} (unexpected; rerun with --debug for the traceback)"
        self.error = f"{stage}: {message}" if stage else message
        if debug:
            self.traceback = "".join(traceback.format_exception(exc))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out.get("traceback") is None:
            out.pop("traceback", None)
        return out


@dataclass
class VerifyReport:
    """Every entry's result plus what the run was."""

    config: str
    device: str
    integrity_checked: bool
    entries: list[EntryResult]
    seconds: float = 0.0
    note: str | None = None

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    @property
    def failed(self) -> list[EntryResult]:
        return [e for e in self.entries if not e.ok]

    def as_dict(self) -> dict[str, Any]:
        models = [e for e in self.entries if e.section == "models"]
        heads = [e for e in self.entries if e.section != "models"]
        return {
            "tool": "openclip-pool verify",
            "config": self.config,
            "note": self.note,
            "ok": self.ok,
            "device": self.device,
            "integrity_checked": self.integrity_checked,
            "seconds": round(self.seconds, 4),
            "summary": {
                "models": len(models), "models_passed": sum(e.ok for e in models),
                "heads": len(heads), "heads_passed": sum(e.ok for e in heads),
                "failed": [e.label for e in self.failed],
            },
            "versions": versions(),
            "entries": [e.as_dict() for e in self.entries],
        }


class TaskVectorError(PoolError):
    """A fine-tuned model and _pretrained_ do not line up key for key."""


def versions() -> dict[str, str]:
    import open_clip
    import safetensors

    from . import __version__

    return {"pool": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def arch_label(arch: VisionArch | None) -> str:
    """``ViT-B-32`` when open_clip has a config with these shapes, else a compact description."""
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


def prepare_pool(config: str | Path) -> tuple[OpenCLIPVisionModelPool, list[Entry], list[Entry]]:
    """Read a pool config and resolve every entry, raising one ConfigError listing all problems
    (unknown keys, unknown model_name, no entries): errors the user fixes in the YAML."""
    from .arch import arch_for_name

    modelpool_log = logging.getLogger("pool.modelpool")
    quiet = _DropMessage("the pool has no models")  # verify reports emptiness itself, as an error
    modelpool_log.addFilter(quiet)
    try:
        pool = OpenCLIPVisionModelPool.from_config(config)
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
        raise ConfigError(f"{config}: " + " ".join(problems))
    if not models and not heads:
        raise ConfigError(f"{config}: the config has no models and no classification_heads; "
                          "nothing to verify.")
    models.sort(key=lambda e: e.name != PRETRAINED)  # _pretrained_ first: task vectors need it
    return pool, models, heads


def _file_and_container(entry: Entry, result: EntryResult) -> None:
    if entry.path is not None:
        result.file = str(entry.path.absolute())
        result.container = sniff_container(entry.path)


def _integrity(entry: Entry, result: EntryResult) -> None:
    if entry.path is None:
        result.integrity = {"checked": False, "detail": f"a {entry.form} entry has no file to check"}
        return
    res = check_integrity(entry.path)
    result.integrity = {"checked": res.checked, "detail": res.detail}


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _image_size(encoder: torch.nn.Module) -> int | None:
    arch = getattr(encoder, "arch", None)
    if arch is not None:
        return int(arch.image_size)
    visual = getattr(getattr(encoder, "model", None), "visual", None)
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if isinstance(size, int) else None


def _task_vector(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    problem = key_mismatch(state, base, PRETRAINED)
    if problem:
        raise TaskVectorError(f"task vector against {PRETRAINED}: {problem}; this model is not a "
                              f"fine-tuned copy of {PRETRAINED}.")
    total = 0.0
    count = 0
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        diff = v.detach().to(torch.float64) - base[k].detach().to(device=v.device, dtype=torch.float64)
        total += float(diff.pow(2).sum())
        count += 1
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise TaskVectorError(
            f"task vector against {PRETRAINED}: its norm is {norm} (non-finite weights)")
    return {"against": PRETRAINED, "tensors": count, "l2_norm": norm}


def verify_pool(pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                config_label: str, device: str | None = None, integrity: bool = False,
                debug: bool = False, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every entry; never raises for an entry's failure (it is recorded)."""
    start = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cpu")
    head_by_name = {e.name: e for e in heads}
    results: list[EntryResult] = []
    base_state: dict[str, torch.Tensor] | None = None
    tick = progress or (lambda _label: None)

    def guarded(result: EntryResult, stage: str, fn: Callable[[], Any]) -> Any:
        if not result.ok:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the run goes on
            result.fail(exc, stage=stage, debug=debug)
            log.debug("%s failed at %s", result.label, stage, exc_info=True)
            return None

    done_heads: set[str] = set()
    for entry in models:
        tick(entry.label)
        res = EntryResult(entry.name, "models", entry.form)
        if entry.model_name:
            res.architecture = {"inferred": None, "configured": entry.model_name}
        results.append(res)
        guarded(res, "file", lambda e=entry, r=res: _file_and_container(e, r))
        if integrity:
            guarded(res, "integrity", lambda e=entry, r=res: _integrity(e, r))
        t0 = time.perf_counter()
        encoder = guarded(res, "load", lambda e=entry: pool.load_model(e.name, device=device))
        if encoder is not None:
            res.load_s = time.perf_counter() - t0
            arch = getattr(encoder, "arch", None)
            res.architecture = {
                "inferred": arch_label(arch) if arch is not None else None,
                "describe": arch.describe() if arch is not None else None,
                "configured": entry.model_name,
                "matches_config": True if entry.model_name else None,
                "quick_gelu": getattr(arch, "quick_gelu", None),
            }
            res.params = sum(p.numel() for p in encoder.parameters())
        features = guarded(res, "forward", lambda enc=encoder, r=res: _forward(enc, r, dev))
        if entry.name == PRETRAINED:
            if encoder is not None and res.ok:
                base_state = {k: v.detach() for k, v in encoder.state_dict().items()}
        elif res.ok and encoder is not None:
            if base_state is not None:
                res.task_vector = guarded(res, "task vector",
                                          lambda enc=encoder, base=base_state: _task_vector(enc.state_dict(), base))
            elif pool.has_pretrained:
                res.task_vector = {"skipped": f"{PRETRAINED} failed to load"}
            else:
                res.task_vector = {"skipped": f"the pool has no {PRETRAINED}"}
        head_entry = head_by_name.get(entry.name)
        if head_entry is not None:
            tick(head_entry.label)
            done_heads.add(head_entry.name)
            results.append(_verify_head(pool, head_entry, encoder if res.ok else None, features, device,
                                        dev, integrity, guarded, paired_ok=res.ok))
            res.head = {"name": head_entry.name, "ok": results[-1].ok}
        del encoder, features
    for entry in heads:
        if entry.name in done_heads:
            continue
        tick(entry.label)
        results.append(_verify_head(pool, entry, None, None, device, dev, integrity, guarded,
                                    paired_ok=None))
    report = VerifyReport(config_label, str(dev), integrity, results, time.perf_counter() - start)
    return report


def _forward(encoder: torch.nn.Module | None, res: EntryResult, dev: torch.device) -> torch.Tensor | None:
    if encoder is None:
        return None
    size = _image_size(encoder)
    if size is None:
        res.forward = {"skipped": "not an ImageEncoder: image size unknown"}
        return None
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, size, size, generator=generator).to(device=dev, dtype=_param_dtype(encoder))
    encoder.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = encoder(images)
    seconds = time.perf_counter() - t0
    embed = getattr(encoder, "embed_dim", None)
    res.forward = {"input": [BATCH, 3, size, size], "output": list(out.shape), "seconds": seconds,
                   "finite": _finite(out)}
    if out.dim() != 2 or out.shape[0] != BATCH or (embed is not None and out.shape[1] != embed):
        raise PoolError(f"forward pass on a {BATCH}x3x{size}x{size} batch gave shape {tuple(out.shape)}, "
                        f"expected ({BATCH}, {embed})")
    if not res.forward["finite"]:
        raise PoolError(f"forward pass on a random {BATCH}x3x{size}x{size} batch gave non-finite "
                        "features (NaN or inf): the weights are damaged")
    return out


def _verify_head(pool: OpenCLIPVisionModelPool, entry: Entry, encoder: torch.nn.Module | None,
                 features: torch.Tensor | None, device: str | None, dev: torch.device, integrity: bool,
                 guarded: Callable[..., Any], paired_ok: bool | None) -> EntryResult:
    res = EntryResult(entry.name, "classification_heads", entry.form)
    guarded(res, "file", lambda: _file_and_container(entry, res))
    if integrity:
        guarded(res, "integrity", lambda: _integrity(entry, res))
    t0 = time.perf_counter()
    head = guarded(res, "load", lambda: pool.load_classification_head(entry.name, device=device))
    if head is None:
        return res
    res.load_s = time.perf_counter() - t0
    res.params = sum(p.numel() for p in head.parameters())
    info: dict[str, Any] = {
        "classes": getattr(head, "out_features", None), "input_dim": getattr(head, "in_features", None),
        "normalize": getattr(head, "normalize", None),
        "paired_with": f"models.{entry.name}" if paired_ok is not None else None,
    }
    res.head = info
    if encoder is not None:
        guarded(res, "pairing", lambda: check_head_fits(encoder, head, entry.name))
        info["encoder_embed_dim"] = getattr(encoder, "embed_dim", None)
    elif paired_ok is False:
        info["note"] = f"models.{entry.name} failed, so this head was checked alone"

    def logits() -> None:
        feats = features
        if feats is None or not res.ok:
            dim = info["input_dim"] or 1
            feats = torch.randn(BATCH, dim, generator=torch.Generator().manual_seed(1))
        out = head(feats.to(device=dev, dtype=_param_dtype(head)))
        info["logits"] = list(out.shape)
        if not _finite(out):
            raise PoolError("logits are not finite (NaN or inf): the head's weights are damaged")

    with torch.no_grad():
        guarded(res, "logits", logits)
    return res
