"""What single records of an unpickled checkpoint stand for, read from their names alone.

`pool.unpickler` turns a pickle into plain data and inert records (`pool.inert`). `ValueReader`
reads one record the way torch's own loader would interpret it, without calling anything: the
tensor rebuild records (``torch._utils._rebuild_tensor_v2`` ...) become `TensorSpec`s, ``OrderedDict``
records become dicts, sets and ``torch.Size`` plain values, ``torch.storage._load_from_bytes`` blobs
go to the container's own legacy parser; anything else stays a record, never called. `pool.records`
walks the module tree over it.

Knows torch names and dtypes; nothing of containers' bytes or of open_clip.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import CorruptCheckpointError, brief
from .inert import CallRecord, GlobalRecord, PersistentRecord, Record, global_of
from .tensors import DTYPES, INT_LIMIT, STORAGE_DTYPES, StorageRef, TensorSpec
from .unpickler import InPlaceBytes

__all__ = ["ValueReader", "type_name", "call_name", "storage_from_pid", "record_bytes", "is_key", "MAPPINGS", "SETS",
           "MAX_WALK_ENTRIES", "MAX_DEPTH"]

# A real encoder's pickle has a few thousand records (ViT-L-14: under 2,000 modules and tensors); a
# structure that expands to more than this is a decompression bomb, not a model.
MAX_WALK_ENTRIES = 200_000
MAX_DEPTH = 100

_TENSOR_REBUILDERS = frozenset({"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                                "torch._utils._rebuild_tensor_v3"})
_PARAMETER_REBUILDERS = frozenset({"torch._utils._rebuild_parameter",
                                   "torch._utils._rebuild_parameter_with_state",
                                   "torch.nn.parameter.Parameter"})
_FROM_TYPE = frozenset({"torch._tensor._rebuild_from_type_v2"})
_TENSOR_RECORDS = _TENSOR_REBUILDERS | _PARAMETER_REBUILDERS | _FROM_TYPE
_TENSOR_TYPES = frozenset({"torch.Tensor", "torch.nn.parameter.Parameter"})
MAPPINGS = frozenset({"collections.OrderedDict", "builtins.dict"})
SETS = frozenset({"builtins.set", "builtins.frozenset"})
_CALLED = MAPPINGS | SETS | {"torch.Size", "torch.storage._load_from_bytes", "_codecs.encode"}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")
_LOCATION = re.compile(r"cpu|cuda(:[0-9]{1,3})?")


def type_name(obj: Any) -> str:
    """The class a record stands for (``module.Name``), or the Python type of plain data.

    Args:
        obj: plain data or a record.

    Returns:
        ``module.Name`` (``(...)`` added per call of a call), for messages.
    """
    calls = 0
    while isinstance(obj, CallRecord) and calls < 3:  # a call of a call of ...: bounded
        obj, calls = obj.func, calls + 1
    suffix = "(...)" * calls
    if isinstance(obj, CallRecord):
        return "a chain of calls" + suffix
    name = global_of(obj)
    if name is not None:
        return name + suffix
    if isinstance(obj, Record) and call_name(obj) == "copyreg._reconstructor" and obj.args:
        return (global_of(obj.args[0]) or "copyreg._reconstructor") + suffix
    if isinstance(obj, StorageRef):
        return "torch storage"
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}{suffix}"


def call_name(obj: Any) -> str | None:
    """``module.name`` of the global a record instance is a call of.

    Args:
        obj: anything the unpickler produced.

    Returns:
        The global's ``module.name``, or None when ``obj`` is no call of a global.
    """
    return global_of(obj) if isinstance(obj, GlobalRecord) else None


def storage_from_pid(pid: Any, source: str) -> StorageRef:
    """A torch persistent id ``('storage', StorageClass, key, location, numel[, view])`` as a ref.

    The storage class must be a torch storage class (``torch.FloatStorage``, ...; the
    ``torch.cuda`` twins read as CPU ones); a legacy view's offset and size are checked.

    Args:
        pid: the persistent id, as the unpickler handed it over.
        source: how error messages name the file.

    Returns:
        The `StorageRef` (container key ``str(key)``, element dtype, element count, a view's
        byte offset, the saved location).

    Raises:
        CorruptCheckpointError: ``pid`` is no torch storage reference, names a storage class
            that is not read here, or has a key, size or view that is no bounded count.
    """
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise CorruptCheckpointError(f"{source}: a persistent id that is no torch storage reference "
                                     f"({type(pid).__name__} of {len(pid) if isinstance(pid, tuple) else 1})"
                                     "; the file is damaged or not a torch checkpoint.")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    name = global_of(storage_type) or ""
    module, _, cls = name.rpartition(".")
    dtype = STORAGE_DTYPES.get(cls) if module in _STORAGE_MODULES else None
    if dtype is None:
        raise CorruptCheckpointError(f"{source}: a storage of type {name or type(storage_type).__name__!r}, "
                                     "which is not read here; the file is damaged or not a checkpoint.")
    if not (is_key(key) and type(numel) is int and 0 <= numel < INT_LIMIT):
        raise CorruptCheckpointError(f"{source}: a storage reference with key {brief(key)} and size "
                                     f"{brief(numel)}; the file is damaged: download it again.")
    offset, root_numel = 0, -1
    view = pid[5] if len(pid) == 6 else None
    if view is not None:  # legacy storage views: (view_key, offset, size) into the root storage
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
                and 0 <= view[1] < INT_LIMIT and 0 <= view[2] < INT_LIMIT):
            raise CorruptCheckpointError(f"{source}: a malformed storage view {brief(view)}; the file is damaged.")
        offset, root_numel, numel = view[1] * dtype.itemsize, numel, view[2]
    location = pid[3]
    if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
        raise CorruptCheckpointError(f"{source}: a storage saved at location {brief(location)}; torch writes "
                                     "'cpu' or 'cuda[:N]' and its reader refuses other tags (or, for 'meta', "
                                     "returns no data). The file is damaged or crafted.")
    return StorageRef(str(key), dtype, numel, offset, root_numel, location)


class ValueReader:
    """Reads single records as the values they stand for (tensors, storages, mappings, sets),
    within the walk's budget of `MAX_WALK_ENTRIES` steps and `MAX_DEPTH` levels.

    Args:
        source: how error messages name the file.
        blob: reads a ``torch.storage._load_from_bytes`` record; None refuses them.
    """

    def __init__(self, source: str, blob: Callable[[Record], StorageRef] | None) -> None:
        self.source = source
        self.blob = blob
        self.steps = 0
        self.mappings: dict[int, dict] = {}  # id(mapping record) -> its dict, built once
        self.reached: set[int] = set()  # ids of the tensor records interpreted

    def fail(self, what: str) -> CorruptCheckpointError:
        """The error for a checkpoint holding something no writer writes.

        Args:
            what: what was found, and where.

        Returns:
            The `CorruptCheckpointError` to raise.
        """
        return CorruptCheckpointError(f"{self.source}: {what}; the file is damaged or not a model "
                                      "checkpoint: download it again from a trusted source.")

    def charge(self, steps: int, where: str) -> None:
        """Count work against the walk's budget (entries visited, items looked at).

        Args:
            steps: how much work.
            where: the entry being read, for the message.

        Raises:
            CorruptCheckpointError: the walk went past `MAX_WALK_ENTRIES` steps.
        """
        self.steps += steps
        if self.steps > MAX_WALK_ENTRIES:
            raise self.fail(f"the pickle expands to more than {MAX_WALK_ENTRIES} entries (shared "
                            "references nested over and over)")

    def enter(self, obj: Any, where: str, depth: int) -> None:
        """Count one visit of ``obj``, and refuse a structure nested past `MAX_DEPTH`.

        Args:
            obj: what is visited.
            where: its key or module path, for messages.
            depth: how deep it sits.

        Raises:
            CorruptCheckpointError: past the walk's budget or depth.
        """
        self.charge(1, where)
        if depth > MAX_DEPTH:
            raise self.fail(f"{where or 'the root'} nests more than {MAX_DEPTH} levels deep")

    # -- values --------------------------------------------------------------------------------
    def value(self, obj: Any, where: str, depth: int) -> Any:
        """Interpret a record as the plain value it stands for, where one is defined.

        Args:
            obj: plain data or a record.
            where: its key or module path, for messages.
            depth: how deep it sits.

        Returns:
            A `TensorSpec`, a storage reference, a dict, tuple or set, the plain data itself, or
            the record itself when it stands for no value read here.

        Raises:
            CorruptCheckpointError: a record no writer writes (a tensor given a state, a mapping
                made from arguments, ...).
        """
        self.enter(obj, where, depth)
        if isinstance(obj, StorageRef | TensorSpec) or not isinstance(obj, Record):
            return obj
        name = call_name(obj)
        if isinstance(obj, PersistentRecord):
            if not obj.untouched:
                raise self.fail(f"{where}: a storage reference modified by the pickle (BUILD or items)")
            return obj.value
        if name in _TENSOR_RECORDS:
            return self._tensor_record(obj, name, where, depth)
        if name == "torch.storage._load_from_bytes":
            if self.blob is None:
                raise self.fail(f"{where}: a storage blob that cannot be read here")
            return self.blob(obj)
        if not obj.called and obj.args and name in _CALLED:
            raise self.fail(f"{where}: a {name} made with NEWOBJ from arguments (its reader would ignore "
                            "them); no writer does this")
        return self._container(obj, name, where, depth)

    def _tensor_record(self, obj: Record, name: str, where: str, depth: int) -> TensorSpec:
        """A tensor, parameter or tensor-subclass record, made by a plain call and given no state."""
        if obj.state is not None:
            raise self.fail(f"{where}: a tensor whose state is set afterwards (BUILD); torch never "
                            "writes this")
        self.reached.add(id(obj))
        if obj.kwargs or not (obj.called or name == "torch.nn.parameter.Parameter"):
            raise self.fail(f"{where}: a tensor record made without a plain call (NEWOBJ or keyword "
                            "arguments); torch never writes this and its reader would refuse it")
        if name in _TENSOR_REBUILDERS:
            return self._tensor(obj, name, where, depth)
        if name in _PARAMETER_REBUILDERS:
            data = self.value(obj.args[0] if obj.args else None, where, depth + 1)
            if not isinstance(data, TensorSpec):  # Parameter(None) is an empty tensor to torch
                raise self.fail(f"{where}: a parameter over a {type_name(data)}, not a tensor")
            self._parameter(obj, name, data, where, depth)
            return data
        return self._from_type(obj, where, depth)

    def _container(self, obj: Record, name: str | None, where: str, depth: int) -> Any:
        """A ``torch.Size``, mapping, ``Counter`` or set record as its value; any other record as it is."""
        if name == "torch.Size" and len(obj.args) == 1:
            return tuple(self._sequence(obj.args[0], where, depth))
        if name in MAPPINGS:
            return self._mapping(obj, where, depth)
        if name == "collections.Counter":
            if obj.args or obj.kwargs:
                raise self.fail(f"{where}: a Counter built from arguments (it would count them, not map them)")
            return self._mapping(obj, where, depth)
        if name in SETS:
            items = self._sequence(obj.args[0], where, depth) if obj.args else []
            return {x for x in items if isinstance(x, str)}
        return obj

    def _sequence(self, obj: Any, where: str, depth: int) -> list:
        """A list, tuple or set the pickle built (never anything a record would compute)."""
        value = self.value(obj, where, depth + 1)
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise self.fail(f"{where}: expected a sequence, found {type_name(value)}")
        self.charge(len(value), where)
        return list(value)

    def _mapping(self, obj: Record, where: str, depth: int) -> dict:
        if obj.state is not None and not isinstance(obj.state, dict):
            raise self.fail(f"{where}: a mapping given a state that is not a dict")
        cached = self.mappings.get(id(obj))
        if cached is not None:
            self.charge(len(cached), where)
            return cached
        out: dict = {}
        pairs: list = []
        if obj.args:
            first = obj.args[0]
            if isinstance(first, dict):
                pairs.extend(first.items())
            elif isinstance(first, (list, tuple)):
                pairs.extend(first)
            else:
                raise self.fail(f"{where}: a mapping record built from {type_name(first)}")
        pairs.extend(obj.items or ())
        self.charge(len(pairs), where)
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise self.fail(f"{where}: a mapping entry that is not a key-value pair")
            key, value = pair
            if not is_key(key):
                raise self.fail(f"{where}: a mapping key {brief(key)} (expected a name)")
            out[key] = value
        self.mappings[id(obj)] = out
        return out

    def empty(self, obj: Any, where: str, depth: int) -> bool:
        """Whether a recorded value is empty: None, or a mapping or sequence with nothing in it.

        Args:
            obj: plain data or a record.
            where: its key or module path, for messages.
            depth: how deep it sits.

        Returns:
            True when it is None or an empty mapping or sequence with no state or items added.
        """
        if obj is None:
            return True
        if type(obj).__mro__[1] is GlobalRecord and obj.record_name == "collections.OrderedDict":
            # torch's backward hooks: OrderedDict() called with nothing (the common case, quickly)
            return obj.called and not obj.args and not obj.kwargs and obj.items is None and obj.state is None
        value = self.value(obj, where, depth + 1)
        return isinstance(value, (dict, list, tuple)) and not value and not (
            isinstance(obj, Record) and (obj.state is not None or obj.items))

    def _parameter(self, obj: Record, name: str, data: TensorSpec, where: str, depth: int) -> None:
        """Refuse a parameter record whose hooks or state torch would apply (other weights), or an
        integer one that requires grad (torch refuses to build it); ``data`` is its tensor's value."""
        args = obj.args
        if name == "torch.nn.parameter.Parameter":
            if not args or len(args) > 2 or (len(args) == 2 and type(args[1]) is not bool):
                raise self.fail(f"{where}: a Parameter record with {len(args)} arguments")
            return
        if len(args) > 1 and args[1] is True and not (
                data.dtype.is_floating_point or data.dtype.is_complex):
            raise self.fail(f"{where}: an integer parameter that requires grad; torch refuses to build it")
        extra = args[2:]  # backward hooks, then (with_state) the state torch sets on the parameter
        if len(args) != (4 if name.endswith("_with_state") else 3) or type(args[1]) is not bool \
                or not all(self.empty(x, where, depth) for x in extra):
            raise self.fail(f"{where}: a parameter record with hooks or a state that torch would apply to "
                            "its tensor (it would load other weights than the record holds)")

    def _from_type(self, obj: Record, where: str, depth: int) -> TensorSpec:
        """A tensor-subclass record: only torch.Tensor / Parameter, with no state to apply."""
        args = obj.args
        if len(args) != 4 or not isinstance(args[2], tuple):
            raise self.fail(f"{where}: a malformed tensor-subclass record")
        func, new_type = args[0], args[1]
        if not (isinstance(func, type) and issubclass(func, GlobalRecord) and func.record_name in _TENSOR_REBUILDERS):
            raise self.fail(f"{where}: a tensor-subclass record around {type_name(func)}")
        if global_of(new_type) not in _TENSOR_TYPES or not self.empty(args[3], where, depth):
            raise self.fail(f"{where}: a tensor of type {type_name(new_type)} with a state that torch would set "
                            "on it (it could load other weights than the record holds)")
        return self.value(func(*args[2]), where, depth + 1)  # a call of the record class: called

    def _tensor(self, obj: Record, name: str, where: str, depth: int) -> TensorSpec:
        args = obj.args
        extra = {"torch._utils._rebuild_tensor": 4, "torch._utils._rebuild_tensor_v2": 6,
                 "torch._utils._rebuild_tensor_v3": 7}[name]
        if not extra <= len(args) <= extra + 1:
            raise self.fail(f"{where}: a tensor record with {len(args)} arguments")
        if extra > 4 and (type(args[4]) is not bool or not all(self.empty(x, where, depth) for x in args[5:6] + args[extra:])):
            raise self.fail(f"{where}: a tensor record with backward hooks or metadata that torch would apply "
                            "(it could load other weights than the record holds)")
        storage = self.value(args[0], where, depth + 1)
        if not isinstance(storage, StorageRef):
            raise self.fail(f"{where}: a tensor over a {type_name(storage)}, not a torch storage")
        offset = args[1]
        size = self.value(args[2], where, depth + 1)
        stride = self.value(args[3], where, depth + 1)
        dtype = storage.dtype
        if name == "torch._utils._rebuild_tensor_v3":
            dtype_name = global_of(args[6])
            module, _, short = (dtype_name or "").rpartition(".")
            dtype = DTYPES.get(short) if module == "torch" else None
            if dtype is None:
                raise self.fail(f"{where}: a tensor with dtype {dtype_name or type_name(args[6])}, "
                                "which is not read here")
        if extra > 4 and args[4] and not (dtype.is_floating_point or dtype.is_complex):
            raise self.fail(f"{where}: an integer tensor that requires grad; torch refuses to build it")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
            raise self.fail(f"{where}: a tensor with size {type_name(size)} and stride {type_name(stride)}")
        return TensorSpec(storage, dtype, offset, tuple(size), tuple(stride))


