"""Inert records: what the globals a pickle names become, and what a pickle did with them.

`pool.unpickler` hands the C unpickler a `GlobalRecord` subclass for each global a pickle names
(one per distinct global of a read, made there); calling one, ``NEWOBJ``, ``BUILD``, ``APPEND`` and
``SETITEM`` on it only record their arguments. Nothing the file names is imported or run. When a
read enforces the allowlist's roles (`pool.allowlist`), a record used against its role raises
`pool.errors.RoleMisuse`, which the unpickler turns into a refusal.

Knows names only: nothing of torch, open_clip or the bytes of a pickle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import RoleMisuse

if TYPE_CHECKING:
    from .unpickler import GlobalName

__all__ = ["Record", "GlobalRecord", "CallRecord", "PersistentRecord", "global_of", "COPIED_AT_CALL"]


class Record:
    """An object a pickle asked for. Keeps what it was made from; runs nothing (``object``'s
    ``__init__`` is all that follows ``__new__``: the class the file names never runs).

    ``args`` / ``kwargs``: the call or ``NEWOBJ`` arguments; ``state``: what ``BUILD`` handed
    over (recorded, never applied); ``items``: what ``APPEND(S)`` / ``SETITEM(S)`` added.

    Args:
        *args: the call's positional arguments, kept as ``args``.
        **kwargs: its keyword arguments, kept as ``kwargs``.
    """

    __slots__ = ("args", "kwargs", "state", "items", "called")
    record_global: GlobalName | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = None
        self.called = False
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only a call (REDUCE, INST, OBJ) runs __init__ after __new__; NEWOBJ runs __new__ alone,
        # which for most classes is another operation (OrderedDict.__new__ ignores its arguments).
        self.called = True

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def _add_item(self, item: Any) -> None:
        if self.items is None:
            self.items = []
        self.items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._add_item((key, value))

    def append(self, value: Any) -> None:
        """Record what the pickle's ``APPEND`` added (nothing is built).

        Args:
            value: the item, kept in ``items``.
        """
        Record._add_item(self, value)

    def extend(self, values: Any) -> None:
        """Record what the pickle's ``APPENDS`` added (nothing is built).

        Args:
            values: the items, kept in ``items`` in order.
        """
        for value in values:
            Record._add_item(self, value)

    def __call__(self, *args: Any, **kwargs: Any) -> CallRecord:
        """A pickle may call what an earlier call returned (``partial(...)()``): one more record."""
        return CallRecord(self, args, kwargs)

    def __reduce__(self) -> Any:
        raise TypeError("records are not picklable")

    def __repr__(self) -> str:
        return f"<record {self.record_global or 'call'}>"


class GlobalRecord(Record):
    """Base of the per-global record classes; an instance is one call (or NEWOBJ) of the global.
    ``record_name`` is the global's ``module.name`` as the file spells it (compare with it; print
    ``record_global``, which escapes it). ``record_role`` is its allowlist role when the read
    enforces roles (`pool.allowlist`), else None: a pickle that uses a global against its role is
    refused as it is unpickled (docs/design.md §4.2).

    Args:
        *args: the call's positional arguments, kept as ``args``.
        **kwargs: its keyword arguments, kept as ``kwargs``.
    """

    __slots__ = ()
    record_name: str = "?"
    record_role: str | None = None
    record_checked: bool = False  # roles apply: a role from the allowlist (not None, not the user's "any")
    record_made: list | None = None  # rebuild roles: every tensor record the read made, in order
    record_copies: bool = False  # a call that copies its first argument when it runs (COPIED_AT_CALL)

    def __new__(cls, *args: Any, **kwargs: Any) -> GlobalRecord:
        role = cls.record_role
        if role in _NEVER_MADE:
            raise RoleMisuse(f"makes an object of '{cls.record_global}' ({role} {_NEVER_MADE[role]})", cls)
        if role == "class" and (args or kwargs):
            raise RoleMisuse(f"creates '{cls.record_global}' with arguments; writers create a model's classes "
                          "empty and then set their state", cls)
        if role == "enum" and (len(args) != 1 or kwargs or type(args[0]) not in (str, int)):
            raise RoleMisuse(f"looks up the enum '{cls.record_global}' with {len(args)} arguments", cls)
        self = object.__new__(cls)  # Record.__new__, inlined: this runs once per record of a read
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = None
        self.called = False
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self.record_role == "class":
            raise RoleMisuse(f"calls the class '{self.record_global}'; writers create a model's classes with "
                          "NEWOBJ (empty) and then set their state", self)
        self.called = True
        if self.record_made is not None:
            self.record_made.append(self)
        if self.record_copies and args and isinstance(args[0], (dict, list)):
            # the real call copies its argument now; the pickle may change the same object later
            self.args = (dict(args[0]) if isinstance(args[0], dict) else list(args[0]), *args[1:])

    def __setstate__(self, state: Any) -> None:
        if self.record_role == "rebuild":  # torch would set_() the tensor from it: other weights
            raise RoleMisuse(f"gives the tensor made by '{self.record_global}' a state (BUILD); torch never "
                          "writes this and a reader would rebuild the tensor from the state", self)
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> CallRecord:
        if self.record_checked:
            raise RoleMisuse(f"calls what '{self.record_global}' returned; no writer does this", self)
        return Record.__call__(self, *args, **kwargs)

    def append(self, value: Any) -> None:
        """``APPEND`` on a record: no writer appends to anything but a list (refused when roles apply).

        Args:
            value: the item, kept in ``items`` when roles do not apply.
        """
        self._no_appends("APPEND")
        Record.append(self, value)

    def extend(self, values: Any) -> None:
        """``APPENDS`` on a record: refused when roles apply, as for `append`.

        Args:
            values: the items, kept in ``items`` when roles do not apply.
        """
        self._no_appends("APPENDS")
        Record.extend(self, values)

    def _no_appends(self, opcode: str) -> None:
        if self.record_checked:
            raise RoleMisuse(f"appends to '{self.record_global}' ({opcode}); only lists take appends", self)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._add_item((key, value))

    def _add_item(self, item: Any) -> None:
        if self.record_checked and self.record_name not in _ITEM_TARGETS:
            raise RoleMisuse(f"adds items to '{self.record_global}' (APPEND/SETITEM); a reader that builds it "
                          "would change it, no writer does this", self)
        Record._add_item(self, item)


#: Roles whose globals a pickle may name but never instantiate, and what they are for.
_NEVER_MADE = {"storage": "types are named only inside torch's storage references",
               "dtype": "values are only named", "reference": "is only named, never called"}
#: Calls that copy their first argument when they run (a later change to it is not theirs).
COPIED_AT_CALL = frozenset({"collections.OrderedDict", "collections.Counter", "builtins.set",
                             "builtins.frozenset", "torch.Size"})
#: Records that may receive items (SETITEMS of a mapping).
_ITEM_TARGETS = frozenset({"collections.OrderedDict", "collections.Counter"})


class CallRecord(Record):
    """A call of something that was itself a record instance (``func``).

    Args:
        func: the record that was called.
        args: the call's positional arguments.
        kwargs: its keyword arguments.
    """

    __slots__ = ("func",)

    def __new__(cls, func: Record, args: tuple, kwargs: dict) -> CallRecord:
        self = Record.__new__(cls, *args, **kwargs)
        self.func = func
        return self


class PersistentRecord(Record):
    """What a persistent id (``BINPERSID``) resolved to, wrapped.

    The pickle can BUILD or APPEND to the wrapper (recorded like any record, and refused by the
    walker), never to ``value``.

    Args:
        value: what the container's persistent-id callback returned (a storage reference, the
            bytes of a large byte string).
    """

    __slots__ = ("value",)

    def __new__(cls, value: Any) -> PersistentRecord:
        self = Record.__new__(cls)
        self.value = value
        return self

    @property
    def untouched(self) -> bool:
        """Whether the pickle left the wrapper as it was made (no BUILD, no items)."""
        return self.state is None and self.items is None


def global_of(obj: Any) -> str | None:
    """``module.name`` of a record class, or of the class of a record made by calling one.

    Args:
        obj: anything the unpickler produced.

    Returns:
        The global's ``module.name`` as the file spells it, or None when ``obj`` is no record
        class or instance of one (a `CallRecord` included).
    """
    if isinstance(obj, GlobalRecord) or (isinstance(obj, type) and issubclass(obj, GlobalRecord)):
        return obj.record_name
    return None
