"""The record walker: what an unpickled checkpoint means, read from record names alone.

`pool.unpickler` turns a pickle into plain data and inert records. This module reads those
records the way torch's own loader would interpret them, without calling anything: the tensor
rebuild records (``torch._utils._rebuild_tensor_v2`` ...) become `TensorSpec`s, ``OrderedDict``
records become dicts, a pickled ``nn.Module`` (a record with ``_parameters`` / ``_buffers`` /
``_modules`` in its recorded state) yields exactly the keys and values its ``state_dict()`` would,
and ``torch.storage._load_from_bytes`` blobs go to the container's own legacy parser. Anything
else stays what it is: a record, never called.

The walk is bounded: `MAX_WALK_ENTRIES` visits (shared references can make a small pickle
expand enormously) and `MAX_DEPTH` levels. Knows torch names and dtypes; nothing of containers'
bytes or of open_clip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import record_values
from .errors import CorruptCheckpointError, brief
from .inert import CallRecord, PersistentRecord, Record
from .record_values import MAPPINGS, SETS, ValueReader, call_name, is_key, type_name
from .tensors import INT_LIMIT, StorageRef, TensorSpec

__all__ = ["ModuleInfo", "Walked", "walk", "find_calls"]

_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
     "_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_pre_hooks",
     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
     "_load_state_dict_post_hooks", "_is_full_backward_hook"}
)
_NOT_MODULES = MAPPINGS | SETS | {"collections.Counter"}
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks")


@dataclass(frozen=True)
class ModuleInfo:
    """A pickled module's class (``module.QualName``) and its plain attributes.

    Attributes:
        type: the class the pickle names, ``module.QualName`` (``open_clip.transformer.QuickGELU``).
        attributes: the module's plain attributes (None, bools, 64-bit ints, floats, strings and
            tuples of them; a head's ``normalize``, an attention module's ``num_heads``).
    """

    type: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Walked:
    """What a checkpoint's root object holds, as `walk` read it.

    Attributes:
        tensors: tensor specs by state-dict key.
        modules: the module tree: path -> class and plain attributes (`ModuleInfo`), "" for the
            root; empty for a plain state dict.
        root_type: the root object's type (``src.modeling.ImageEncoder``, ``collections.OrderedDict``).
        wrapper: the wrapper key (``"state_dict"``) when the tensors sat inside one, else None.
    """

    tensors: dict[str, TensorSpec]
    modules: dict[str, ModuleInfo]
    root_type: str
    wrapper: str | None = None


class _Walker(ValueReader):
    """The walk over a checkpoint's root: module tree, state-dict keys, tensors."""

    def __init__(self, source: str, blob: Callable[[Record], StorageRef] | None) -> None:
        super().__init__(source, blob)
        self.tensors: dict[str, TensorSpec] = {}
        self.modules: dict[str, ModuleInfo] = {}
        self.active: set[int] = set()

    # -- structure -----------------------------------------------------------------------------
    def module_state(self, obj: Any) -> dict | None:
        """The recorded ``__dict__`` of a pickled nn.Module, or None if obj is no module."""
        if not isinstance(obj, Record) or isinstance(obj, PersistentRecord) or call_name(obj) in _NOT_MODULES:
            return None  # a mapping's BUILD state sets attributes, never its items: no module
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict) and "_parameters" in state[0]:
            raise self.fail("a module whose state is a (dict, slots) pair; Module.__setstate__ refuses it")
        if isinstance(state, dict) and "_parameters" in state and "_modules" in state:
            return state
        return None

    def module(self, obj: Record, state: dict, prefix: str, depth: int) -> None:
        path = prefix[:-1] if prefix.endswith(".") else prefix
        self.enter(obj, path, depth)
        if id(obj) in self.active:
            raise self.fail(f"module {path or '<root>'} contains itself")
        self.active.add(id(obj))
        self.charge(len(state), path)
        attrs = {k: v for k, v in state.items() if isinstance(k, str) and k not in _MODULE_INTERNALS
                 and self.plain(v, path)}
        self.modules[path] = ModuleInfo(type_name(obj), attrs)
        skip = self.non_persistent(state, path, depth)
        for hooks in _STATE_DICT_HOOKS:  # state_dict() would call them: other keys, or code
            if not self.empty(state.get(hooks), path, depth):
                raise self.fail(f"module {path or '<root>'} has {hooks} that state_dict() would call")
        for group in ("_parameters", "_buffers"):
            entries = self.value(state.get(group), path, depth + 1)
            if not isinstance(entries, Mapping):  # missing: state_dict() fails on the real module
                raise self.fail(f"module {path or '<root>'} has a {group} of type {type_name(entries)}")
            for name, value in entries.items():
                if value is None:
                    continue
                if group == "_buffers" and name in skip:  # not in state_dict(), yet built as a tensor
                    self.value(value, f"{prefix}{name}", depth + 1)
                    continue
                self.tensor_entry(value, f"{prefix}{name}", depth + 1)
        children = self.value(state.get("_modules"), path, depth + 1) or {}
        if not isinstance(children, Mapping):
            raise self.fail(f"module {path or '<root>'} has _modules of type {type_name(children)}")
        for name, child in children.items():
            if child is None:
                continue
            child_state = self.module_state(child)
            if child_state is None:
                raise self.fail(f"submodule {prefix}{name} is a {type_name(child)}, not a module")
            self.module(child, child_state, f"{prefix}{name}.", depth + 1)
        self.active.discard(id(obj))

    def non_persistent(self, state: dict, path: str, depth: int) -> set:
        """The buffer names ``state_dict()`` leaves out: torch tests ``name in`` the attribute, so a
        set, a list, a tuple or a dict's keys all count; missing means none (Module.__setstate__)."""
        value = self.value(state.get("_non_persistent_buffers_set"), path, depth + 1)
        if value is None:
            return set()
        if not isinstance(value, (set, frozenset, list, tuple, dict)):
            raise self.fail(f"module {path or '<root>'} has a _non_persistent_buffers_set of type {type_name(value)}")
        return set(value)

    def plain(self, value: Any, where: str, limit: int = 1000) -> bool:
        """Whether value is a plain attribute: None, bools, 64-bit ints, floats, strings, and tuples
        of them (at most ``limit`` items, charged to the walk's budget)."""
        pending = [value]
        seen = 0
        plain = True
        while pending and plain:
            item = pending.pop()
            seen += 1
            if type(item) is tuple:
                pending.extend(item)
            elif type(item) is int:
                plain = -INT_LIMIT < item < INT_LIMIT
            else:
                plain = item is None or type(item) in (bool, float, str)
            plain = plain and seen <= limit
        self.charge(seen, where)
        return plain

    def tensor_entry(self, obj: Any, key: str, depth: int) -> None:
        spec = self.value(obj, key, depth)
        if not isinstance(spec, TensorSpec):
            raise self.fail(f"entry {key} is a {type_name(spec)}, expected a tensor")
        self.tensors[key] = spec

    def any(self, obj: Any, prefix: str, depth: int) -> None:
        """Walk a state dict, a nested mapping, a tensor or a module record."""
        state = self.module_state(obj)
        if state is not None:
            self.module(obj, state, prefix, depth)
            return
        value = self.value(obj, prefix, depth)
        if isinstance(value, TensorSpec):
            self.tensors[prefix[:-1] if prefix else ""] = value
        elif isinstance(value, Mapping):
            if id(obj) in self.active:
                raise self.fail(f"{prefix.rstrip('.') or 'the root object'} contains itself")
            self.active.add(id(obj))
            for key, item in value.items():
                if not is_key(key):
                    raise self.fail(f"{prefix.rstrip('.') or 'the root'} has a key {brief(key)} (expected a name)")
                self.any(item, f"{prefix}{key}.", depth + 1)
            self.active.discard(id(obj))


