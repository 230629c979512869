"""What a checkpoint file is, without running anything from it (``python -m pool inspect``).

The file is read with ``refuse_unsafe=False``: globals that could run code become inert records
and are listed, flagged. A file that cannot be read as a checkpoint (a pure exploit with no
tensors, say) still lists the globals its pickle named before reading stopped: the reader attaches
them to the error (``CheckpointError.checkpoint_globals``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arch import infer_arch, name_for_arch
from .checkpoint import read_checkpoint, sniff_container
from .containers import REGISTRY
from .containers.hf_folder import NAME as HF_FOLDER
from .errors import ArchitectureMismatchError, CheckpointError, UnsafeCheckpointError
from .keys import checkpoint_kind, describe_layout, strip_ddp, to_clip_keys, to_clip_modules
from .unpickler import GlobalName

__all__ = ["Inspection", "inspect_file", "CONTAINER_NAMES"]

log = logging.getLogger(__name__)

CONTAINER_NAMES = {container.name: container.description for container in REGISTRY}
CONTAINER_NAMES[HF_FOLDER] = "transformers model folder (config.json beside model.safetensors or pytorch_model.bin)"


@dataclass
class Inspection:
    """What `inspect_file` found in one file (``python -m pool inspect`` prints it).

    Attributes:
        path: the file (or transformers model folder).
        size: its size in bytes (a folder's: the sum of the files in it).
        sha256: its sha256 (hex), as the caller gave it.
        container: its container (`pool.checkpoint.sniff_container`; ``hf`` for a folder).
        root_type: the class of the root object (``src.modeling.ImageEncoder``,
            ``collections.OrderedDict``; ``"safetensors"`` for safetensors); None when the
            file could not be read.
        kind: ``"encoder"``, ``"head"`` or ``"unknown"``.
        description: one line for people: the architecture, or why the file is neither.
        architecture: an encoder's `pool.arch.VisionArch` fields plus ``model_name``, or a head's
            ``classes``, ``input_dim`` and ``normalize``; None otherwise.
        key_layout: how the tensors are named (`pool.keys.describe_layout`).
        tensors: the number of tensors.
        parameters: their elements, in all.
        dtypes: tensors per dtype name (``float32``), the commonest first.
        globals: every global the file names, unsafe ones flagged.
        metadata: the file's metadata (safetensors).
        attributes: the root module's plain attributes (a head's ``normalize``).
        error: why no state dict could be read (globals may still be listed); None if it was.
        refusal: why a load refuses the file as unsafe (a global on no allowlist, or an allowed
            one used as no writer uses it); None if a load does not.
    """

    path: Path
    size: int
    sha256: str
    container: str
    root_type: str | None = None
    kind: str = "unknown"  # encoder, head, unknown
    description: str = ""
    architecture: dict[str, Any] | None = None
    key_layout: str | None = None
    tensors: int = 0
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    globals: list[GlobalName] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why no state dict could be read (globals may still be listed)
    refusal: str | None = None  # why a load refuses the file as unsafe (a global, or its misuse)

    @property
    def unsafe(self) -> list[str]:
        """The globals on the unsafe list, as ``module.name`` strings (terminal-safe)."""
        return [str(g) for g in self.globals if g.unsafe]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``python -m pool inspect --json`` prints.

        Returns:
            Every field (``path`` as ``file``, globals as ``{"name", "unsafe", "verdict", "role",
            "writer"}`` objects) plus ``unsafe_globals`` and ``refusal`` (why a load refuses the
            file, or None); attributes other than booleans, numbers and strings are left out.
        """
        return {
            "file": str(self.path), "size": self.size, "sha256": self.sha256,
            "container": self.container, "root_type": self.root_type, "kind": self.kind,
            "description": self.description, "architecture": self.architecture,
            "key_layout": self.key_layout, "tensors": self.tensors, "parameters": self.parameters,
            "dtypes": self.dtypes,
            "globals": [{"name": str(g), "unsafe": g.unsafe, "verdict": g.verdict, "role": g.role,
                         "writer": g.writer} for g in self.globals],
            "unsafe_globals": self.unsafe, "refusal": self.refusal, "metadata": self.metadata,
            "attributes": {k: v for k, v in self.attributes.items() if isinstance(v, (bool, int, float, str))},
            "error": self.error,
        }


