"""Tensors made by our own code, after validation, over bytes that exist.

A pickle only *describes* tensors: a storage record (key, element type, size) and a view into it
(offset, shape, strides, dtype). `TensorSpec` holds that description; `materialize` turns specs
into tensors over the storages a container actually read, after checking, with exact integer
arithmetic, that every view lies inside bytes that are there. Nothing is ever allocated from a
size the file claims, so no tensor can hold the loader's own uninitialised memory.

Knows torch dtypes; nothing of pickles, containers or models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError, brief

__all__ = ["StorageRef", "TensorSpec", "materialize", "move", "move_by_location", "STORAGE_DTYPES", "DTYPES",
           "INT_LIMIT"]

#: legacy storage class names (``torch.FloatStorage`` ...) -> element dtype
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
#: ``torch.<name>`` dtype globals a pickle may name (``_rebuild_tensor_v3``) -> dtype
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in (
        "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long",
        "int32", "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128",
        "cfloat", "cdouble", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
    ) if isinstance(getattr(torch, name, None), torch.dtype)
}
_ALLOWED = frozenset(DTYPES.values()) | frozenset(STORAGE_DTYPES.values())


@dataclass(frozen=True)
class StorageRef:
    """A storage a pickle refers to: the container's key for its bytes, its element type and size.

    Attributes:
        key: the container's key for the storage's bytes (``data/<key>`` in a torch zip).
        dtype: the element type its storage class names (``torch.FloatStorage``: float32).
        numel: the elements it claims (checked against the bytes that are there).
        byte_offset: a legacy view's byte offset into its root storage (0 otherwise).
        root_numel: a legacy view's root storage size in elements; -1 when it is no view.
        location: where the writer's storage was (``"cpu"``, ``"cuda:0"``): what a dict
            ``map_location`` maps.
    """

    key: str
    dtype: torch.dtype
    numel: int
    byte_offset: int = 0
    root_numel: int = -1  # a legacy view's root storage size in elements (-1: not a view)
    location: str = "cpu"  # where the writer's storage was ("cpu", "cuda:0"): what a dict map_location maps


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a pickle describes: a view of ``dtype`` into ``storage``.

    Attributes:
        storage: the storage the view is into.
        dtype: the tensor's element type.
        offset: the view's offset into the storage, in elements.
        size: the tensor's shape.
        stride: its strides, in elements.
    """

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


INT_LIMIT = 1 << 62  # sizes, strides, offsets and keys beyond this fit no file and overflow int64
_MAX_EXPANSION = 4  # tensors may take this many times the file's size once copied ...
_EXPANSION_SLACK = 64 << 20  # ... plus this (small files with legitimately shared views)


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < INT_LIMIT


def _check_shape(spec: TensorSpec, name: str, source: str) -> None:
    """Refuse a dtype off the allowlist and sizes, strides or offsets that are no bounded counts."""
    if spec.dtype not in _ALLOWED:
        raise CorruptCheckpointError(f"{source}: tensor {brief(name)} has dtype {spec.dtype}, which is not read "
                                     "here; the file is damaged or not a model checkpoint.")
    size, stride, offset = spec.size, spec.stride, spec.offset
    if not (_is_count(offset) and len(size) == len(stride) and len(size) <= 64
            and all(map(_is_count, size)) and all(map(_is_count, stride))):
        raise CorruptCheckpointError(
            f"{source}: tensor {brief(name)} has a malformed shape (size {brief(size)}, stride "
            f"{brief(stride)}, offset {brief(offset)}); the file is damaged: download it again.")


def _check_spec(spec: TensorSpec, nbytes: int, name: str, source: str) -> None:
    """Refuse a view that reaches past the ``nbytes`` of its storage (shape already checked)."""
    size, stride, offset = spec.size, spec.stride, spec.offset
    itemsize = spec.dtype.itemsize
    if math.prod(size) == 0:
        return
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if (last + 1) * itemsize > nbytes:
        raise CorruptCheckpointError(
            f"{source}: tensor {brief(name)} of shape {tuple(size)} (offset {offset}) needs "
            f"{(last + 1) * itemsize} bytes of its storage but the storage holds {nbytes}; the file "
            "is truncated or damaged: download it again.")


def move(tensors: Mapping[str, torch.Tensor], device: torch.device | None) -> dict[str, torch.Tensor]:
    """The tensors on ``device``, each storage moved once.

    Views of one storage stay views of one storage there, rather than becoming copies each.

    Args:
        tensors: tensors by key.
        device: the target device; None or a CPU device leaves the tensors as they are.

    Returns:
        A new dict of the tensors on ``device`` (the same tensors for None or the CPU).
    """
    if device is None or device.type == "cpu":
        return dict(tensors)
    moved: dict[tuple[int, int], torch.UntypedStorage] = {}
    out = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        target = moved.get(key)
        if target is None:
            target = moved[key] = _bytes(storage).to(device).untyped_storage()
        out[name] = torch.empty(0, dtype=tensor.dtype, device=device).set_(
            target, tensor.storage_offset(), tensor.size(), tensor.stride())
    return out


