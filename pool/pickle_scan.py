"""A static pass over a pickle's opcodes: prove it is bounded before anything unpickles it.

The scan runs nothing and builds nothing. It walks the opcode stream once, simulating the
unpickler's stack with placeholders, and refuses (`CorruptCheckpointError`) any pickle that:

* uses an opcode that is unknown, needs out-of-band buffers (``NEXT_BUFFER``) or the extension
  registry (``EXT1/2/4``), or whose argument runs past the end of the data;
* stores a memo index that no sequential pickler writes (``PUT 2000000000``: CPython's C
  unpickler grows an array to the largest index, a few bytes costing gigabytes), or fetches one
  never stored;
* nests tuples deeper than `MAX_TUPLE_DEPTH` (hashing a deeply nested tuple as a dict key or set
  element recurses in C and can crash the interpreter), or marks deeper than `_MAX_MARKS`;
* has more than `MAX_OPCODES` opcodes, creates (or memoizes) more than `MAX_OBJECTS` objects,
  or pops what it never pushed;
* names a ``STACK_GLOBAL`` from anything but string constants.

It also lists every global the pickle names (``GLOBAL``, ``INST``, ``STACK_GLOBAL``) in order,
without importing anything, so a refusal can still say what the file asked for. Only a pickle
that passes is handed to the unpickler (`pool.unpickler`): the bytes it parses are exactly the
bytes checked here. Knows nothing of torch.

`_Scanner` holds the simulated state; each opcode family (constants, memo, marks, containers,
globals and calls, framing) has one small handler, found by opcode byte in a table built from
`pool.pickle_ops`, which knows each opcode's argument layout and family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CorruptCheckpointError, ScanRefusal
from .pickle_ops import (
    ARG,
    BINSTRING,
    HANDLER,
    LARGE_BYTES_OPS,
    LONG4,
    NAME,
    PY2_STRINGS,
    TORCH_READS,
    line_constant,
    string_constant,
)

__all__ = ["ScanResult", "scan_pickle", "MAX_TUPLE_DEPTH", "MAX_OBJECTS", "MAX_OPCODES"]

MAX_TUPLE_DEPTH = 64  # real checkpoints nest tuples 3-4 deep (args tuples holding size tuples)
_MAX_MARKS = 1_000  # open MARKs at once: a real module pickle keeps a handful
MAX_OBJECTS = 2_000_000  # objects one pickle may create (a ViT-L-14 module pickle: ~60,000)
_MAX_GLOBALS = 10_000  # distinct globals one pickle may name (a ViT encoder: ~30)
MAX_OPCODES = 4_000_000  # opcodes in one pickle (a ViT-B-32 module pickle: ~20,000)


@dataclass
class ScanResult:
    """What the scan saw.

    Attributes:
        end: where the pickle ends (one past ``STOP``).
        globals: the globals it names, in order, as ``(module, name)``, duplicates removed.
        persistent_ids: how many persistent ids it uses.
        foreign: the names of opcodes ``torch.load(weights_only=True)`` does not read (protocol 4's
            ``FRAME``, byte strings, ``NEWOBJ_EX``, ...): a torch state dict using them is refused.
        large: ``(opcode offset, payload start, payload end)`` of each byte string of at least
            ``large_bytes`` bytes (``BINBYTES`` / ``BINBYTES8``), when asked for.
    """

    end: int
    globals: list[tuple[str, str]] = field(default_factory=list)
    persistent_ids: int = 0
    #: opcodes torch's ``weights_only`` reader does not read (it refuses a file using them)
    foreign: set[str] = field(default_factory=set)
    #: ``(opcode offset, payload start, payload end)`` of each byte string of at least
    #: ``large_bytes`` bytes (``BINBYTES`` / ``BINBYTES8``), when asked for
    large: list[tuple[int, int, int]] = field(default_factory=list)


def scan_pickle(data: bytes | memoryview, *, start: int = 0, source: str = "<bytes>",
                what: str = "pickle", large_bytes: int | None = None) -> ScanResult:
    """Scan the pickle that starts at ``data[start]``; raise CorruptCheckpointError if it is not bounded.

    What "provably bounded" means is in the module docstring. Nothing is imported, built or
    unpickled.

    Args:
        data: the bytes (a memoryview of a mapped file is not copied whole).
        start: where the pickle starts in ``data``.
        source: how messages name the file.
        what: how messages name the pickle (``data.pkl``).
        large_bytes: list byte strings at least this long in `ScanResult.large`; None lists none.

    Returns:
        The `ScanResult`: where the pickle ends, the globals it names, its persistent ids.

    Raises:
        CorruptCheckpointError: the pickle is malformed, truncated or not provably bounded; the
            error carries the globals named before the refusal (``checkpoint_globals``).

    Example:
        >>> import collections, pickle
        >>> data = pickle.dumps(collections.OrderedDict(a=1), protocol=4)
        >>> result = scan_pickle(data)
        >>> result.globals, result.end == len(data)
        ([('collections', 'OrderedDict')], True)
    """
    result = ScanResult(end=start)
    seen: dict[tuple[str, str], None] = {}
    try:
        _Scanner(data, result, seen, large_bytes).run(start)
    except ScanRefusal as exc:
        error = CorruptCheckpointError(
            f"{source}: the {what} is malformed at byte {exc.at}: {exc.why}. No checkpoint writer "
            "produces this: the file is truncated, damaged or crafted; nothing was unpickled. "
            "Download it again from a trusted source.", checkpoint_globals=list(seen))
        raise error from None
    return result


def _line(data: bytes | memoryview, i: int, n: int) -> int:
    """Index one past the newline that ends the line starting at i (lines are short: look at a
    little first, so a memory-mapped file is not copied a megabyte per opcode)."""
    for width in (256, 65536, 1 << 20):
        end = bytes(data[i:min(n, i + width)]).find(b"\n")
        if end >= 0:
            return i + end + 1
        if i + width >= n:
            break
    raise ScanRefusal("a text argument has no end of line", i)


class _Scanner:
    """One scan's simulated unpickler: a stack of placeholders, the marks, the memo, the counts.

    Each opcode family has a handler ``(code, i) -> next i`` (-1 after ``STOP``), found by opcode
    byte in `_DISPATCH`. A stack item is an int (tuple nesting depth; 0 for other objects) or a
    short str constant (for ``STACK_GLOBAL``).
    """

    __slots__ = ("data", "n", "stack", "marks", "memo", "objects", "at", "result", "seen", "large_bytes")

    def __init__(self, data: bytes | memoryview, result: ScanResult, seen: dict[tuple[str, str], None],
                 large_bytes: int | None) -> None:
        self.data = data
        self.n = len(data)
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: list = []
        self.objects = 0
        self.at = 0  # the opcode being read: where a refusal points
        self.result = result
        self.seen = seen
        self.large_bytes = large_bytes

    def run(self, i: int) -> None:
        """Read opcodes from ``data[i]`` to ``STOP``; ScanRefusal at the first one that is refused."""
        data, n, dispatch, torch_reads, foreign = self.data, self.n, _DISPATCH, TORCH_READS, self.result.foreign
        # Each opcode takes at least one byte: a pickle shorter than the caps cannot exceed them, so
        # opcodes are counted only in longer ones.
        counted, limit, ops = n - i > min(MAX_OPCODES, MAX_OBJECTS), MAX_OPCODES, 0
        try:
            while 0 <= i < n:
                code = data[i]
                self.at = i
                if not torch_reads[code]:
                    foreign.add(NAME[code])
                if counted:
                    ops += 1
                    if ops > limit:
                        raise ScanRefusal(f"more than {limit} opcodes", i)
                i = dispatch[code](self, code, i)
        except IndexError:  # popped an empty stack, or an argument cut off by the end of the data
            raise ScanRefusal("an opcode needs more items than the stack holds, or its argument is cut off",
                              self.at) from None
        if i >= 0:
            raise ScanRefusal("the pickle ends without a STOP opcode (truncated)", n)

    # -- helpers -------------------------------------------------------------------------------
    def _argument(self, code: int, i: int) -> tuple[int, int]:
        """Where the argument of the opcode at ``i`` starts and where the next opcode starts."""
        data, n, at = self.data, self.n, self.at
        i += 1
        size = ARG[code]
        if size is None:
            raise ScanRefusal(f"unknown opcode 0x{code:02x}", at)
        arg_at = i
        if size > 0:
            i += size
        elif -8 <= size < 0:
            width = -size
            if i + width > n:
                raise ScanRefusal(f"{NAME[code]} runs past the end of the data", at)
            length = int.from_bytes(data[i:i + width], "little", signed=code in (LONG4, BINSTRING))
            if length < 0:
                raise ScanRefusal(f"{NAME[code]} has a negative length", at)
            arg_at = i + width
            i = arg_at + length
        elif size < 0:
            i = _line(data, i, n)
            if size == -102:
                i = _line(data, i, n)
        if i > n:
            raise ScanRefusal(f"{NAME[code]} claims {i - arg_at} bytes of argument; only {n - arg_at} follow", at)
        return arg_at, i

    def _created(self) -> None:
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise ScanRefusal(f"it creates more than {MAX_OBJECTS} objects", self.at)

    def _since_mark(self) -> list:
        """The items pushed since the last MARK; the stack below it becomes the stack again."""
        if not self.marks:
            raise ScanRefusal("an opcode needs a MARK that was never set", self.at)
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def _add_global(self, module: str, name: str) -> None:
        self.seen.setdefault((module, name), None)
        if len(self.seen) > _MAX_GLOBALS:
            raise ScanRefusal(f"it names more than {_MAX_GLOBALS} distinct globals", self.at)

    def _store(self, key: int) -> None:
        memo = self.memo
        if key == len(memo):
            if key >= MAX_OBJECTS:
                raise ScanRefusal(f"more than {MAX_OBJECTS} memo entries", self.at)
            memo.append(self.stack[-1])
        elif key < len(memo):  # sequential picklers store 0, 1, 2, ...; a jump is a memory bomb
            memo[key] = self.stack[-1]
        else:
            raise ScanRefusal(f"memo index {key} skips ahead of the {len(memo)} stored so far", self.at)

    def _fetch(self, key: int) -> None:
        if key >= len(self.memo):
            raise ScanRefusal(f"memo index {key} is fetched but was never stored", self.at)
        self.stack.append(self.memo[key])

    # -- constants -----------------------------------------------------------------------------
    def _atom(self, code: int, i: int) -> int:
        """A constant with a fixed-size argument (ints, floats, None, bools, empty containers)."""
        self.stack.append(0)
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            self._created()  # raises
        return i + 1 + ARG[code]

    def _literal(self, code: int, i: int) -> int:
        """A number or byte string of variable length; a large byte string is listed, if asked."""
        arg_at, i = self._argument(code, i)
        self.stack.append(0)
        if self.large_bytes is not None and code in LARGE_BYTES_OPS and i - arg_at >= self.large_bytes:
            self.result.large.append((self.at, arg_at, i))
        self._created()
        return i

    def _string(self, code: int, i: int) -> int:
        """A binary string constant (kept as text when short: ``STACK_GLOBAL`` may name it)."""
        arg_at, i = self._argument(code, i)
        if code in PY2_STRINGS and not bytes(self.data[arg_at:i]).isascii():
            raise ScanRefusal("a protocol-2 byte string (BINSTRING) of non-ASCII bytes, which readers decode "
                              "differently (torch.load as UTF-8, old pickles as latin-1)", self.at)
        self.stack.append(string_constant(self.data, arg_at, i, code) if i - arg_at <= 256 else 0)
        self._created()
        return i

    def _text_string(self, code: int, i: int) -> int:
        """A protocol-0 string constant (one line)."""
        arg_at, i = self._argument(code, i)
        self.stack.append(line_constant(bytes(self.data[arg_at:i - 1]), code) if i - arg_at <= 256 else 0)
        self._created()
        return i

    # -- the memo ------------------------------------------------------------------------------
    def _binget(self, code: int, i: int) -> int:
        if code == 104:  # BINGET: a 1-byte index; LONG_BINGET: 4 bytes
            key = self.data[i + 1]
            i += 2
        else:
            key = int.from_bytes(self.data[i + 1:i + 5], "little")
            i += 5
        if key >= len(self.memo):
            raise ScanRefusal(f"memo index {key} is fetched but was never stored", self.at)
        self.stack.append(self.memo[key])
        if len(self.stack) > MAX_OBJECTS:
            raise ScanRefusal(f"more than {MAX_OBJECTS} items on the stack", self.at)
        return i

    def _binput(self, code: int, i: int) -> int:
        if code == 113:  # BINPUT: a 1-byte index; LONG_BINPUT: 4 bytes
            key, i = self.data[i + 1], i + 2
        else:
            key, i = int.from_bytes(self.data[i + 1:i + 5], "little"), i + 5
        memo = self.memo
        if key == len(memo) and key < MAX_OBJECTS:  # the next index, as sequential picklers write
            memo.append(self.stack[-1])
        else:
            self._store(key)
        return i

    def _memoize(self, code: int, i: int) -> int:
        self._store(len(self.memo))
        return i + 1

    def _text_memo(self, code: int, i: int) -> int:
        """GET and PUT: a decimal index on a line."""
        arg_at, i = self._argument(code, i)
        text = bytes(self.data[arg_at:i]).strip()
        if not text.isdigit() or len(text) > 12:
            raise ScanRefusal(f"bad memo index {text[:20]!r}", self.at)
        if code == 112:  # PUT
            self._store(int(text))
        else:
            self._fetch(int(text))
        return i

    # -- the stack and its marks ---------------------------------------------------------------
    def _mark(self, code: int, i: int) -> int:
        self.marks.append(self.stack)
        self.stack = []
        if len(self.marks) > _MAX_MARKS:
            raise ScanRefusal(f"more than {_MAX_MARKS} MARKs open at once", self.at)
        return i + 1

    def _pop(self, code: int, i: int) -> int:
        if self.stack:
            del self.stack[-1]
        else:
            self._since_mark()
        return i + 1

    def _pop_mark(self, code: int, i: int) -> int:
        self._since_mark()
        return i + 1

    def _dup(self, code: int, i: int) -> int:
        self.stack.append(self.stack[-1])
        self._created()  # not a new object, but a new stack slot: bounded alike
        return i + 1

    # -- containers ----------------------------------------------------------------------------
    def _extend(self, code: int, i: int) -> int:
        """APPENDS, SETITEMS, ADDITEMS: the items since the MARK go into the container under it."""
        self._since_mark()
        if not self.stack:
            raise ScanRefusal(f"{NAME[code]} with no container under its MARK", self.at)
        return i + 1

    def _append(self, code: int, i: int) -> int:
        """APPEND and BUILD: the top item goes into the one under it."""
        if len(self.stack) < 2:
            raise ScanRefusal(f"{NAME[code]} with fewer than two items on the stack", self.at)
        del self.stack[-1]
        return i + 1

    def _setitem(self, code: int, i: int) -> int:
        if len(self.stack) < 3:
            raise ScanRefusal("SETITEM with fewer than three items on the stack", self.at)
        del self.stack[-2:]
        return i + 1

    def _tuple_n(self, code: int, i: int) -> int:
        """TUPLE1, TUPLE2, TUPLE3: a tuple of the top 1, 2 or 3 items, one level deeper than they nest."""
        count = code - 0x84
        stack = self.stack
        if len(stack) < count:
            raise ScanRefusal(f"{NAME[code]} with fewer than {count} items on the stack", self.at)
        depth = 1 + max(d if d.__class__ is int else 0 for d in stack[-count:])
        del stack[-count:]
        stack.append(_depth(depth, self.at))
        self._created()
        return i + 1

    def _tuple(self, code: int, i: int) -> int:
        """TUPLE: a tuple of the items since the MARK."""
        items = self._since_mark()
        depth = 1 + max((d if d.__class__ is int else 0 for d in items), default=0)
        self.stack.append(_depth(depth, self.at))
        self._created()
        return i + 1

    def _collection(self, code: int, i: int) -> int:
        """LIST, DICT, FROZENSET: a container of the items since the MARK."""
        self._since_mark()
        self.stack.append(0)
        self._created()
        return i + 1

    # -- globals and calls ---------------------------------------------------------------------
    def _global(self, code: int, i: int) -> int:
        """GLOBAL names a global on two lines; INST also calls it with the items since the MARK."""
        arg_at, i = self._argument(code, i)
        module, _, name = bytes(self.data[arg_at:i - 1]).partition(b"\n")
        self._add_global(_decode(module, self.at), _decode(name, self.at))
        if code == 105:  # INST
            self._since_mark()
        self.stack.append(0)
        self._created()
        return i

    def _stack_global(self, code: int, i: int) -> int:
        module, name = self.stack[-2], self.stack[-1]
        if module.__class__ is not str or name.__class__ is not str:
            raise ScanRefusal("STACK_GLOBAL names a global with something other than two strings", self.at)
        self._add_global(module, name)
        del self.stack[-1]
        self.stack[-1] = 0
        self._created()
        return i + 1

    def _reduce(self, code: int, i: int) -> int:
        """REDUCE and NEWOBJ: a callable and its arguments become one object."""
        stack = self.stack
        del stack[-1]
        stack[-1] = 0
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            self._created()  # raises
        return i + 1

    def _obj(self, code: int, i: int) -> int:
        if not self._since_mark():
            raise ScanRefusal("OBJ with no class under its MARK", self.at)
        self.stack.append(0)
        self._created()
        return i + 1

    def _newobj_ex(self, code: int, i: int) -> int:
        del self.stack[-2:]
        self.stack[-1] = 0
        self._created()
        return i + 1

    def _persid(self, code: int, i: int) -> int:
        """PERSID (an id on a line) and BINPERSID (the id on the stack): the container's data."""
        if code == 81:  # BINPERSID
            self.stack[-1] = 0
            i += 1
        else:
            i = self._argument(code, i)[1]
            self.stack.append(0)
        self.result.persistent_ids += 1
        self._created()
        return i

    # -- framing -------------------------------------------------------------------------------
    def _proto(self, code: int, i: int) -> int:
        arg_at, i = self._argument(code, i)
        if self.data[arg_at] > 5:
            raise ScanRefusal(f"unsupported pickle protocol {self.data[arg_at]}", self.at)
        return i

    def _frame(self, code: int, i: int) -> int:
        return self._argument(code, i)[1]

    def _stop(self, code: int, i: int) -> int:
        if len(self.stack) != 1 or self.marks:
            raise ScanRefusal(f"STOP with {len(self.stack)} items on the stack and {len(self.marks)} open MARKs",
                              self.at)
        self.result.end = i + 1
        self.result.globals = list(self.seen)
        return -1

    def _refused(self, code: int, i: int) -> int:
        self._argument(code, i)  # an unknown opcode, or one whose argument is cut off, says so first
        raise ScanRefusal(f"opcode {NAME[code]} is not read here (extension registry or out-of-band buffers)",
                          self.at)


_DISPATCH: list[Callable[[_Scanner, int, int], int]] = [getattr(_Scanner, name) for name in HANDLER]


def _decode(raw: bytes, at: int) -> str:
    """A name as CPython's unpickler decodes it (UTF-8, lone surrogates passed through)."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ScanRefusal("a name that is not UTF-8", at) from None


def _depth(depth: int, at: int) -> int:
    if depth > MAX_TUPLE_DEPTH:
        raise ScanRefusal(f"tuples nest more than {MAX_TUPLE_DEPTH} deep", at)
    return depth