def find_calls(root: Any, name: str, source: str) -> list[Record]:
    """Every record of a call of global ``name`` reachable from ``root`` (each once), wherever it sits.

    So that nested pickles are checked even where the walk would never look.

    Args:
        root: the unpickled root object (plain data and records).
        name: the global's ``module.name`` (``torch.storage._load_from_bytes``).
        source: how error messages name the file.

    Returns:
        The call records, in the order they were found.

    Raises:
        CorruptCheckpointError: more than ``4 * MAX_WALK_ENTRIES`` objects are reachable.
    """
    found: list[Record] = []
    seen: set[int] = set()
    pending = [root]
    steps = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        steps += 1
        if steps > 4 * record_values.MAX_WALK_ENTRIES:  # one bound, read where it is defined
            raise CorruptCheckpointError(f"{source}: the pickle holds more than {4 * record_values.MAX_WALK_ENTRIES} "
                                         "objects; no model checkpoint does.")
        if isinstance(obj, (list, tuple, set, frozenset)):
            pending.extend(obj)
        elif isinstance(obj, dict):
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif isinstance(obj, Record):
            if call_name(obj) == name:
                found.append(obj)
            pending.extend((obj.args, obj.kwargs, obj.state, obj.items))
            if isinstance(obj, CallRecord):
                pending.append(obj.func)
    return found


