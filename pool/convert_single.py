"""Convert one checkpoint (an image encoder or a classification head) to safetensors, or to a torch
zip state dict for a ``.pt`` / ``.pth`` / ``.bin`` destination: what ``python -m pool convert SRC
DST`` runs, and each file of ``convert --tree`` (`pool.convert`, always safetensors).

The file is read with the restricted reader and never written to; encoders are written with
`ImageEncoder` state-dict keys and heads as ``weight`` / ``bias``, with metadata in a safetensors
file (``format=pt``, ``pool.kind``, the architecture, ``pool.quick_gelu``, the source's sha256,
file name and container, a head's ``normalize``), through `pool.writer.write_checked` (atomic,
read back bit for bit). The destination's format follows its name as for `save_model`
(`pool.saving.torch_format_for`): a torch file keeps tensors only, so one that would lose an
activation, head count or ``normalize=False`` is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from . import __version__
from .arch import name_for_arch
from .checkpoint import Checkpoint, read_checkpoint
from .containers.hf_folder import CONFIG, is_hf_folder, weights_file
from .errors import CheckpointError, DestinationExistsError, PoolError
from .keys import checkpoint_kind
from .modeling import ClassificationHead, ImageEncoder
from .saving import module_payload, torch_format_for
from .writer import compare_tensors, tensor_difference, write_checked

__all__ = ["ConvertResult", "convert_file", "sha256_file", "conversion_payload", "existing_difference",
           "stored_source_sha"]

log = logging.getLogger("pool.convert")  # one logger for every conversion, as --debug shows it


@dataclass
class ConvertResult:
    """What one conversion did (``convert`` prints it; ``as_dict`` is its JSON form).

    Attributes:
        source: the checkpoint converted.
        destination: the file written (safetensors, or a torch zip state dict for ``.pt`` /
            ``.pth`` / ``.bin``).
        kind: ``"encoder"`` or ``"head"`` (empty when the conversion failed before telling).
        ok: whether the destination now holds the source's tensors.
        status: ``"converted"``, ``"up to date"``, ``"same tensors"`` or ``"failed"``.
        error: why it failed, or None.
        model_name: an encoder's open_clip name (None for a custom ViT).
        architecture: an encoder's description, or a head's ``<classes> classes x <dim>``.
        quick_gelu: an encoder's activation, as recorded in the file's metadata.
        normalize: a head's ``normalize`` flag.
        classes: a head's classes.
        tensors: the tensors written (or found).
        bytes: the destination's size.
        source_sha256: the source's sha256, recorded in a safetensors destination's metadata.
        seconds: how long the conversion took.
    """

    source: Path
    destination: Path
    kind: str = ""
    ok: bool = False
    status: str = ""  # "converted", "up to date", "same tensors", "failed"
    error: str | None = None
    model_name: str | None = None
    architecture: str | None = None
    quick_gelu: bool | None = None
    normalize: bool | None = None
    classes: int | None = None
    tensors: int = 0
    bytes: int = 0
    source_sha256: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every field, paths as strings.

        Returns:
            A new dict of the fields.
        """
        out = dict(self.__dict__)
        out["source"], out["destination"] = str(self.source), str(self.destination)
        return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read ``chunk`` bytes at a time (of a transformers model
    folder: of its config.json then its weights file).

    Args:
        path: the file, or a transformers model folder.
        chunk: bytes per read (default 1 MiB).

    Returns:
        The hex digest.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` when it does not exist).
        CorruptCheckpointError: a transformers folder holds only a sharded model.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     sha256_file(f.name)[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    folder = Path(path)
    # a transformers folder: its config and its weights file, in that order
    files = [folder / CONFIG, weights_file(folder)] if is_hf_folder(folder) else [folder]
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def _encoder_module(ckpt: Checkpoint, model_name: str | None) -> tuple[nn.Module, ConvertResult]:
    encoder = ImageEncoder.from_checkpoint(ckpt, model_name=model_name)
    arch = encoder.arch
    res = ConvertResult(ckpt.path, ckpt.path, "encoder", model_name=name_for_arch(arch),
                        architecture=arch.describe(), quick_gelu=arch.quick_gelu)
    return encoder, res


def _head_module(ckpt: Checkpoint) -> tuple[nn.Module, ConvertResult]:
    head = ClassificationHead.from_checkpoint(ckpt)  # validates shapes, resolves normalize
    classes, dim = (int(x) for x in head.weight.shape)
    res = ConvertResult(ckpt.path, ckpt.path, "head", normalize=head.normalize, classes=classes,
                        architecture=f"{classes} classes x {dim}")
    return head, res


def _converted_module(ckpt: Checkpoint, model_name: str | None) -> tuple[nn.Module, ConvertResult]:
    """The encoder or head a conversion of ``ckpt`` writes, and its `ConvertResult` so far."""
    kind = checkpoint_kind(ckpt.state_dict)
    if kind == "encoder":
        return _encoder_module(ckpt, model_name)
    if kind == "head":
        return _head_module(ckpt)
    raise CheckpointError(
        f"{ckpt.path}: neither an image encoder (no visual.conv1.weight) nor a classification head "
        f"(weight [classes, dim] and bias); it holds {', '.join(list(ckpt.state_dict)[:5])} ... "
        "`python -m pool inspect` shows what it is.")


def conversion_payload(ckpt: Checkpoint, model_name: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertResult]:
    """What a conversion of ``ckpt`` writes.

    Args:
        ckpt: the checkpoint read from the source.
        model_name: an open_clip name to check an encoder's weights against; None infers it.

    Returns:
        ``(tensors, metadata, result)``: contiguous unshared tensors, their metadata, and the
        `ConvertResult` filled with what the checkpoint is.

    Raises:
        CheckpointError: it is neither an image encoder nor a classification head.
    """
    module, res = _converted_module(ckpt, model_name)
    return *module_payload(module), res


def existing_difference(destination: Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """How an existing destination differs from what a conversion would write.

    Args:
        destination: the existing file.
        tensors: the tensors the conversion would write.

    Returns:
        None when ``destination`` already holds exactly ``tensors``, else how it differs.
    """
    try:
        held = read_checkpoint(destination, mmap=False, cache_dir=False).state_dict
    except PoolError as exc:
        return f"it cannot be read: {exc}"
    return tensor_difference(held, tensors)


def stored_source_sha(path: Path) -> str | None:
    """The source sha256 a file converted by pool records.

    Args:
        path: an existing destination.

    Returns:
        Its ``pool.source_sha256`` metadata; None for a file that is not ours or cannot be read.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("pool.source_sha256")
    except Exception:  # noqa: BLE001 - not ours / unreadable: treated as a foreign file
        return None


def convert_file(source: str | Path, destination: str | Path, *, force: bool = False,
                 model_name: str | None = None, source_sha256: str | None = None,
                 keep_current: bool = False) -> ConvertResult:
    """Convert one checkpoint (encoder or head) to safetensors, or to a torch zip state dict when
    ``destination`` ends in ``.pt``, ``.pth`` or ``.bin`` (as `save_model` writes); see the module
    docstring. The file written gets the mode of the file it replaces, else what ``open`` gives
    under the umask (`pool.writer.written_mode`).

    ``keep_current``: an existing destination converted earlier from the same source bytes (its
    ``pool.source_sha256``) is read back and compared instead of rewritten (status "up to date");
    one that holds exactly the tensors this conversion would write is kept too ("same tensors");
    any other raises DestinationExistsError.

    Args:
        source: the checkpoint to convert (any container; ``~`` is expanded). It is read with
            the restricted reader and never written to.
        destination: the file to write; its folder must exist. A name ending in ``.pt``, ``.pth``
            or ``.bin`` gets a torch zip state dict (``torch.load(weights_only=True)`` reads it;
            no metadata), any other name safetensors.
        force: replace an existing destination.
        model_name: an open_clip name to check an encoder's weights against; None infers the
            architecture from them.
        source_sha256: the source's sha256 when already known (`plan_tree` computes it); None
            computes it.
        keep_current: keep an existing destination that already holds the source's tensors,
            as described above.

    Returns:
        The `ConvertResult`, ``ok`` True and ``status`` ``"converted"``, ``"up to date"`` or
        ``"same tensors"``.

    Raises:
        DestinationExistsError: the destination exists (without ``force``, or with
            ``keep_current`` but other tensors), is a directory or the source itself, or its
            folder does not exist.
        CheckpointNotFoundError: the source does not exist.
        UnsafeCheckpointError: the source names a global that could run code.
        CorruptCheckpointError: the source is damaged, or the file written (or kept) does not
            read back bit for bit as meant (nothing is replaced).
        CheckpointError: the source is neither an image encoder nor a classification head, or
            cannot be used otherwise.
        ArchitectureMismatchError: an encoder's weights are no ViT image tower this loader
            builds, or not the one ``model_name`` names; a head's tensors are inconsistent.
        ConfigError: ``model_name`` is no open_clip ViT config this loader can build, or a
            ``.pt`` / ``.pth`` / ``.bin`` destination could not carry the model's activation, head
            count or ``normalize=False`` (`pool.saving.torch_format_for`): write safetensors.

    Example:
        >>> from pool.convert import convert_file
        >>> result = convert_file("ViT-B-32/Cars/finetuned.pt", "cars.safetensors")  # doctest: +SKIP
        >>> result.status, result.kind, result.model_name  # doctest: +SKIP
        ('converted', 'encoder', 'ViT-B-32')
    """
    start = time.perf_counter()
    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    if dst.is_dir():
        raise DestinationExistsError(f"{dst} is a directory; give the destination file name.")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise DestinationExistsError(f"{dst} is the source itself; the source is never overwritten.")
    if dst.exists() and not force and not keep_current:
        raise DestinationExistsError(
            f"{dst} exists; refusing to overwrite it. Pass --force to replace it, or choose another "
            "destination.")
    if not dst.parent.is_dir():
        raise DestinationExistsError(f"{dst.parent} is not an existing folder; create it first.")
    ckpt = read_checkpoint(src, cache_dir=False)
    digest = source_sha256 or sha256_file(src)
    module, res = _converted_module(ckpt, model_name)
    torch_format = torch_format_for(module, dst)  # as save_model: .pt / .pth / .bin, else safetensors
    tensors, meta = module_payload(module)
    meta.update({"format": "pt", "pool.source_sha256": digest, "pool.source_name": src.name,
                 "pool.source_container": ckpt.container, "pool.writer": f"openclip-pool {__version__}"})
    res.source, res.destination, res.source_sha256 = src, dst, digest
    res.tensors = len(tensors)
    if dst.exists() and not force:
        if stored_source_sha(dst) == digest:
            compare_tensors(read_checkpoint(dst, mmap=False, cache_dir=False).state_dict, tensors,
                            f"{dst} (converted earlier from {src}; pass --force to rewrite it)")
            res.status = "up to date"
        else:
            difference = existing_difference(dst, tensors)
            if difference is not None:
                raise DestinationExistsError(
                    f"{dst} exists and does not hold {src}'s tensors ({difference}); refusing to "
                    "overwrite it. Pass --force to replace it.")
            res.status = "same tensors"
        res.ok, res.bytes = True, dst.stat().st_size
        res.seconds = time.perf_counter() - start
        return res
    res.bytes = write_checked(tensors, meta, dst, torch_format=torch_format)
    res.ok, res.status = True, "converted"
    res.seconds = time.perf_counter() - start
    log.info("converted %s -> %s (%d tensors) in %.3f s", src, dst, res.tensors, res.seconds)
    return res
