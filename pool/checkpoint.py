"""Bytes on disk -> a flat ``{name: Tensor}``: sniff the container, read it without running code.

Containers are recognised by content, never by file extension:

* ``zip``: torch's zip format (``torch.save`` default since torch 1.6), memory-mapped by default;
* ``legacy``: torch's legacy format (``_use_new_zipfile_serialization=False``);
* ``pickle``: a plain ``pickle.dump`` of a module, storages nested as legacy byte blobs;
* ``safetensors``, memory-mapped by default.

Pickles go through `pool.unpickler.RestrictedReader`: nothing the file names is imported or run.
A whole pickled module (``src.modeling.ImageEncoder``, ``ClassificationHead``) is walked through
its ``_parameters`` / ``_buffers`` / ``_modules`` records and yields exactly the keys and values
its own ``state_dict()`` would. This module knows nothing of open_clip.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError, CorruptCheckpointError
from .gcpause import paused_gc
from .layout import SAFETENSORS_DTYPES, ZipIndex, contiguous_strides, safetensors_entries, zip_index
from .transfer import Span, as_tensor, read_spans
from .unpickler import GlobalName, InertRecord, RestrictedReader

__all__ = [
    "Checkpoint",
    "ModuleInfo",
    "CheckpointNotFoundError",
    "read_checkpoint",
    "load_state_dict",
    "sniff_container",
    "CONTAINERS",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CONTAINERS = ("zip", "legacy", "pickle", "safetensors")
# torch's legacy format starts with a pickled magic number: LONG1 opcode, 10 bytes.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little", signed=True)
_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
     "_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_pre_hooks",
     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
     "_load_state_dict_post_hooks", "_is_full_backward_hook"}
)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (both a CheckpointError and a FileNotFoundError)."""


@dataclass(frozen=True)
class ModuleInfo:
    """A pickled module's class (``module.QualName``) and its plain attributes."""

    type: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """Everything one read of a checkpoint file yields.

    ``state_dict`` is what the pickled module's own ``state_dict()`` returns (or the stored state
    dict); ``modules`` maps each submodule path ("" for the root) to its class and plain
    attributes; ``globals`` lists every global the pickle names, unsafe ones flagged.
    """

    path: Path
    container: str
    state_dict: dict[str, torch.Tensor]
    root_type: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    globals: list[GlobalName] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        """Plain attributes of the root module, such as a head's ``normalize`` flag."""
        root = self.modules.get("")
        return dict(root.attributes) if root else {}

    @property
    def unsafe_globals(self) -> list[str]:
        return [str(g) for g in self.globals if g.unsafe]


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
    decoded = _as_text(head[:200])
    if decoded:
        return f"a text file (starts with {decoded[:60]!r}), not a checkpoint"
    return (f"not a known checkpoint container (first bytes {head[:8].hex(' ')}): expected a torch "
            "zip or legacy file, a pickle, or safetensors")


def _as_text(head: bytes) -> str | None:
    """head decoded as UTF-8 if it is printable text (a character cut at the end is allowed)."""
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return None
        decoded = head[:exc.start].decode("utf-8")
    if decoded and all(c.isprintable() or c in "\r\n\t\f\v" for c in decoded):
        return decoded
    return None


