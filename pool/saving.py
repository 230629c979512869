"""Write a module's weights to a file: safetensors by default, a torch zip state dict for ``.pt``,
``.pth`` and ``.bin``; atomically, read back and compared bit for bit; never a pickled module.

`module_payload` says what is written for a module (tensors and metadata: an `ImageEncoder`'s
architecture and activation, a `ClassificationHead`'s ``normalize`` flag), `write_checked` writes
it. `pool.convert` and `OpenCLIPVisionModelPool.save_model` both go through here, so what either
writes loads back through every form of the pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import HEADS_METADATA, QUICK_GELU_METADATA, name_for_arch
from .errors import ConfigError, CorruptCheckpointError

__all__ = ["module_payload", "write_checked", "save_module_weights", "tensor_difference", "compare_tensors",
           "safetensors_layout", "TORCH_SUFFIXES", "signals_as_exit"]

log = logging.getLogger(__name__)

#: Signals whose default action ends the process without running ``finally`` blocks.
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP end the process as ``SystemExit(128 + signal)`` rather
    than at once, so that a write's cleanup runs (its temporary file is removed; nothing half-written
    is left). Only signals still at their default action are taken over, only in the main thread,
    and the previous handlers come back after the block. SIGINT already raises KeyboardInterrupt.

    Yields:
        None: the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    for sig in _ENDING_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, leave)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: Suffixes written as a torch zip state dict (``torch.save`` of a dict of tensors); others: safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def contiguous_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no two sharing storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        t = value.detach().to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def safetensors_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse, before a byte is written, what a safetensors file cannot hold.

    Args:
        tensors: the tensors to write, by key.
        metadata: the string metadata to write.

    Raises:
        ValueError: a key safetensors reserves (``__metadata__``) or cannot encode as UTF-8, or a
            dtype it has no name for (complex128, ...).
        TypeError: a key or metadata value that is no string.
    """
    from .containers.safetensors_file import SAFETENSORS_DTYPES

    writable = set(SAFETENSORS_DTYPES.values())
    for key, tensor in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor key {key!r} is not a string")
        if key == "__metadata__":
            raise ValueError("a tensor is named __metadata__, which safetensors reserves")
        key.encode("utf-8")  # UnicodeEncodeError (a ValueError) for lone surrogates
        if tensor.dtype not in writable:
            raise ValueError(f"tensor {key[:200]!r} has dtype {tensor.dtype}, which safetensors cannot hold")
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"metadata {name!r} is not a string pair")


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.element_size() and flat.numel() else flat