def record_bytes(obj: Any) -> bytes | InPlaceBytes | None:
    """The bytes a pickled value stands for, or None when it stands for none.

    Args:
        obj: plain bytes (or a bytearray), the file's own bytes (`pool.unpickler` leaves large
            byte strings in place), or protocol 2's ``_codecs.encode(text, 'latin1')`` record.

    Returns:
        The bytes (an `pool.unpickler.InPlaceBytes` for bytes left in place), or None.

    Example:
        >>> record_bytes(b"abc"), record_bytes("abc")
        (b'abc', None)
    """
    if isinstance(obj, PersistentRecord) and obj.untouched and isinstance(obj.value, InPlaceBytes):
        return obj.value
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, bytearray):
        return bytes(obj)
    if call_name(obj) == "_codecs.encode" and obj.called and not obj.kwargs and len(obj.args) == 2 and isinstance(obj.args[0], str) \
            and obj.args[1] in ("latin1", "latin-1"):
        try:
            return obj.args[0].encode("latin-1")
        except UnicodeEncodeError:
            return None
    return None


def is_key(key: Any) -> bool:
    """Whether a value can be a state-dict or storage key: a string, or an integer small enough to print.

    Args:
        key: the value a pickle gave as a key.

    Returns:
        True for a string or an integer below ``2**62`` in size (not a bool).

    Example:
        >>> is_key("visual.proj"), is_key(3), is_key(True), is_key(1 << 70)
        (True, True, False, False)
    """
    return isinstance(key, str) or (type(key) is int and -INT_LIMIT < key < INT_LIMIT)
