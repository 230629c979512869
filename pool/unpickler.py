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
from dataclasses import dataclass, field
from typing import Any

from .allowlist import lookup
from .errors import (
    CallbackBug,
    CheckpointError,
    CorruptCheckpointError,
    RoleMisuse,
    UnsafeCheckpointError,
    amended,
    printable,
)
from .inert import COPIED_AT_CALL, GlobalRecord, PersistentRecord
from .pickle_scan import ScanResult, scan_pickle

__all__ = ["GlobalName", "Unpickled", "InPlaceBytes", "Reader", "is_unsafe_global", "python3_name"]

# How many distinct globals one read may turn into record classes (a real encoder names ~30).
_MAX_RECORD_TYPES = 10_000


@dataclass(frozen=True)
class GlobalName:
    """One ``module.name`` a file names, and the allowlist's verdict on it (`pool.allowlist`).

    Attributes:
        module: the module part, as the file spells it (Python 2 names mapped to Python 3's).
        name: the name within the module.
        unsafe: True when it is on no allowlist: the file is refused for naming it.
        role: how the allowlist lets a pickle use it (``rebuild``, ``class``, ...); ``any`` for
            one the user allowed, None when refused.
        writer: the writer that needs it (``"allowed by you"`` for a user-allowed one), or "".
        tier: ``state`` (``torch.load(weights_only=True)`` accepts it too), ``model`` (only a
            pickled model names it), ``user``, or "" when refused.
    """

    module: str
    name: str
    unsafe: bool = False
    role: str | None = field(default=None, compare=False)
    writer: str = field(default="", compare=False)
    tier: str = field(default="", compare=False)

    def __str__(self) -> str:
        """``module.name``, terminal-safe (control characters escaped)."""
        return printable(f"{self.module}.{self.name}")

    @property
    def verdict(self) -> str:
        """``allowed``, ``allowed by you`` or ``refused``, for reports."""
        return "refused" if self.unsafe else "allowed by you" if self.role == "any" else "allowed"

    @classmethod
    def judged(cls, module: str, name: str, user: frozenset[str] = frozenset()) -> GlobalName:
        """The global with the allowlist's verdict for this read.

        Args:
            module: the global's module, Python 3 spelling.
            name: its name.
            user: the globals the user allowed for this read.

        Returns:
            The `GlobalName`, ``unsafe`` set when it is on no allowlist.
        """
        entry = lookup(f"{module}.{name}", user)
        if entry is None:
            return cls(module, name, True)
        return cls(module, name, False, entry.role, entry.writer, entry.tier)


def is_unsafe_global(module: str, name: str) -> bool:
    """Whether a file naming this global is refused: it is on no allowlist (`pool.allowlist`).

    An allowlist, not a deny-list: everything that real checkpoint writers do not use is
    refused, however harmless it looks (``torch.load(weights_only=False)`` would import and call
    it). torch's tensor rebuild functions and storage classes, open_clip and ``torch.nn`` module
    classes are allowed: they stay records all the same.

    Args:
        module: the global's module (``os``, ``torch._utils``).
        name: its name in that module.

    Returns:
        True when the file is to be refused for naming it.

    Example:
        >>> is_unsafe_global("os", "system"), is_unsafe_global("torch._utils", "_rebuild_tensor_v2")
        (True, False)
    """
    return lookup(f"{module}.{name}") is None


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (protocol-2 pickles write ``__builtin__.set``) as pickle itself does.

    Args:
        module: the module, as the pickle spells it.
        name: the name in it.

    Returns:
        ``(module, name)`` in Python 3's spelling.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


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
        self.tensors: list = []  # every call of a tensor-rebuild global, wherever the pickle puts it

    def get(self, module: str, name: str, source: str, role: str | None = None) -> type:
        key = (module, name)
        cls = self.types.get(key)
        if cls is None:
            if len(self.types) >= _MAX_RECORD_TYPES:
                raise CorruptCheckpointError(f"{source}: the file names more than {_MAX_RECORD_TYPES} "
                                             "distinct globals; no checkpoint does.")
            cls = type(name if name.isidentifier() else "record", (GlobalRecord,),
                       {"__slots__": (), "record_global": GlobalName(module, name),
                        "record_name": f"{module}.{name}", "record_role": role,
                        "record_checked": role not in (None, "any"),
                        "record_copies": f"{module}.{name}" in COPIED_AT_CALL,
                        "record_made": self.tensors if role == "rebuild" else None,
                        "__module__": "pool.unpickler.records"})
            self.types[key] = cls
        return cls


