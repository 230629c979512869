"""Unpickling that yields data, never calls: every global becomes an inert record.

A pickle names globals (``module.name``) and asks the reader to call them, build objects and set
their state. Here nothing the file names is ever imported or called, torch's own tensor-rebuild
functions, storage classes, ``OrderedDict`` and ``Parameter`` included: each global becomes a
`GlobalRecord` subclass that only remembers what the pickle did with it (the arguments of a
call, the state of a ``BUILD``, appended items). Calling such a record makes a `CallRecord`. What
the records mean (tensors, modules) is decided afterwards, by `pool.records`, from names alone.

The bytes are first proven bounded by `pool.pickle_scan` (memo indices, tuple depth, object
count, lengths), and only those same bytes are handed to CPython's C unpickler. Globals that could
run code or touch the system if they were ever called are refused up front with
`UnsafeCheckpointError` (``inspect`` reads on with ``refuse_unsafe=False``: they stay inert).

Knows nothing of torch or open_clip.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, amended, printable
from .pickle_scan import scan_pickle

__all__ = ["GlobalName", "GlobalRecord", "CallRecord", "Record", "PersistentRecord", "Unpickled", "InPlaceBytes",
           "Reader", "is_unsafe_global", "global_of"]

# Modules whose globals can run code, spawn processes, touch files or the network, or load more
# pickles. A file naming any of them is refused even though its record would stay inert.
_UNSAFE_MODULE_ROOTS = frozenset(
    {
        "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys",
        "importlib", "runpy", "shutil", "socket", "_socket", "ctypes", "_ctypes", "pickle",
        "_pickle", "marshal", "pty", "code", "codeop", "multiprocessing", "signal", "webbrowser",
        "tempfile", "pathlib", "io", "_io", "asyncio", "threading", "_thread", "urllib", "http",
        "ftplib", "smtplib", "telnetlib", "requests", "dill", "cloudpickle", "joblib", "pip",
        "setuptools", "distutils", "zipimport", "pkgutil", "platform", "inspect", "gc", "weakref",
        "operator", "functools", "types", "commands", "pdb", "bdb", "timeit", "tarfile", "zipfile",
        "trace", "cProfile", "profile", "sqlite3", "mmap", "fcntl", "resource", "glob", "numpy.lib",
        "_operator", "_functools", "builtins_", "_imp", "_frozen_importlib", "_winapi", "msvcrt",
        "nturl2path", "xmlrpc", "logging", "site", "sysconfig",
    }
)
# torch entry points that read files, compile or execute code.
_UNSAFE_TORCH_PREFIXES = (
    "torch.load", "torch.save", "torch.hub", "torch.jit", "torch._C", "torch.ops",
    "torch.utils.cpp_extension", "torch.package", "torch._dynamo", "torch.compile",
    "torch.serialization", "torch.storage._load_from_file", "torch.from_file",
    "torch.classes", "torch.library", "torch._ops", "torch.cuda", "torch.fx", "torch.export",
    "torch._inductor", "torch.utils.data", "torch.multiprocessing", "torch.distributed",
)
# Plain builtins a state dict or module may legitimately name (each stays a record all the same);
# every other builtin (eval, exec, getattr, __import__, open, ...) is refused.
_PLAIN_BUILTINS = frozenset({
    "set", "frozenset", "slice", "complex", "bytearray", "list", "dict", "tuple", "int", "float",
    "bool", "str", "bytes", "range", "object",
})
# How many distinct globals one read may turn into record classes (a real encoder names ~30).
MAX_RECORD_TYPES = 10_000


@dataclass(frozen=True)
class GlobalName:
    """One ``module.name`` a file names, and whether it is on the unsafe list.

    Attributes:
        module: the module part, as the file spells it (Python 2 names mapped to Python 3's).
        name: the name within the module.
        unsafe: whether it could run code or touch the system if called (`is_unsafe_global`).
    """

    module: str
    name: str
    unsafe: bool = False

    def __str__(self) -> str:
        """``module.name``, terminal-safe (control characters escaped)."""
        return printable(f"{self.module}.{self.name}")


def is_unsafe_global(module: str, name: str) -> bool:
    """Whether a global could run code or touch the system if it were ever called.

    Refused: builtins other than plain types (``eval``, ``getattr``, ``open``, ...), modules that
    run code, spawn processes, touch files or the network or load more pickles (``os``,
    ``subprocess``, ``pickle``, ...), and torch entry points that read files, compile or execute
    code (``torch.load``, ``torch.jit``, ...). torch's tensor rebuild functions and storage
    classes are not on the list: they stay records all the same.

    Args:
        module: the global's module (``os``, ``torch._utils``).
        name: its name in that module.

    Returns:
        True when the file is to be refused for naming it.

    Example:
        >>> is_unsafe_global("os", "system"), is_unsafe_global("torch._utils", "_rebuild_tensor_v2")
        (True, False)
    """
    if module in ("builtins", "__builtin__"):
        return name not in _PLAIN_BUILTINS
    root = module.split(".", 1)[0]
    if root in _UNSAFE_MODULE_ROOTS or module in _UNSAFE_MODULE_ROOTS:
        return True
    dotted = f"{module}.{name}"
    if module == "torch.cuda" and name.endswith("Storage") and name.isidentifier():
        return False  # GPU-saved legacy files name torch.cuda.FloatStorage: a record, read as its CPU twin
    if dotted == "torch.storage._load_from_bytes":
        return False  # a record here; its blob is parsed by our own legacy reader (pool.records)
    return any(dotted == p or dotted.startswith(p + ".") or module == p or module.startswith(p + ".")
               for p in _UNSAFE_TORCH_PREFIXES)


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (protocol-2 pickles write ``__builtin__.set``) as pickle itself does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Record:
    """An object a pickle asked for. Keeps what it was made from; runs nothing (``object``'s
    ``__init__`` is all that follows ``__new__``: the class the file names never runs).

    ``args`` / ``kwargs``: the call or ``NEWOBJ`` arguments; ``state``: what ``BUILD`` handed
    over (recorded, never applied); ``items``: what ``APPEND(S)`` / ``SETITEM(S)`` added.

    Args:
        *args: the call's positional arguments, kept as ``args``.
        **kwargs: its keyword arguments, kept as ``kwargs``.
    """

    __slots__ = ("args", "kwargs", "state", "items")
    record_global: GlobalName | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = []
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        """Record what the pickle's ``APPEND`` added (nothing is built).

        Args:
            value: the item, kept in ``items``.
        """
        if self.items is None:
            self.items = []
        self.items.append(value)

    def extend(self, values: Any) -> None:
        """Record what the pickle's ``APPENDS`` added (nothing is built).

        Args:
            values: the items, kept in ``items`` in order.
        """
        if self.items is None:
            self.items = []
        self.items.extend(values)

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
    ``record_global``, which escapes it)."""

    __slots__ = ()
    record_name: str = "?"


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


@dataclass
class Unpickled:
    """The root object of one pickle (plain data and records) and where the pickle ended.

    Attributes:
        root: the root object: plain data and records, nothing the file named was built.
        end: the offset one past the pickle's ``STOP`` opcode.
    """

    root: Any
    end: int


class _RecordTypes:
    """One record class per distinct global of one read (shared by nested pickles)."""

    def __init__(self) -> None:
        self.types: dict[tuple[str, str], type] = {}

    def get(self, module: str, name: str, source: str) -> type:
        key = (module, name)
        cls = self.types.get(key)
        if cls is None:
            if len(self.types) >= MAX_RECORD_TYPES:
                raise CorruptCheckpointError(f"{source}: the file names more than {MAX_RECORD_TYPES} "
                                             "distinct globals; no checkpoint does.")
            cls = type(name if name.isidentifier() else "record", (GlobalRecord,),
                       {"__slots__": (), "record_global": GlobalName(module, name),
                        "record_name": f"{module}.{name}", "__module__": "pool.unpickler.records"})
            self.types[key] = cls
        return cls


class Reader:
    """The globals and record classes of one read of one file, nested pickles included.

    Args:
        source: how error messages name the file.
        refuse_unsafe: raise `UnsafeCheckpointError` as soon as an unsafe global is named (the
            default); False lists it and reads on (``inspect``).
    """

    def __init__(self, source: str, *, refuse_unsafe: bool = True) -> None:
        self.source = source
        self.refuse_unsafe = refuse_unsafe
        self.globals: dict[tuple[str, str], GlobalName] = {}
        self._types = _RecordTypes()

    @property
    def named_globals(self) -> list[GlobalName]:
        """Every global this read has named so far, in order, unsafe ones flagged."""
        return list(self.globals.values())

    def note_globals(self, names: list[tuple[str, str]]) -> None:
        """Record globals the scan found; refuse unsafe ones before anything is unpickled.

        Args:
            names: ``(module, name)`` pairs as the pickle spells them (Python 2 names are mapped).

        Raises:
            UnsafeCheckpointError: one of them is unsafe and ``refuse_unsafe`` is set; the error
                lists the unsafe ones and carries every global named so far.
        """
        unsafe = []
        for module, name in names:
            module, name = python3_name(module, name)
            g = self.globals.get((module, name))
            if g is None:
                g = self.globals[(module, name)] = GlobalName(module, name, is_unsafe_global(module, name))
            if g.unsafe:
                unsafe.append(str(g))
        if unsafe and self.refuse_unsafe:
            error = UnsafeCheckpointError(
                f"{self.source}: refused to load: the file names the global '{unsafe[0]}'"
                + (f" (and {len(unsafe) - 1} more unsafe)" if len(unsafe) > 1 else "")
                + ", which could run code or touch the system if called. Nothing from the file was "
                "executed. This is no checkpoint to keep using: get the file from a trusted source, "
                "or run `python -m pool inspect` on it to see every global it names.", unsafe,
                checkpoint_globals=self.named_globals)
            raise error

    def find_class(self, module: str, name: str) -> type:
        """The record class standing for a global (the unpickler's ``find_class``); nothing is imported.

        Args:
            module: the global's module, as the pickle spells it.
            name: its name.

        Returns:
            A `GlobalRecord` subclass, one per distinct global of this read.

        Raises:
            UnsafeCheckpointError: the global (not seen by the scan) is unsafe and
                ``refuse_unsafe`` is set.
            CorruptCheckpointError: the read names more than ``MAX_RECORD_TYPES`` globals.
        """
        key = python3_name(module, name)
        if key not in self.globals:
            # The scan spelled this name differently (an escape it decoded otherwise): the same
            # policy applies all the same, before anything is made of it.
            self.note_globals([(module, name)])
        return self._types.get(*key, self.source)

    def unpickle(self, data: bytes | memoryview, *, what: str = "pickle",
                 persistent: Callable[[Any], Any] | None = None,
                 large_bytes: int | None = None) -> Unpickled:
        """Scan ``data`` (a pickle starting at byte 0), then unpickle exactly the scanned bytes.

        The result is plain data and records. ``persistent`` maps a persistent id to an object;
        without it a pickle that has persistent ids is refused. With ``large_bytes``, byte strings
        at least that long are not copied: they come back as `InPlaceBytes` (views of ``data``).

        Args:
            data: the bytes, the pickle starting at byte 0 (anything after its ``STOP`` is
                ignored); a memoryview of a mapped file is copied before it is unpickled.
            what: how messages name the pickle (``data.pkl``).
            persistent: maps a persistent id to an object; None refuses persistent ids.
            large_bytes: leave byte strings at least this long in place; None copies them all.

        Returns:
            The `Unpickled` root object and the offset where the pickle ended.

        Raises:
            CorruptCheckpointError: the scan refuses the pickle (unbounded or malformed), it uses
                persistent ids without ``persistent``, or it cannot be read (it does something no
                writer does).
            UnsafeCheckpointError: it names an unsafe global and ``refuse_unsafe`` is set.
        """
        try:
            scan = scan_pickle(data, source=self.source, what=what, large_bytes=large_bytes)
        except CorruptCheckpointError as exc:
            self.note_globals(exc.checkpoint_globals)
            raise amended(exc, checkpoint_globals=self.named_globals) from exc
        self.note_globals(scan.globals)
        if scan.persistent_ids and persistent is None:
            raise CorruptCheckpointError(
                f"{self.source}: the {what} refers to external data (persistent ids) but is not "
                "inside a torch container; the file is damaged or was not written by torch.save / "
                "pickle.dump.")
        if scan.large:
            body, persistent = _without_large_bytes(data, scan, self.source)
        elif isinstance(data, bytes):
            body = data if scan.end == len(data) else data[:scan.end]
        else:
            body = bytes(data[:scan.end])  # a mapping another process could change: copy, then
        if body is not data:                # check the copy, which is what gets unpickled
            scan_pickle(body, source=self.source, what=what)
        unpickler = _Unpickler(io.BytesIO(body), encoding="latin1")
        unpickler.reader = self
        unpickler.persistent = persistent
        try:
            root = unpickler.load()
        except _CallbackBug as bug:  # our own code failed inside the unpickler: not the file's fault
            raise bug.error from None
        except (pickle.UnpicklingError, TypeError, AttributeError, ValueError, KeyError, IndexError,
                EOFError, UnicodeDecodeError, OverflowError) as exc:
            # The scan proved the stream bounded; what is left is a pickle that does something no
            # writer does (calls a non-callable, BUILDs a plain value, ...).
            raise CorruptCheckpointError(
                f"{self.source}: the {what} cannot be read ({type(exc).__name__}: "
                f"{str(exc)[:200]}); the file is damaged or was not written by torch.save / "
                "pickle.dump. Get it again from a trusted source.") from None
        return Unpickled(root, scan.end)


@dataclass(frozen=True)
class InPlaceBytes:
    """A large byte string left where it is, not copied out of the pickle's buffer.

    Attributes:
        view: a read-only view of the bytes in the pickle's buffer.
        offset: where the view starts in that buffer.
    """

    view: memoryview
    offset: int


def _without_large_bytes(data: bytes | memoryview, scan: Any, source: str) -> tuple[bytes, Callable[[Any], Any]]:
    """The pickle with each large byte string replaced by a persistent id (its index), and the
    lookup that turns those ids into `InPlaceBytes`. Each replacement (``BININT index``,
    ``BINPERSID``) pushes one object, as the byte string did."""
    view = memoryview(data).toreadonly()
    pieces: list[bytes | memoryview] = []
    previous = 0
    for index, (opcode_at, _, stop) in enumerate(scan.large):
        pieces.append(view[previous:opcode_at])
        pieces.append(b"J" + index.to_bytes(4, "little", signed=True) + b"Q")
        previous = stop
    pieces.append(view[previous:scan.end])
    spans = [(start, stop) for _, start, stop in scan.large]

    def lookup(pid: Any) -> InPlaceBytes:
        if type(pid) is not int or not 0 <= pid < len(spans):
            raise pickle.UnpicklingError(f"{source}: a persistent id in a plain pickle")
        start, stop = spans[pid]
        return InPlaceBytes(view[start:stop], start)

    return b"".join(pieces), lookup


class _CallbackBug(BaseException):
    """Carries an exception our own callbacks raised out of the C unpickler, past the handler
    that turns the unpickler's decoding errors into CheckpointErrors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _Unpickler(pickle.Unpickler):
    """CPython's C unpickler; globals become record classes, persistent ids go to the container."""

    reader: Reader
    persistent: Callable[[Any], Any] | None

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global named by something other than strings")
        try:
            return self.reader.find_class(module, name)
        except CheckpointError:
            raise
        except Exception as exc:  # a bug of ours: surfaces as itself (see unpickle)
            raise _CallbackBug(exc) from exc

    def persistent_load(self, pid: Any) -> Any:
        if self.persistent is None:
            raise pickle.UnpicklingError("a persistent id outside a torch container")
        try:
            value = self.persistent(pid)
        except CheckpointError:
            raise
        except Exception as exc:  # a bug of ours: surfaces as itself (see unpickle)
            raise _CallbackBug(exc) from exc
        if isinstance(value, type) and issubclass(value, GlobalRecord):
            return value  # a legacy module class: a record class like any global
        return PersistentRecord(value)
