"""Bytes on disk -> a flat ``{name: Tensor}``: sniff the container, read it without running code.

Containers are recognised by content, never by file extension, and each is parsed by our own code
(`pool.containers`): torch zip (memory-mapped by default), torch legacy, a plain ``pickle.dump``
of a module (storages nested as legacy byte blobs), and safetensors (memory-mapped by default).
Nothing here hands file bytes to ``torch.load``, ``torch.jit``, ``tarfile`` or ``pickle.load``.

Pickles are scanned (`pool.pickle_scan`), unpickled into inert records (`pool.unpickler`),
interpreted by name (`pool.records`) and only then turned into tensors, after validation
(`pool.tensors`). A whole pickled module (``src.modeling.ImageEncoder``, ``ClassificationHead``)
yields exactly the keys and values its own ``state_dict()`` would. Only regular files are read.
This module knows nothing of open_clip.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .allowlist import parse_allow_globals
from .cache import CACHEABLE, CheckpointCache, resolve_cache_dir
from .containers import CONTAINERS, REGISTRY, Checkpoint, ReadOptions
from .containers import by_name as _container
from .containers import sniff as _sniff
from .containers.hf_folder import NAME as HF_FOLDER
from .containers.hf_folder import is_hf_folder, read_config, weights_file, with_config
from .containers.sniffing import as_text
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnreadableCheckpointError,
)
from .gcpause import paused_gc
from .notfound import missing_message
from .records import ModuleInfo
from .transfer import OpenFile

__all__ = [
    "Checkpoint",
    "ModuleInfo",
    "CheckpointNotFoundError",
    "UnreadableCheckpointError",
    "read_checkpoint",
    "load_state_dict",
    "sniff_container",
    "CONTAINERS",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


# -- sniffing -----------------------------------------------------------------------------------
def _describe_bytes(head: bytes) -> str:
    """A human description of a file that is no checkpoint container."""
    text = head.lstrip()
    lowered = text[:200].lower()
    if lowered.startswith(b"version https://git-lfs"):
        return ("a Git LFS pointer, not the weights: run `git lfs pull` in the repository it came "
                "from, or download the file itself")
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        snippet = text[:60].decode("utf-8", "replace").replace("\n", " ")
        return (f"an HTML/XML page (starts with {snippet!r}), probably an error page saved by a "
                "failed download: download the checkpoint again")
    decoded = as_text(head[:200])
    if decoded:
        return f"a text file (starts with {decoded[:60]!r}), not a checkpoint"
    return (f"not a known checkpoint container (first bytes {head[:8].hex(' ')}): expected a torch "
            "zip or legacy file, a pickle, or safetensors")


def sniff_container(path: PathLike) -> str:
    """Name the container of a file by its first bytes: zip, legacy, pickle or safetensors.

    Containers are recognised by content, never by file extension. Only the first 512 bytes are
    read, from a regular file only (a pipe or device could block). A file that is no container
    gets a message saying what it looks like instead: a Git LFS pointer, an HTML error page, a
    truncated safetensors file, ... A transformers model folder (``config.json`` beside
    ``model.safetensors`` or ``pytorch_model.bin``) is named ``"hf"``.

    Args:
        path: the file, or a transformers model folder (``~`` is expanded).

    Returns:
        The container's name: one of `CONTAINERS` (``"zip"``, ``"legacy"``, ``"safetensors"``,
        ``"pickle"``) for a file, ``"hf"`` for a transformers model folder.

    Raises:
        CheckpointNotFoundError: the path does not exist (the message lists the nearest folder).
        UnreadableCheckpointError: the path cannot be opened or looked at (a symbolic link loop,
            no permission, a name too long).
        CorruptCheckpointError: the path is another directory, a pipe, socket or device, an empty
            file, or no known container.
        CheckpointError: a tar archive (torch's pre-1.0 format), which is not supported.

    Example:
        >>> from pool.checkpoint import sniff_container
        >>> sniff_container("finetuned.pt")  # doctest: +SKIP
        'zip'
    """
    if _is_hf_folder(Path(path).expanduser()):
        return HF_FOLDER
    p = _existing_file(path)
    with _open(p) as file:
        return _sniff_open(file)


def _sniff_open(file: OpenFile) -> str:
    """The container of an open regular file, from its first 512 bytes (see `sniff_container`)."""
    p, size, head = file.path, file.info.st_size, file.read_at(0, 512)
    if size == 0:
        raise CorruptCheckpointError(f"{p}: the file is empty (0 bytes); download it again.")
    container = _sniff(head, size)
    if container is not None:
        return container.name
    for candidate in REGISTRY:
        why = candidate.diagnose(head, size)
        if why is not None:
            raise CorruptCheckpointError(f"{p}: {why}.")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(
            f"{p}: a tar archive (torch's pre-1.0 tar format or another archive). That format is "
            "not supported: load it with the torch version that wrote it and re-save it with "
            "torch.save(model.state_dict(), path).")
    raise CorruptCheckpointError(f"{p}: {_describe_bytes(head)}.")


def _open(p: Path) -> OpenFile:
    """``p`` opened once for a whole read (sniffing, parsing, the cache's identity all use it); a
    file gone since it was checked is `CheckpointNotFoundError`, a path that cannot be opened
    (a symbolic link loop, no permission) `UnreadableCheckpointError`."""
    try:
        return OpenFile(p)
    except FileNotFoundError:
        raise CheckpointNotFoundError(2, _missing_message(p), str(p)) from None


def _is_hf_folder(folder: Path) -> bool:
    """`is_hf_folder`, False for a path the system cannot even look at (`_existing_file` says why)."""
    try:
        return is_hf_folder(folder)
    except OSError:
        return False


def _not_regular(p: Path, mode: int) -> CheckpointError:
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    return CorruptCheckpointError(f"{p}: is {kind}, not a checkpoint file; only regular files are read "
                                  "(a pipe or device could block or never end). Point at the file itself.")


def _existing_file(path: PathLike) -> Path:
    p = Path(path).expanduser()
    try:
        return _checked_file(p)
    except CheckpointError:
        raise
    except OSError as exc:  # a symbolic link loop, no permission, a name too long: not a bare OSError
        raise UnreadableCheckpointError.from_os_error(p, exc) from None


def _checked_file(p: Path) -> Path:
    """``p`` when it is a regular file; a typed error when it is missing, a folder or a special
    file; the system's OSError when it cannot be looked at."""
    if p.is_dir():
        inside = sorted(x.name for x in p.iterdir())[:10]
        raise CorruptCheckpointError(
            f"{p}: is a directory, not a checkpoint file. It holds: {', '.join(inside) or 'nothing'}. "
            "Point at the .pt / .safetensors file itself (a transformers model folder is read too: "
            "config.json beside model.safetensors or pytorch_model.bin).")
    try:
        info = p.stat()
    except FileNotFoundError:
        raise CheckpointNotFoundError(2, _missing_message(p), str(p)) from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(p, info.st_mode)
    return p


def _missing_message(p: Path) -> str:
    """The not-found message (`pool.notfound.missing_message`: short, with the config-folder hint)."""
    return missing_message(p)


# -- reading ------------------------------------------------------------------------------------
def _device(value: Any, what: str) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError as exc:
            raise ConfigError(f"{what} {value!r} is not a device ({exc}); give a device string such as "
                              "'cpu' or 'cuda:0', or a torch.device") from None
    raise ConfigError(f"{what} {value!r} is not supported: give a device string such as 'cpu' or "
                      "'cuda:0', a torch.device, or a dict of saved location -> device")


def _read_options(map_location: Any = None, mmap: bool | None = None, refuse_unsafe: bool = True,
                 allow_globals: Any = None) -> ReadOptions:
    """How a read places tensors, from ``torch.load``'s ``map_location`` forms: None (the CPU), a
    device string or `torch.device` (every tensor there), or a dict mapping saved locations to
    devices (``{"cuda:0": "cpu"}``; a location it does not name stays on the CPU). A bad argument
    is the caller's mistake (ConfigError, a ValueError), never reported as a problem of the file."""
    allowed = parse_allow_globals(allow_globals)
    if isinstance(map_location, Mapping):
        locations = {}
        for saved, target in map_location.items():
            if not isinstance(saved, str):
                raise ConfigError(f"map_location: the key {saved!r} is not a saved location string "
                                  "such as 'cpu' or 'cuda:0'")
            locations[saved] = _device(target, f"map_location[{saved!r}]")
        return ReadOptions(None, mmap, refuse_unsafe, locations, allowed)
    device = None if map_location is None else _device(map_location, "map_location")
    return ReadOptions(device, mmap, refuse_unsafe, allow_globals=allowed)


def read_checkpoint(path: PathLike, *, map_location: Any = None, mmap: bool | None = None,
                    refuse_unsafe: bool = True, cache_dir: Any = None,
                    allow_globals: Iterable[str] | None = None) -> Checkpoint:
    """Read any supported checkpoint file without running code from it.

    The tensors are read into private memory: nothing the caller holds depends on the file staying
    as it is (rewriting it in place, ``torch.save(state_dict, path)``, is safe). ``mmap=True`` maps
    zip and safetensors tensors from the file instead, an explicit opt-in as in ``torch.load``:
    those tensors then die with the file (truncating or rewriting it kills the process with
    SIGBUS when they are touched). With ``refuse_unsafe=False`` a file naming unsafe globals is still read (they
    stay inert records) and they are listed in `Checkpoint.globals`; that is what ``inspect`` uses.

    Args:
        path: the checkpoint file (``~`` is expanded), its container recognised by content; or a
            transformers model folder, whose weights file is read and whose ``config.json``
            fields that matter (``hidden_act``, ``layer_norm_eps``, ...) become ``hf.*`` metadata.
        map_location: where the tensors go, as for ``torch.load``: None (the CPU), a device
            string or ``torch.device`` (every tensor there), or a dict mapping saved locations to
            devices (``{"cuda:0": "cpu"}``; a location it does not name stays on the CPU).
        mmap: True maps zip and safetensors tensors read onto the CPU from the file (fast, but
            they depend on the file staying as it is); None (the default) or False reads them
            into private memory. Tensors bound for a CUDA device are read in bulk either way;
            legacy and plain-pickle files are always copied.
        refuse_unsafe: refuse a file naming a global that could run code (the default); False
            reads it all the same, for ``inspect``.
        cache_dir: the conversion cache (`pool.cache`): a directory where a pickled file's
            tensors are kept as safetensors after its first read, so later reads of the
            unchanged file map them; None (the default) uses ``$OPENCLIP_POOL_CACHE_DIR`` when
            set, False turns the cache off. Reads with ``refuse_unsafe=False`` or a dict
            ``map_location`` never use it.
        allow_globals: exact ``module.name`` globals to accept besides `pool.allowlist.ALLOWLIST`
            (they stay inert records here; other readers of the file would call them). Reads
            with it do not use the cache.

    Returns:
        The `Checkpoint`: its state dict (exactly the keys a pickled module's own
        ``state_dict()`` has), module records, named globals and metadata; ``cache_entry``
        names the cache's copy when the tensors came from it.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        UnreadableCheckpointError: the path cannot be opened (a symbolic link loop, no permission,
            a name too long).
        UnsafeCheckpointError: the file names a global on no allowlist (unless
            ``refuse_unsafe=False``), uses an allowed one in a way no writer does, or is a
            TorchScript archive (always).
        CorruptCheckpointError: the file is truncated, damaged or crafted, is no known container,
            or is a pipe, a device or a directory that is no transformers model folder (or one
            with a sharded model or a bad ``config.json``).
        CheckpointError: any other unusable file, such as a tar archive or a file that changed
            while it was read.
        ConfigError: ``map_location`` is not a device, a device string or a dict of them, or
            ``cache_dir`` is no path.

    Example:
        >>> from pool import read_checkpoint
        >>> ckpt = read_checkpoint("finetuned.pt", map_location="cpu")  # doctest: +SKIP
        >>> ckpt.container, ckpt.root_type  # doctest: +SKIP
        ('zip', 'src.modeling.ImageEncoder')
        >>> sorted(ckpt.state_dict)[:1]  # doctest: +SKIP
        ['model.ln_final.bias']
    """
    options = _read_options(map_location, mmap, refuse_unsafe, allow_globals)
    cache = resolve_cache_dir(cache_dir)  # a bad value is the caller's mistake whatever the path is
    folder = Path(path).expanduser()
    if _is_hf_folder(folder):  # a transformers model folder: its weights file, its config as metadata
        config = read_config(folder)
        with paused_gc():
            return with_config(folder, config, _read_file(weights_file(folder), options))
    p = _existing_file(path)
    with _open(p) as file:  # one descriptor: every byte of the read, and the cache's identity, from it
        container = _container(_sniff_open(file))
        with paused_gc():
            if cache is not None and container.name in CACHEABLE and not options.allow_globals:
                return CheckpointCache(cache).read(file, options, container.read)
            return container.read(p, options, file)


def _read_file(p: Path, options: ReadOptions) -> Checkpoint:
    """Read one file, opened once; `_existing_file` checks that it exists and is a regular file."""
    p = _existing_file(p)
    with _open(p) as file:
        return _container(_sniff_open(file)).read(p, options, file)


def load_state_dict(path: PathLike, *, map_location: Any = None,
                    mmap: bool | None = None, cache_dir: Any = None,
                    allow_globals: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Any supported checkpoint file -> ``{name: Tensor}``, without running code from it.

    `read_checkpoint` with unsafe files refused, keeping only the state dict.

    Args:
        path: the checkpoint file (``~`` is expanded): a pickled module, a state dict (torch zip
            or legacy) or safetensors; or a transformers model folder.
        map_location: where the tensors go, as for `read_checkpoint` (None: the CPU).
        mmap: True maps zip and safetensors tensors from the file, as for `read_checkpoint`
            (None, the default: private copies that do not depend on the file).
        cache_dir: the conversion cache, as for `read_checkpoint` (None: ``$OPENCLIP_POOL_CACHE_DIR``).
        allow_globals: globals to accept besides the allowlist, as for `read_checkpoint`.

    Returns:
        The tensors by key; for a pickled module, exactly what its own ``state_dict()`` returns.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        UnreadableCheckpointError: the path cannot be opened (a symbolic link loop, no permission).
        UnsafeCheckpointError: the file names a global that could run code, or is TorchScript.
        CorruptCheckpointError: the file is truncated, damaged, crafted or no known container.
        CheckpointError: any other unusable file (a tar archive, a file changed while read).
        ConfigError: ``map_location`` is not a device, a device string or a dict of them.

    Example:
        >>> from pool.checkpoint import load_state_dict
        >>> state_dict = load_state_dict("finetuned.safetensors")  # doctest: +SKIP
        >>> state_dict["model.visual.conv1.weight"].shape  # doctest: +SKIP
        torch.Size([768, 3, 32, 32])
    """
    return read_checkpoint(path, map_location=map_location, mmap=mmap, cache_dir=cache_dir,
                           allow_globals=allow_globals).state_dict