class Reader:
    """The globals and record classes of one read of one file, nested pickles included.

    Args:
        source: how error messages name the file.
        refuse_unsafe: raise `UnsafeCheckpointError` as soon as a global on no allowlist is named
            (the default); False lists it and reads on (``inspect``).
        allow_globals: exact ``module.name`` globals the user allows for this read, besides
            `pool.allowlist.ALLOWLIST`.
    """

    def __init__(self, source: str, *, refuse_unsafe: bool = True,
                 allow_globals: frozenset[str] = frozenset()) -> None:
        self.source = source
        self.refuse_unsafe = refuse_unsafe
        self.allow_globals = allow_globals
        self.globals: dict[tuple[str, str], GlobalName] = {}
        self.foreign_opcodes: set[str] = set()  # opcodes torch's weights_only reader refuses
        self._types = _RecordTypes()

    @property
    def made_tensors(self) -> list:
        """Every tensor or parameter record this read's pickles made (when roles apply), wherever
        they sit: what a reader that builds the objects would build (`pool.records.walk` checks
        that it reads each one)."""
        return self._types.tensors

    @property
    def named_globals(self) -> list[GlobalName]:
        """Every global this read has named so far, in order, with the allowlist's verdicts."""
        return list(self.globals.values())

    def note_globals(self, names: list[tuple[str, str]]) -> None:
        """Record globals the scan found; refuse those on no allowlist before anything is unpickled.

        Args:
            names: ``(module, name)`` pairs as the pickle spells them (Python 2 names are mapped).

        Raises:
            UnsafeCheckpointError: one of them is on no allowlist and ``refuse_unsafe`` is set;
                the error lists them and carries every global named so far.
        """
        unsafe = []
        for module, name in names:
            module, name = python3_name(module, name)
            g = self.globals.get((module, name))
            if g is None:
                g = self.globals[(module, name)] = GlobalName.judged(module, name, self.allow_globals)
            if g.unsafe:
                unsafe.append(str(g))
        if unsafe and self.refuse_unsafe:
            raise self.refusal(unsafe)

    def require_state_tier(self, what: str) -> None:
        """Refuse model-only globals in a file whose root is a state dict (``what``: its reader).

        A torch file holding a state dict is read elsewhere with ``torch.load(weights_only=True)``,
        which refuses every global a pickled model needs: `pool` refuses them too, so that it never
        passes a file its reference reader rejects (docs/design.md §4.3).

        Args:
            what: the reference reader, as messages name it.

        Raises:
            UnsafeCheckpointError: the file names a ``model``-tier global (`pool.allowlist`).
            CorruptCheckpointError: its pickles use opcodes that reader does not read.
        """
        if not self.refuse_unsafe:
            return
        model = [str(g) for g in self.globals.values() if g.tier == "model"]
        if model:
            raise self.refusal(model, f"holds a state dict, yet names '{model[0]}', which only a pickled model "
                                      f"uses; {what} refuses such a file, so pool does too")
        if self.foreign_opcodes:
            raise CorruptCheckpointError(
                f"{self.source}: a state dict whose pickle uses the opcode(s) {', '.join(sorted(self.foreign_opcodes))}, "
                f"which {what} does not read (torch.save writes protocol 2 without them); the file was not written "
                "by torch.save or was altered. Re-save it with torch.save(state_dict, path).")

    def refusal(self, unsafe: list[str], why: str = "") -> UnsafeCheckpointError:
        """The error for a file naming globals that no checkpoint writer uses, or using an allowed
        one against its role.

        Args:
            unsafe: the offending globals, ``module.name``.
            why: what the pickle does with an allowed global (a misuse); empty for globals on no
                allowlist.

        Returns:
            The `UnsafeCheckpointError` (to raise), carrying every global named so far.
        """
        if why:
            return UnsafeCheckpointError(
                f"{self.source}: refused: the pickle {why}. Nothing from the file was executed, but "
                "torch.load(weights_only=False) or pickle.load would do it. No checkpoint writer produces "
                "this: the file is crafted or damaged; get it again from a trusted source.", unsafe,
                checkpoint_globals=self.named_globals)
        more = f" (and {len(unsafe) - 1} more: {', '.join(unsafe[1:4])}{'...' if len(unsafe) > 4 else ''})" \
            if len(unsafe) > 1 else ""
        return UnsafeCheckpointError(
            f"{self.source}: refused: the file names the global '{unsafe[0]}'{more}, which is on no allowlist "
            "of what checkpoint writers use: torch.load(weights_only=False) and pickle.load would import and "
            "call it. Nothing from the file was executed. Get the file from a trusted source, run `python -m "
            "pool inspect` on it to see every global it names, or, if you trust it, allow the global "
            f"explicitly (allow_globals=['{unsafe[0]}'], `allow_globals:` in a pool config, or "
            f"--allow-global {unsafe[0]}).", unsafe, checkpoint_globals=self.named_globals)

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
            CorruptCheckpointError: the read names more than ``_MAX_RECORD_TYPES`` globals.
        """
        key = python3_name(module, name)
        if key not in self.globals:
            # The scan spelled this name differently (an escape it decoded otherwise): the same
            # policy applies all the same, before anything is made of it.
            self.note_globals([(module, name)])
        judged = self.globals[key]
        return self._types.get(*key, self.source, judged.role if self.refuse_unsafe else None)

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
        scan = self._scan(data, what, large_bytes)
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
        return Unpickled(self._load(body, what, persistent), scan.end)

    def _scan(self, data: bytes | memoryview, what: str, large_bytes: int | None) -> ScanResult:
        """`scan_pickle`, its globals noted (and unsafe ones refused) whether it passes or not."""
        try:
            scan = scan_pickle(data, source=self.source, what=what, large_bytes=large_bytes)
        except CorruptCheckpointError as exc:
            self.note_globals(exc.checkpoint_globals)
            raise amended(exc, checkpoint_globals=self.named_globals) from exc
        self.note_globals(scan.globals)
        self.foreign_opcodes |= scan.foreign
        return scan

    def _load(self, body: bytes, what: str, persistent: Callable[[Any], Any] | None) -> Any:
        """The C unpickler over scanned bytes; what it raises becomes this read's refusal."""
        unpickler = _Unpickler(io.BytesIO(body), encoding="latin1")
        unpickler.reader = self
        unpickler.persistent = persistent
        try:
            return unpickler.load()
        except CallbackBug as bug:  # our own code failed inside the unpickler: not the file's fault
            raise bug.error from None
        except RoleMisuse as misuse:
            raise self.refusal([misuse.name], misuse.why) from None
        except (pickle.UnpicklingError, TypeError, AttributeError, ValueError, KeyError, IndexError,
                EOFError, UnicodeDecodeError, OverflowError) as exc:
            # The scan proved the stream bounded; what is left is a pickle that does something no
            # writer does (calls a non-callable, BUILDs a plain value, ...).
            raise CorruptCheckpointError(
                f"{self.source}: the {what} cannot be read ({type(exc).__name__}: "
                f"{str(exc)[:200]}); the file is damaged or was not written by torch.save / "
                "pickle.dump. Get it again from a trusted source.") from None


@dataclass(frozen=True)
class InPlaceBytes:
    """A large byte string left where it is, not copied out of the pickle's buffer.

    Attributes:
        view: a read-only view of the bytes in the pickle's buffer.
        offset: where the view starts in that buffer.
    """

    view: memoryview
    offset: int


def _without_large_bytes(data: bytes | memoryview, scan: ScanResult, source: str) -> tuple[bytes, Callable[[Any], Any]]:
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
            raise CallbackBug(exc) from exc

    def persistent_load(self, pid: Any) -> Any:
        if self.persistent is None:
            raise pickle.UnpicklingError("a persistent id outside a torch container")
        try:
            value = self.persistent(pid)
        except CheckpointError:
            raise
        except Exception as exc:  # a bug of ours: surfaces as itself (see unpickle)
            raise CallbackBug(exc) from exc
        if isinstance(value, type) and issubclass(value, GlobalRecord):
            return value  # a legacy module class: a record class like any global
        return PersistentRecord(value)