def move_by_location(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec],
                     locations: Mapping[str, torch.device]) -> dict[str, torch.Tensor]:
    """``torch.load``'s dict ``map_location``: each tensor goes to the device ``locations`` gives
    its storage's saved location; a location the dict does not name stays on the CPU (pool never
    puts a tensor on an accelerator it was not asked for). Each storage is moved once.

    Args:
        tensors: tensors by key.
        specs: their specs, whose storages' saved locations are looked up.
        locations: saved location (``"cuda:0"``) -> device.

    Returns:
        A new dict of the tensors, in the same order, on their devices.
    """
    groups: dict[torch.device | None, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        spec = specs.get(name)
        groups.setdefault(locations.get(spec.storage.location if spec else "cpu"), {})[name] = tensor
    placed: dict[str, torch.Tensor] = {}
    for device, group in groups.items():
        placed.update(move(group, device))
    return {name: placed[name] for name in tensors}


def _aligned(storage: torch.UntypedStorage, alignment: int = 64) -> torch.UntypedStorage:
    """``storage``, or a copy of it at an aligned address if it starts misaligned.

    Args:
        storage: the storage (a slice of a mapped file may start anywhere).
        alignment: the alignment wanted, in bytes.

    Returns:
        ``storage`` itself when its address is a multiple of ``alignment`` (or it is empty),
        else an aligned copy.
    """
    if storage.data_ptr() % alignment == 0 or storage.nbytes() == 0:
        return storage
    return _bytes(storage).clone().untyped_storage()


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor viewing all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _logical_bytes(specs: Mapping[str, TensorSpec]) -> int:
    """The bytes the tensors would take if each were copied (views and broadcasts counted in full).

    Args:
        specs: tensor specs by key (their sizes must already be bounded integers).

    Returns:
        The sum over the specs of elements times element size.
    """
    return sum(math.prod(s.size) * s.dtype.itemsize for s in specs.values())


def materialize(specs: Mapping[str, TensorSpec], storages: Mapping[str, torch.UntypedStorage],
                source: str, file_size: int) -> dict[str, torch.Tensor]:
    """Tensors for ``specs`` over ``storages`` (container key -> the bytes read), each checked.

    Views may overlap (an expanded tensor has stride 0), but what the tensors would take once
    copied (a dtype cast, a move to another device) is bounded by the file's size: a few bytes
    cannot stand for gigabytes of weights.

    Args:
        specs: the tensors a pickle (or a safetensors header) describes, by key.
        storages: the bytes the container read, by container key.
        source: how error messages name the file.
        file_size: the file's size in bytes, which bounds what the tensors may take.

    Returns:
        The tensors by key, views over ``storages`` (a misaligned storage is copied once).

    Raises:
        CorruptCheckpointError: a dtype off the allowlist, a malformed shape, a view reaching
            past its storage, a storage the file does not hold or that claims more bytes than are
            there, or tensors that would take more than `_MAX_EXPANSION` times the file's size
            (plus `_EXPANSION_SLACK`) once copied.
    """
    for name, spec in specs.items():  # shapes first: bounded integers before any arithmetic on them
        _check_shape(spec, name, source)
    total = _logical_bytes(specs)
    if total > _MAX_EXPANSION * file_size + _EXPANSION_SLACK:
        raise CorruptCheckpointError(
            f"{source}: its tensors would take {total:,} bytes once copied, from a file of {file_size:,}: "
            "they are views of the same bytes over and over (broadcast or aliased). No checkpoint looks "
            "like this; the file is crafted or damaged.")
    views: dict[tuple[str, int, int], torch.UntypedStorage] = {}
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        storage = _storage_for(spec, name, storages, views, source)
        out[name] = torch.empty(0, dtype=spec.dtype, device=storage.device).set_(
            storage, spec.offset, spec.size, spec.stride)
    return out


def _storage_for(spec: TensorSpec, name: str, storages: Mapping[str, torch.UntypedStorage],
                 views: dict[tuple[str, int, int], torch.UntypedStorage], source: str) -> torch.UntypedStorage:
    """The bytes a spec's storage reference stands for (a slice of what the container read, made
    once per reference in ``views``), checked to hold the spec's view; copied once if misaligned."""
    ref = spec.storage
    root = storages.get(ref.key)
    if root is None:
        raise CorruptCheckpointError(
            f"{source}: tensor {brief(name)} refers to storage {brief(ref.key)}, which the file does not "
            "hold; the file is damaged: download it again.")
    claimed = ref.numel * ref.dtype.itemsize
    key = (ref.key, ref.byte_offset, claimed)
    storage = views.get(key)
    if storage is None:
        if ref.byte_offset + claimed > root.nbytes():
            raise CorruptCheckpointError(
                f"{source}: storage {ref.key!r} claims {claimed} bytes but only "
                f"{max(0, root.nbytes() - ref.byte_offset)} are there (from byte {ref.byte_offset}); "
                "the file is truncated or damaged: download it again.")
        storage = root
        if ref.byte_offset or claimed < root.nbytes():
            storage = root[ref.byte_offset:ref.byte_offset + claimed]
        views[key] = storage
    _check_spec(spec, storage.nbytes(), name, source)
    if storage.data_ptr() % spec.dtype.itemsize:  # misaligned for this dtype: one aligned copy
        key = (ref.key, ref.byte_offset, -claimed - 1)
        copy = views.get(key)
        if copy is None:
            copy = views[key] = _aligned(storage)
        storage = copy
    return storage