def walk(root: Any, source: str, *, blob: Callable[[Record], StorageRef] | None = None,
         made: list | None = None) -> Walked:
    """Interpret an unpickled checkpoint: tensor specs by key, module tree, root type, wrapper.

    ``blob`` reads a ``torch.storage._load_from_bytes`` record into a storage reference (the
    container's legacy parser); without it such blobs are refused. A root ``{"state_dict": ...}``
    is unwrapped. Nothing is called: records are read by the names of their globals.

    Args:
        root: the unpickled root object (`pool.unpickler.Unpickled.root`).
        source: how error messages name the file.
        blob: reads a storage blob record into a `StorageRef`; None refuses blobs.
        made: every tensor record the pickle made (`pool.unpickler.Reader.made_tensors`); one the
            walk does not read (in a list, a tuple, a plain attribute) is refused: a reader that
            builds the objects would build it (and fail on a bad one), while pool would drop it.

    Returns:
        The `Walked` result: tensor specs, module tree, root type and wrapper key.

    Raises:
        CorruptCheckpointError: the root holds no tensors, or something no checkpoint holds (a
            module that contains itself, a key that is no name, a tensor record of the wrong
            shape, a structure past `MAX_WALK_ENTRIES` or `MAX_DEPTH`, ...).
    """
    walker = _Walker(source, blob)
    wrapper = None
    top = walker.value(root, "", 0)
    if isinstance(top, Mapping) and "state_dict" in top:
        inner = walker.value(top["state_dict"], "state_dict", 1)
        if isinstance(inner, Mapping) or walker.module_state(top["state_dict"]) is not None:
            root, wrapper = top["state_dict"], "state_dict"
    walker.any(root, "", 0)
    if wrapper is not None and made:  # a training checkpoint's other entries (optimizer state): read
        side = _Walker(source, blob)  # as every reader reads them, then left out of the state dict
        for key, item in top.items():
            if key != wrapper:
                side.any(item, f"{key}.", 1)
        walker.reached |= side.reached
    unread = [r for r in made or () if id(r) not in walker.reached]
    if unread:
        raise walker.fail(f"a tensor ({type_name(unread[0])}) outside any mapping entry or module parameter (in "
                          "a list, a tuple or a plain attribute): pool reads tensors only from those, and other "
                          "readers would build this one too")
    if not walker.tensors:
        raise CorruptCheckpointError(
            f"{source}: holds a {type_name(root)} with no tensors; expected a model, a state dict or "
            "a classification head.")
    return Walked(walker.tensors, walker.modules, type_name(root), wrapper)