def sniff_container(path: PathLike) -> str:
    """Name the container of a file by its first bytes: zip, legacy, pickle or safetensors."""
    p = _existing_file(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(512)
    if size == 0:
        raise CorruptCheckpointError(f"{p}: the file is empty (0 bytes); download it again.")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith((b"PK\x05\x06", b"PK\x07\x08")):
        raise CorruptCheckpointError(f"{p}: an empty or split zip archive, not a torch checkpoint.")
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8:
            return "safetensors"
        if _as_text(head[:200]) is not None:  # e.g. a JSON or YAML file with "{" at byte 8
            raise CorruptCheckpointError(f"{p}: {_describe_bytes(head)}.")
        raise CorruptCheckpointError(
            f"{p}: looks like safetensors but its header claims {header_len} bytes and the file has "
            f"{size}; the file is truncated: download it again.")
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "legacy" if _LEGACY_MAGIC in head[:32] else "pickle"
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(
            f"{p}: a tar archive (torch's pre-1.0 tar format or another archive). That format is "
            "not supported: load it with the torch version that wrote it and re-save it with "
            "torch.save(model.state_dict(), path).")
    raise CorruptCheckpointError(f"{p}: {_describe_bytes(head)}.")


def _existing_file(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        inside = sorted(x.name for x in p.iterdir())[:10]
        raise CorruptCheckpointError(
            f"{p}: is a directory, not a checkpoint file. It holds: {', '.join(inside) or 'nothing'}. "
            "Point at the .pt / .safetensors file itself.")
    if not p.exists():
        raise CheckpointNotFoundError(2, _missing_message(p), str(p))
    return p


def _missing_message(p: Path) -> str:
    absolute = p.absolute()
    parent = absolute.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        near = sorted(x.name + ("/" if x.is_dir() else "") for x in parent.iterdir())
    except OSError:
        near = []
    listing = ", ".join(near[:15]) + (" ..." if len(near) > 15 else "")
    return (f"checkpoint not found: {absolute}. The nearest existing folder is {parent}, which "
            f"holds: {listing or 'nothing'}. Check the path (relative paths resolve against the "
            f"working directory, {Path.cwd()}).")


# -- reading ------------------------------------------------------------------------------------
def _zip_index(p: Path, offsets: bool) -> ZipIndex:
    index = zip_index(p, offsets=offsets)
    names = index.names
    # torch.load hands any zip holding constants.pkl to torch.jit.load, which runs the archive's
    # TorchScript (its __setstate__ methods run while loading): refuse before torch sees the file.
    if any("/code/" in n or n.startswith("code/") or n.rsplit("/", 1)[-1] == "constants.pkl"
           for n in names):
        raise CheckpointError(
            f"{p}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; it carries "
            "code that loading it would run, so it is not read. Load it with torch.jit.load in a "
            "trusted setting and save its state_dict() instead.")
    if index.pickle is None:
        raise CorruptCheckpointError(
            f"{p}: a zip archive without data.pkl (holds {', '.join(names[:5]) or 'nothing'}); "
            "not a torch checkpoint.")
    return index


def _bulk_device(container: str, p: Path, map_location: Any, mmap: bool | None) -> torch.device | None:
    """The device to fill with one bulk read (`pool.transfer`), or None for the ordinary path:
    CUDA targets, and CPU targets that asked for no mmap, of zip and safetensors files."""
    if container not in ("zip", "safetensors") or p.name.endswith(".safetensors") and container == "zip":
        return None
    if map_location is None:
        return torch.device("cpu") if mmap is False else None
    if not isinstance(map_location, (str, torch.device)):
        return None
    device = torch.device(map_location)
    if device.type == "cuda" or (device.type == "cpu" and mmap is False):
        return device
    return None


def _read_container(p: Path, container: str, reader: RestrictedReader, map_location: Any,
                    mmap: bool, index: ZipIndex | None) -> Any:
    if container == "zip":
        assert index is not None
        reader.record_sizes = {key: r.nbytes for key, r in index.records.items()}
        reader.use_c_unpickler_for(index.pickle or b"")
        if os.fspath(p).endswith(".safetensors"):
            # torch.load reads any *path* named .safetensors with safetensors, whatever it holds;
            # a file object keeps it on the zip reader (and this reader), at the cost of mmap.
            with open(p, "rb") as f:
                return reader.torch_load(f, map_location=map_location, mmap=False)
        return reader.torch_load(str(p), map_location=map_location, mmap=mmap)
    if container == "legacy":
        reader.max_bytes = p.stat().st_size
        with open(p, "rb") as f:
            return reader.torch_load(f, map_location=map_location, mmap=False)
    with open(p, "rb") as f:  # plain pickle: storages arrive as nested legacy blobs
        return reader.unpickle(f)


def _zip_tensors_to(tensors: dict[str, torch.Tensor], records: dict[str, torch.UntypedStorage],
                    storage_keys: dict[int, str], device: torch.device) -> dict[str, torch.Tensor]:
    """Rebuild memory-mapped zip tensors over the device storages read for their records."""
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        key = storage_keys.get(storage.data_ptr())
        if storage.nbytes() == 0 or key not in records:  # empty, or not from an archive record
            out[name] = t.to(device)
        else:
            out[name] = as_tensor(records[key], t.dtype, t.size(), t.stride(), t.storage_offset())
    return out


def _read_records(p: Path, index: ZipIndex, keys: set[str], device: torch.device) -> dict[str, torch.UntypedStorage]:
    """The zip storage records named by ``keys`` (those the state dict uses: not, say, an
    optimizer's), read onto ``device`` in one bulk transfer, by key. Run after the unpickling,
    not beside it: both need the GIL, and sharing it slows both."""
    wanted = [k for k in index.records if k in keys]
    spans = [Span(index.records[k].offset, index.records[k].nbytes) for k in wanted]
    return dict(zip(wanted, read_spans(p, spans, device), strict=True))


def _safetensors_to(p: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Read a safetensors file onto ``device`` with one bulk read (None: a dtype we don't map)."""
    entries, metadata = safetensors_entries(p)
    if any(e.dtype not in SAFETENSORS_DTYPES for e in entries):
        return None
    storages = read_spans(p, [Span(e.offset, e.nbytes) for e in entries], device)
    tensors = {e.name: as_tensor(s, SAFETENSORS_DTYPES[e.dtype], e.shape, contiguous_strides(e.shape))
               for e, s in zip(entries, storages, strict=True)}
    return tensors, metadata


def _read_safetensors(p: Path, map_location: Any, mmap: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors
    import safetensors.torch

    device = _device_of(map_location)
    try:
        with safetensors.safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        if mmap:
            tensors = safetensors.torch.load_file(str(p), device=device)
        else:
            tensors = safetensors.torch.load(p.read_bytes())
            if device != "cpu":
                tensors = {k: v.to(device) for k, v in tensors.items()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{p}: a safetensors file that cannot be read ({exc}); the file is truncated or "
            "damaged: download it again.") from None
    return tensors, metadata


def _device_of(map_location: Any) -> str:
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    raise CheckpointError(f"map_location {map_location!r}: give a device string or torch.device")


def _type_name(obj: Any) -> str:
    if isinstance(obj, InertRecord):
        return type(obj).__pool_global__
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_state(obj: Any) -> dict[str, Any] | None:
    """The ``__dict__`` of a pickled nn.Module record, or None if obj is no module."""
    if isinstance(obj, torch.nn.Module):
        return obj.__dict__
    if not isinstance(obj, InertRecord):
        return None
    state = obj._pool_state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and "_parameters" in state and "_modules" in state:
        return state
    return None


def _plain(value: Any, limit: int = 1000) -> bool:
    """Whether value is a plain attribute (scalars and tuples of them, at most `limit` items: a
    pickle can nest shared tuples so that a naive walk never ends)."""
    pending = [value]
    while pending:
        item = pending.pop()
        limit -= 1
        if limit < 0:
            return False
        if isinstance(item, tuple):
            pending.extend(item)
        elif not (item is None or isinstance(item, (bool, int, float, str))):
            return False
    return True


# A real encoder's pickle has a few thousand records (ViT-L-14: under 2,000 modules and tensors); a
# file whose structure expands to more than this is a decompression bomb (shared references nested
# in a loop), not a model.
MAX_WALK_ENTRIES = 200_000


class _Walker:
    """Collects the state dict and module tree of whatever a pickle yielded."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, ModuleInfo] = {}
        self.steps = 0
        self.active: set[int] = set()  # ids of the containers on the current path

    def enter(self, obj: Any, prefix: str) -> None:
        self.steps += 1
        if self.steps > MAX_WALK_ENTRIES:
            raise CorruptCheckpointError(
                f"{self.source}: the pickle expands to more than {MAX_WALK_ENTRIES} entries (shared "
                "references nested over and over); no model checkpoint looks like this. The file is "
                "damaged or hostile: download it again from a trusted source.")
        if id(obj) in self.active:
            raise CorruptCheckpointError(
                f"{self.source}: {prefix.rstrip('.') or 'the root object'} contains itself; no model "
                "checkpoint looks like this. The file is damaged: download it again.")

    def module(self, obj: Any, state: dict[str, Any], prefix: str) -> None:
        path = prefix[:-1] if prefix.endswith(".") else prefix
        self.enter(obj, prefix)
        self.active.add(id(obj))
        try:
            self._module(obj, state, prefix, path)
        finally:
            self.active.discard(id(obj))

    def _module(self, obj: Any, state: dict[str, Any], prefix: str, path: str) -> None:
        attrs = {k: v for k, v in state.items() if k not in _MODULE_INTERNALS and _plain(v)}
        self.modules[path] = ModuleInfo(_type_name(obj), attrs)
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, Mapping):
                raise CorruptCheckpointError(f"{self.source}: module {path or '<root>'} has a "
                                             f"{group} of type {type(entries).__name__}")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                self.tensor(value, prefix + name)
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            child_state = _module_state(child)
            if child_state is None:
                raise CorruptCheckpointError(
                    f"{self.source}: submodule {prefix}{name} is a {_type_name(child)}, not a module")
            self.module(child, child_state, f"{prefix}{name}.")

    def tensor(self, value: Any, key: str) -> None:
        self.enter(value, key)
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                f"{self.source}: entry {key} is a {_type_name(value)}, expected a tensor")
        self.tensors[key] = value.detach()

    def any(self, obj: Any, prefix: str) -> None:
        """Walk a state dict, a nested mapping, or a module record."""
        if isinstance(obj, torch.Tensor):
            self.tensor(obj, prefix[:-1] if prefix else "")
            return
        state = _module_state(obj)
        if state is not None:
            self.module(obj, state, prefix)
        elif isinstance(obj, Mapping):
            self.enter(obj, prefix)
            self.active.add(id(obj))
            try:
                for key, value in obj.items():
                    self.any(value, f"{prefix}{key}.")
            finally:
                self.active.discard(id(obj))


def _collect(p: Path, root: Any) -> tuple[dict[str, torch.Tensor], dict[str, ModuleInfo], str | None]:
    walker = _Walker(p)
    wrapper = None
    if isinstance(root, Mapping) and isinstance(root.get("state_dict"), (Mapping, InertRecord)):
        root, wrapper = root["state_dict"], "state_dict"
    walker.any(root, "")
    if not walker.tensors:
        raise CheckpointError(
            f"{p}: holds a {_type_name(root)} with no tensors; expected a model, a state dict or a "
            "classification head.")
    return walker.tensors, walker.modules, wrapper


def read_checkpoint(path: PathLike, *, map_location: Any = None, mmap: bool | None = None,
                    refuse_unsafe: bool = True) -> Checkpoint:
    """Read any supported checkpoint file without running code from it.

    ``mmap`` (default: on for zip and safetensors) maps the tensors from the file instead of
    copying them. With ``refuse_unsafe=False`` a file naming unsafe globals is still read (they
    stay inert records) and they are listed in `Checkpoint.globals`; that is what ``inspect`` uses.
    """
    p = _existing_file(path)
    container = sniff_container(p)
    use_mmap = container in ("zip", "safetensors") if mmap is None else bool(mmap and container in ("zip", "safetensors"))
    bulk = _bulk_device(container, p, map_location, mmap)
    if container == "safetensors":
        read = _safetensors_to(p, bulk) if bulk is not None else None
        tensors, metadata = read if read is not None else _read_safetensors(p, map_location, use_mmap)
        return Checkpoint(p, container, tensors, "safetensors", metadata=metadata)
    reader = RestrictedReader(str(p), refuse_unsafe=refuse_unsafe)
    index = _zip_index(p, offsets=bulk is not None) if container == "zip" else None
    with paused_gc():
        return _read_pickled(p, container, reader, index, map_location, use_mmap, bulk)


def _read_pickled(p: Path, container: str, reader: RestrictedReader, index: ZipIndex | None,
                  map_location: Any, use_mmap: bool, bulk: torch.device | None) -> Checkpoint:
    """The pickled containers: unpickle restrictedly, walk the result, place the tensors."""
    try:
        if bulk is not None and index is not None:
            root = _read_container(p, container, reader, "cpu", True, index)
            tensors, modules, wrapper = _collect(p, root)
            used = {reader.storage_keys.get(t.untyped_storage().data_ptr()) for t in tensors.values()}
            records = _read_records(p, index, {k for k in used if k is not None}, bulk)
            tensors = _zip_tensors_to(tensors, records, reader.storage_keys, bulk)
        else:
            root = _read_container(p, container, reader, map_location, use_mmap, index)
            tensors, modules, wrapper = _collect(p, root)
        if container == "pickle" and map_location is not None:
            device = _device_of(map_location)
            tensors = {k: v.to(device) for k, v in tensors.items()}
    except CheckpointError as exc:
        exc.checkpoint_globals = reader.named_globals  # what was seen before it stopped (inspect)
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch/pickle internals: turn into one clear message
        raise CorruptCheckpointError(
            f"{p}: cannot read this {container} checkpoint ({p.stat().st_size} bytes): "
            f"{type(exc).__name__}: {_short(exc).rstrip('.')}. The file is truncated or damaged: "
            "download it again (compare its size and sha256 with the source).") from exc
    log.debug("read %s (%s): %d tensors", p, container, len(tensors))
    return Checkpoint(p, container, tensors, _type_name(root), modules, reader.named_globals,
                      wrapper=wrapper)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) < 300 else line[:297] + "..."


def load_state_dict(path: PathLike, *, map_location: Any = None,
                    mmap: bool | None = None) -> dict[str, torch.Tensor]:
    """Any supported checkpoint file -> ``{name: Tensor}``, without running code from it."""
    return read_checkpoint(path, map_location=map_location, mmap=mmap).state_dict