def inspect_file(path: str | Path, sha256: str, allow_globals: Iterable[str] | None = None) -> Inspection:
    """Describe one checkpoint file, without running anything from it.

    Raises CheckpointError only when it is missing or no container at all; a file that cannot be
    read as a checkpoint comes back with ``error`` set (and the globals named before reading
    stopped). The file is read with ``refuse_unsafe=False``: every global is listed with the
    allowlist's verdict (`pool.allowlist`); ``refusal`` says why a load would refuse the file (a
    global on no allowlist, or an allowed one used as no writer uses it).
    An encoder whose architecture cannot be read comes back as kind ``"unknown"``, saying why.

    Args:
        path: the file, or a transformers model folder (``~`` is expanded).
        sha256: its sha256 (`pool.convert.sha256_file`), reported as given.
        allow_globals: globals the user accepts besides the allowlist (their verdict says so).

    Returns:
        The `Inspection`.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CorruptCheckpointError: it is a directory that is no transformers model folder, a pipe or
            device, empty, or no known container.
        CheckpointError: it is a tar archive (torch's pre-1.0 format).

    Example:
        >>> from pool.convert import sha256_file
        >>> from pool.inspection import inspect_file
        >>> info = inspect_file("finetuned.pt", sha256_file("finetuned.pt"))  # doctest: +SKIP
        >>> info.kind, info.container, info.unsafe  # doctest: +SKIP
        ('encoder', 'zip', [])
    """
    p = Path(path).expanduser()
    container = sniff_container(p)
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
    info = Inspection(p, size, sha256, container)
    try:
        read_checkpoint(p, allow_globals=allow_globals, cache_dir=False, mmap=True)  # what a load decides
    except UnsafeCheckpointError as exc:
        info.refusal = str(exc)
    except CheckpointError:
        pass  # the listing read below says what is wrong
    try:
        ckpt = read_checkpoint(p, refuse_unsafe=False, allow_globals=allow_globals, cache_dir=False, mmap=True)
    except CheckpointError as exc:
        info.error = str(exc)
        info.globals = list(exc.checkpoint_globals)
        return info
    info.root_type = ckpt.root_type
    info.globals = list(ckpt.globals)
    info.metadata = dict(ckpt.metadata)
    info.attributes = ckpt.attributes
    sd = ckpt.state_dict
    info.tensors = len(sd)
    info.parameters = sum(t.numel() for t in sd.values())
    info.dtypes = dict(Counter(str(t.dtype).removeprefix("torch.") for t in sd.values()).most_common())
    info.key_layout = describe_layout(list(sd), ckpt.wrapper)
    kind = checkpoint_kind(sd)
    if kind == "encoder":
        clip = to_clip_keys(sd, source=str(p))
        modules = to_clip_modules(ckpt.modules) or None
        try:
            arch = infer_arch(clip, modules, source=str(p))
        except ArchitectureMismatchError as exc:
            info.description = f"encoder? ({exc})"
            return info
        name = name_for_arch(arch)
        info.kind = "encoder"
        info.architecture = {"model_name": name, **arch.as_dict()}
        info.description = f"encoder: {name or 'a custom ViT'} ({arch.describe()})"
        return info
    if kind == "head":
        weight = strip_ddp(sd)["weight"]
        stored = ckpt.attributes.get("normalize", ckpt.metadata.get("normalize"))
        norm = f"normalize={stored}" if stored is not None else "normalize not stored (loads as True)"
        info.kind = "head"
        info.architecture = {"classes": int(weight.shape[0]), "input_dim": int(weight.shape[1]),
                             "normalize": stored}
        info.description = f"head: {weight.shape[0]} classes x {weight.shape[1]}, {norm}"
        return info
    info.description = "neither a ViT image encoder nor a classification head"
    return info