def tensor_difference(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """How two state dicts differ (keys, dtypes, shapes or bits), or None when they are identical.

    Values are compared bit for bit (a NaN equals the same NaN; ``0.0`` and ``-0.0`` differ).

    Args:
        written: the tensors read back.
        expected: the tensors meant to be written.

    Returns:
        None when both have the same keys and each tensor the same dtype, shape and bits; else
        the first difference, in words.

    Example:
        >>> import torch
        >>> tensor_difference({"w": torch.zeros(2)}, {"w": torch.zeros(2)}) is None
        True
        >>> tensor_difference({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, -0.0])})
        'w has different values'
    """
    if set(written) != set(expected):
        missing = sorted(set(expected) - set(written))[:3]
        extra = sorted(set(written) - set(expected))[:3]
        return f"different keys (missing {missing}, extra {extra})"
    for key, want in expected.items():
        got = written[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{key} is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
        if not torch.equal(_bits(got.cpu()), _bits(want.cpu())):
            return f"{key} has different values"
    return None


def compare_tensors(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Raise CorruptCheckpointError unless both have the same keys, dtypes, shapes and bits.

    Args:
        written: the tensors read back.
        expected: the tensors meant to be written.
        where: what the message names (the file written).

    Raises:
        CorruptCheckpointError: they differ (`tensor_difference` says how).
    """
    difference = tensor_difference(written, expected)
    if difference is not None:
        raise CorruptCheckpointError(f"{where}: read back with {difference}")


def module_payload(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata written for ``module``.

    An `ImageEncoder` (anything with a ``VisionArch`` in ``.arch``) is written with its
    ``state_dict()`` keys (``model.visual...``) and ``pool.kind=encoder``, the architecture, the
    open_clip name and the activation (`pool.arch.QUICK_GELU_METADATA`); a `ClassificationHead`
    (``normalize`` plus a 2-d ``weight``) as ``weight`` / ``bias`` with its ``normalize`` flag;
    any other module as its state dict (``pool.kind=state_dict``).

    Args:
        module: the module whose weights are written.

    Returns:
        ``(tensors, metadata)``: contiguous CPU tensors sharing no storage, and string metadata.
    """
    from .arch import VisionArch

    arch = getattr(module, "arch", None)
    weight = getattr(module, "weight", None)
    if isinstance(arch, VisionArch):
        name = name_for_arch(arch)
        meta = {"pool.kind": "encoder", "pool.architecture": arch.describe(), "pool.model_name": name or "",
                QUICK_GELU_METADATA: str(bool(arch.quick_gelu)).lower(), "pool.embed_dim": str(arch.embed_dim),
                "pool.image_size": str(arch.image_size), HEADS_METADATA: str(arch.heads)}
        tensors = dict(module.state_dict())
    elif hasattr(module, "normalize") and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        classes, dim = (int(x) for x in weight.shape)
        bias = getattr(module, "bias", None)
        tensors = {"weight": weight, "bias": bias if bias is not None else torch.zeros(classes, dtype=weight.dtype)}
        meta = {"pool.kind": "head", "normalize": str(bool(module.normalize)).lower(),
                "pool.classes": str(classes), "pool.embed_dim": str(dim)}
    else:
        tensors = dict(module.state_dict())
        meta = {"pool.kind": "state_dict", "pool.module": type(module).__qualname__}
    return contiguous_unshared(tensors), meta


def write_checked(tensors: dict[str, torch.Tensor], metadata: dict[str, str], destination: Path, *,
                  torch_format: bool = False) -> int:
    """Write ``tensors`` to ``destination`` through a temporary file beside it that is read back by
    the restricted reader and compared bit for bit before it is renamed into place.

    Args:
        tensors: contiguous CPU tensors sharing no storage (`module_payload` gives such).
        metadata: string metadata (safetensors only; a torch file has nowhere to keep it).
        destination: the file to create or replace.
        torch_format: write ``torch.save`` of the plain dict of tensors (a zip) instead of safetensors.

    Returns:
        The size of the written file in bytes.

    Raises:
        CorruptCheckpointError: the file read back differs from what was meant (nothing is replaced).
        OSError: the write failed (a full disk, a read-only folder): the temporary file is removed
            and ``destination`` is left as it was. SIGTERM / SIGHUP during the write end the process
            after the same cleanup (`signals_as_exit`).
    """
    with signals_as_exit():
        return _write_checked(tensors, metadata, destination, torch_format)


def _write_checked(tensors: dict[str, torch.Tensor], metadata: dict[str, str], destination: Path,
                   torch_format: bool) -> int:
    """`write_checked`, its signals already taken over."""
    import safetensors.torch

    from .checkpoint import read_checkpoint

    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if torch_format:
            torch.save(tensors, tmp)
        else:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        back = read_checkpoint(tmp, cache_dir=False, mmap=True)  # our own file: mapped, no second copy
        compare_tensors(back.state_dict, tensors, str(destination))
        if not torch_format and back.metadata != metadata:
            raise CorruptCheckpointError(f"{destination}: metadata read back differs from what was written")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            tmp.unlink()
    return destination.stat().st_size


def _lost_in_torch_format(module: nn.Module) -> list[str]:
    """What a plain state-dict file would not carry: the settings a reader would infer otherwise
    (an activation or head count other than the shapes' default, a head's ``normalize=False``)."""
    from .arch import VisionArch, arch_for_name, default_quick_gelu

    arch = getattr(module, "arch", None)
    if isinstance(arch, VisionArch):
        lost = []
        if bool(arch.quick_gelu) != default_quick_gelu(arch):
            lost.append(f"activation ({'QuickGELU' if arch.quick_gelu else 'GELU'})")
        name = name_for_arch(arch)
        default_heads = arch_for_name(name).heads if name else max(1, arch.width // 64)
        if arch.heads != default_heads:
            lost.append(f"attention heads ({arch.heads})")
        return lost
    if hasattr(module, "normalize") and not module.normalize:
        return ["normalize=False flag"]
    return []


def save_module_weights(module: nn.Module, path: str | os.PathLike[str], **ignored: Any) -> Path:
    """Save ``module``'s weights to ``path``: safetensors, or a torch zip state dict when the name ends
    in ``.pt``, ``.pth`` or ``.bin``. Atomic and read back before it replaces anything; never a
    pickled module, so the file loads with any reader, ours included, in every pool form.

    Args:
        module: an `ImageEncoder`, a `ClassificationHead` or any module.
        path: the file to write (its folder must exist).
        ignored: other keyword arguments (FusionBench passes some); logged at debug level.

    Returns:
        The path written.

    Raises:
        ConfigError: ``path`` is a folder or its folder does not exist, or a ``.pt`` / ``.pth`` /
            ``.bin`` file could not carry what the model needs (an activation or head count other
            than its shapes' default, a head's ``normalize=False``): save as safetensors.
        CorruptCheckpointError: the written file did not read back identical.

    Example:
        >>> from pool.saving import save_module_weights
        >>> save_module_weights(merged_encoder, "merged.safetensors")  # doctest: +SKIP
    """
    destination = Path(path).expanduser()
    if ignored:
        log.debug("save_model: ignoring arguments %s", sorted(ignored))
    if destination.is_dir():
        raise ConfigError(f"{destination} is a folder; give the file to write, e.g. {destination / 'merged.safetensors'}")
    if not destination.parent.is_dir():
        raise ConfigError(f"{destination.parent} does not exist; create the folder first.")
    tensors, metadata = module_payload(module)
    torch_format = destination.suffix.lower() in TORCH_SUFFIXES
    if torch_format:
        lost = _lost_in_torch_format(module)
        if lost:
            raise ConfigError(f"{destination}: a {destination.suffix} file keeps tensors only, and this model's "
                              f"{' and '.join(lost)} would read back otherwise. Save it as .safetensors, "
                              "which records it.")
    size = write_checked(tensors, metadata, destination, torch_format=torch_format)
    log.info("saved %s (%d tensors, %d bytes)", destination, len(tensors), size)
    return destination
