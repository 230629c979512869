"""Write tensors to a file atomically, read it back and compare it bit for bit before it replaces
anything: the one writer under `pool.saving` (a module's weights), `pool.convert` and the
conversion cache (`pool.cache_store`).

The read-back goes through the container parsers (`pool.containers`) directly, not through
`pool.checkpoint`, which itself reads through the cache: the writer stays below both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .containers import ReadOptions, sniff
from .containers.base import Checkpoint, OpenFile
from .containers.safetensors_file import SAFETENSORS_DTYPES
from .errors import CorruptCheckpointError
from .gcpause import paused_gc

__all__ = ["write_checked", "tensor_difference", "compare_tensors", "contiguous_unshared", "safetensors_layout",
           "signals_as_exit", "current_umask", "written_mode", "write_bytes_atomic"]

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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``);
    elsewhere set and put back at once (`os.umask` has no read-only form).

    Returns:
        The umask's permission bits (``0o022`` on most systems).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask & 0o777


def written_mode(destination: Path, *, folder: bool = False) -> int:
    """The permission bits a file (or folder) written to ``destination`` gets: those of the file
    it replaces, as ``cp`` and editors keep them; for a new one, what ``open(path, "w")`` (or
    ``mkdir``) gives under the current umask: ``0o666 & ~umask`` (``0o777 & ~umask``).

    Temporary files are made private (``tempfile.mkstemp``: 0600); each writer sets this mode
    on its temporary file before renaming it into place.

    Args:
        destination: the file or folder about to be written or replaced.
        folder: whether it is a folder.

    Returns:
        The permission bits (``0o644`` for a new file under the usual umask ``022``).

    Example:
        >>> from pathlib import Path
        >>> written_mode(Path("/nonexistent/new.safetensors")) == 0o666 & ~current_umask()
        True
    """
    try:
        info = os.lstat(destination)
    except OSError:
        info = None
    if info is not None and (stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)):
        return stat.S_IMODE(info.st_mode) & 0o777
    return (0o777 if folder else 0o666) & ~current_umask()


def contiguous_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, no two sharing storage (safetensors refuses shared storage).

    Args:
        tensors: the tensors to write, by key.

    Returns:
        A new dict: each tensor detached, on the CPU and contiguous; one that shares storage with
        an earlier one is cloned.
    """
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


def write_checked(tensors: dict[str, torch.Tensor], metadata: dict[str, str], destination: Path, *,
                  torch_format: bool = False, mode: int | None = None) -> int:
    """Write ``tensors`` to ``destination`` through a temporary file beside it that is read back by
    the restricted reader and compared bit for bit before it is renamed into place.

    Args:
        tensors: contiguous CPU tensors sharing no storage (`module_payload` gives such).
        metadata: string metadata (safetensors only; a torch file has nowhere to keep it).
        destination: the file to create or replace.
        torch_format: write ``torch.save`` of the plain dict of tensors (a zip) instead of safetensors.
        mode: the written file's permission bits; None (the default) keeps those of the file it
            replaces, else gives what ``open(path, "w")`` would under the umask (`written_mode`).

    Returns:
        The size of the written file in bytes.

    Raises:
        CorruptCheckpointError: the file read back differs from what was meant (nothing is replaced).
        OSError: the write failed (a full disk, a read-only folder): the temporary file is removed
            and ``destination`` is left as it was. SIGTERM / SIGHUP during the write end the process
            after the same cleanup (`signals_as_exit`).
    """
    with signals_as_exit():
        return _write_checked(tensors, metadata, destination, torch_format,
                              written_mode(destination) if mode is None else mode)


def _write_checked(tensors: dict[str, torch.Tensor], metadata: dict[str, str], destination: Path,
                   torch_format: bool, mode: int) -> int:
    """`write_checked`, its signals already taken over and the file's mode decided."""
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if torch_format:
            torch.save(tensors, tmp)
        else:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        # after the write: mkstemp makes the file 0600, and safetensors renames its own 0600 file over it
        os.chmod(tmp, mode)
        back = _read_back(tmp)
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


def write_bytes_atomic(destination: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write a small file (a lock file, a config, an index, a report, a figure) atomically: a
    temporary file beside it, fsynced, given its mode, then renamed over ``destination``; an
    interrupted write leaves the old file whole and no temporary file behind.

    Args:
        destination: the file to write or replace (its folder must exist).
        data: its bytes.
        mode: its permission bits; None: what `written_mode` decides.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, written_mode(destination) if mode is None else mode)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_back(path: Path) -> Checkpoint:
    """The file just written, read as `pool.checkpoint.read_checkpoint` reads it (its container
    sniffed from its bytes, unsafe globals refused), mapped: our own file, no second copy."""
    with OpenFile(path) as file:
        container = sniff(file.read_at(0, 512), file.info.st_size)
        if container is None:
            raise CorruptCheckpointError(f"{path}: the file written is no container pool reads")
        with paused_gc():
            return container.read(path, ReadOptions(mmap=True), file)
