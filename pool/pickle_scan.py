"""A static pass over a pickle's opcodes: prove it is bounded before anything unpickles it.

The scan runs nothing and builds nothing. It walks the opcode stream once, simulating the
unpickler's stack with placeholders, and refuses (`CorruptCheckpointError`) any pickle that:

* uses an opcode that is unknown, needs out-of-band buffers (``NEXT_BUFFER``) or the extension
  registry (``EXT1/2/4``), or whose argument runs past the end of the data;
* stores a memo index that no sequential pickler writes (``PUT 2000000000``: CPython's C
  unpickler grows an array to the largest index, a few bytes costing gigabytes), or fetches one
  never stored;
* nests tuples deeper than `MAX_TUPLE_DEPTH` (hashing a deeply nested tuple as a dict key or set
  element recurses in C and can crash the interpreter), or marks deeper than `MAX_MARKS`;
* has more than `MAX_OPCODES` opcodes, creates (or memoizes) more than `MAX_OBJECTS` objects,
  or pops what it never pushed;
* names a ``STACK_GLOBAL`` from anything but string constants.

It also lists every global the pickle names (``GLOBAL``, ``INST``, ``STACK_GLOBAL``) in order,
without importing anything, so a refusal can still say what the file asked for. Only a pickle
that passes is handed to the unpickler (`pool.unpickler`): the bytes it parses are exactly the
bytes checked here. Knows nothing of torch.
"""

from __future__ import annotations

import codecs
import pickletools
from dataclasses import dataclass, field

from .errors import CorruptCheckpointError, ScanRefusal

__all__ = ["ScanResult", "scan_pickle", "MAX_TUPLE_DEPTH", "MAX_OBJECTS", "MAX_MARKS", "MAX_OPCODES"]

MAX_TUPLE_DEPTH = 64  # real checkpoints nest tuples 3-4 deep (args tuples holding size tuples)
MAX_MARKS = 1_000  # open MARKs at once: a real module pickle keeps a handful
MAX_OBJECTS = 2_000_000  # objects one pickle may create (a ViT-L-14 module pickle: ~60,000)
MAX_GLOBALS = 10_000  # distinct globals one pickle may name (a ViT encoder: ~30)
MAX_OPCODES = 4_000_000  # opcodes in one pickle (a ViT-B-32 module pickle: ~20,000)

# Opcode kinds, by what they do to the stack.
(_ATOM, _TEXT_ATOM, _STRING, _TEXT_STRING, _BYTES, _POP, _POP_MARK, _DUP, _MARK, _TO_MARK_TUPLE,
 _TUPLE1, _TUPLE2, _TUPLE3, _TO_MARK_OBJ, _APPEND, _TO_MARK_KEEP, _SETITEM, _GLOBAL, _STACK_GLOBAL,
 _REDUCE, _BUILD, _INST, _OBJ, _NEWOBJ, _NEWOBJ_EX, _PUT, _BINPUT, _MEMOIZE, _GET, _BINGET,
 _PERSID, _BINPERSID, _PROTO, _FRAME, _STOP, _REFUSED) = range(36)

_KINDS: dict[str, int] = {
    "MARK": _MARK, "STOP": _STOP, "POP": _POP, "POP_MARK": _POP_MARK, "DUP": _DUP,
    "FLOAT": _TEXT_ATOM, "INT": _TEXT_ATOM, "LONG": _TEXT_ATOM, "BININT": _ATOM, "BININT1": _ATOM,
    "BININT2": _ATOM, "LONG1": _BYTES, "LONG4": _BYTES, "BINFLOAT": _ATOM, "NONE": _ATOM,
    "NEWTRUE": _ATOM, "NEWFALSE": _ATOM,
    "STRING": _TEXT_STRING, "UNICODE": _TEXT_STRING, "BINSTRING": _STRING,
    "SHORT_BINSTRING": _STRING, "BINUNICODE": _STRING, "SHORT_BINUNICODE": _STRING,
    "BINUNICODE8": _STRING, "BINBYTES": _BYTES, "SHORT_BINBYTES": _BYTES, "BINBYTES8": _BYTES,
    "BYTEARRAY8": _BYTES,
    "EMPTY_LIST": _ATOM, "EMPTY_TUPLE": _ATOM, "EMPTY_DICT": _ATOM, "EMPTY_SET": _ATOM,
    "APPEND": _APPEND, "APPENDS": _TO_MARK_KEEP, "LIST": _TO_MARK_OBJ, "TUPLE": _TO_MARK_TUPLE,
    "TUPLE1": _TUPLE1, "TUPLE2": _TUPLE2, "TUPLE3": _TUPLE3, "DICT": _TO_MARK_OBJ,
    "SETITEM": _SETITEM, "SETITEMS": _TO_MARK_KEEP, "ADDITEMS": _TO_MARK_KEEP,
    "FROZENSET": _TO_MARK_OBJ,
    "GLOBAL": _GLOBAL, "STACK_GLOBAL": _STACK_GLOBAL, "REDUCE": _REDUCE, "BUILD": _BUILD,
    "INST": _INST, "OBJ": _OBJ, "NEWOBJ": _NEWOBJ, "NEWOBJ_EX": _NEWOBJ_EX,
    "PUT": _PUT, "BINPUT": _BINPUT, "LONG_BINPUT": _BINPUT, "MEMOIZE": _MEMOIZE,
    "GET": _GET, "BINGET": _BINGET, "LONG_BINGET": _BINGET,
    "PERSID": _PERSID, "BINPERSID": _BINPERSID, "PROTO": _PROTO, "FRAME": _FRAME,
    "EXT1": _REFUSED, "EXT2": _REFUSED, "EXT4": _REFUSED, "NEXT_BUFFER": _REFUSED,
    "READONLY_BUFFER": _REFUSED,
}
# Argument layout per opcode byte: n >= 0 fixed bytes; -1/-4/-8 a little-endian length of that
# many bytes, then the bytes; -101 one newline-terminated line; -102 two lines; None: no opcode.
_ARG: list[int | None] = [None] * 256
_KIND: list[int] = [_REFUSED] * 256
_NAME: list[str] = ["?"] * 256


def _build_tables() -> None:
    variable = {pickletools.UP_TO_NEWLINE: -101, pickletools.TAKEN_FROM_ARGUMENT1: -1,
                pickletools.TAKEN_FROM_ARGUMENT4: -4, pickletools.TAKEN_FROM_ARGUMENT4U: -4,
                pickletools.TAKEN_FROM_ARGUMENT8U: -8}
    for op in pickletools.opcodes:
        code = ord(op.code)
        arg = op.arg
        _ARG[code] = 0 if arg is None else arg.n if arg.n >= 0 else variable[arg.n]
        _KIND[code] = _KINDS.get(op.name, _REFUSED)
        _NAME[code] = op.name
    _ARG[ord("c")] = _ARG[ord("i")] = -102  # GLOBAL and INST: module and name lines


_build_tables()
#: Opcodes torch's ``weights_only`` unpickler reads; it refuses a pickle using any other.
_TORCH_READS = [False] * 256
for _op in ("APPEND", "APPENDS", "BINFLOAT", "BINGET", "LONG_BINGET", "BININT", "BININT1", "BININT2",
            "BINPERSID", "BINPUT", "LONG_BINPUT", "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST",
            "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "LONG1", "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE",
            "PROTO", "REDUCE", "SETITEM", "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1", "TUPLE2",
            "TUPLE3"):
    _TORCH_READS[_NAME.index(_op)] = True
_LONG4, _BINSTRING = ord("\x8b"), ord("T")  # signed 4-byte lengths
_LARGE_BYTES_OPS = (ord("B"), ord("\x8e"))  # BINBYTES, BINBYTES8
_PY2_STRINGS = (ord("T"), ord("U"))  # BINSTRING, SHORT_BINSTRING
_UNICODE = ord("V")


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
        _scan(data, start, result, seen, large_bytes)
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


def _scan(data: bytes | memoryview, i: int, result: ScanResult,  # noqa: C901
          seen_globals: dict[tuple[str, str], None], large_bytes: int | None) -> None:
    n = len(data)
    stack: list = []  # per item: an int (tuple nesting depth; 0 for non-tuples) or a str constant
    marks: list[list] = []
    memo: list = []
    objects = 0
    from_bytes = int.from_bytes
    arg_of, kind_of, torch_reads = _ARG, _KIND, _TORCH_READS
    at = i

    def pop_mark() -> list:
        nonlocal stack
        if not marks:
            raise ScanRefusal("an opcode needs a MARK that was never set", at)
        items = stack
        stack = marks.pop()
        return items

    def add_global(module: str, name: str) -> None:
        seen_globals.setdefault((module, name), None)
        if len(seen_globals) > MAX_GLOBALS:
            raise ScanRefusal(f"it names more than {MAX_GLOBALS} distinct globals", at)

    def store(key: int) -> None:
        if key == len(memo):
            if key >= MAX_OBJECTS:
                raise ScanRefusal(f"more than {MAX_OBJECTS} memo entries", at)
            memo.append(stack[-1])
        elif key < len(memo):  # sequential picklers store 0, 1, 2, ...; a jump is a memory bomb
            memo[key] = stack[-1]
        else:
            raise ScanRefusal(f"memo index {key} skips ahead of the {len(memo)} stored so far", at)

    ops = 0
    # Each opcode takes at least one byte: a pickle shorter than the caps cannot exceed them, so
    # the counting (a fifth of the scan's time) is done only for longer ones.
    big = n - i > min(MAX_OPCODES, MAX_OBJECTS)
    fast = not big
    try:
        while i < n:
            code = data[i]
            if fast:  # the commonest opcodes of a module pickle, inlined (caps cannot be reached)
                if code == 104:  # BINGET
                    key = data[i + 1]
                    if key >= len(memo):
                        at = i
                        raise ScanRefusal(f"memo index {key} is fetched but was never stored", at)
                    stack.append(memo[key])
                    i += 2
                    continue
                if code == 114:  # LONG_BINPUT
                    key = from_bytes(data[i + 1:i + 5], "little")
                    if key == len(memo):
                        memo.append(stack[-1])
                        i += 5
                        continue
                elif code == 82:  # REDUCE
                    del stack[-1]
                    stack[-1] = 0
                    i += 1
                    continue
                elif code == 41:  # EMPTY_TUPLE
                    stack.append(0)
                    i += 1
                    continue
            at = i
            kind = kind_of[code]
            if not torch_reads[code]:
                result.foreign.add(_NAME[code])
            if big:
                ops += 1
                if ops > MAX_OPCODES:
                    raise ScanRefusal(f"more than {MAX_OPCODES} opcodes", at)
            # The most frequent opcodes first, their fixed-size arguments read inline.
            if kind == _BINGET or kind == _BINPUT:
                if code == 104 or code == 113:  # BINGET, BINPUT: a 1-byte index
                    key = data[i + 1]
                    i += 2
                else:  # LONG_BINGET, LONG_BINPUT: 4 bytes
                    key = from_bytes(data[i + 1:i + 5], "little")
                    i += 5
                if kind == _BINPUT:
                    store(key)
                    continue
                if key >= len(memo):
                    raise ScanRefusal(f"memo index {key} is fetched but was never stored", at)
                stack.append(memo[key])
                if big and len(stack) > MAX_OBJECTS:
                    raise ScanRefusal(f"more than {MAX_OBJECTS} items on the stack", at)
                continue
            if kind == _REDUCE or kind == _NEWOBJ or kind == _ATOM:
                if kind == _ATOM:
                    stack.append(0)
                    i += 1 + arg_of[code]
                else:
                    del stack[-1]
                    stack[-1] = 0
                    i += 1
                if big:
                    objects += 1
                    if objects > MAX_OBJECTS:
                        raise ScanRefusal(f"it creates more than {MAX_OBJECTS} objects", at)
                continue
            if kind == _MARK:
                marks.append(stack)
                stack = []
                if len(marks) > MAX_MARKS:
                    raise ScanRefusal(f"more than {MAX_MARKS} MARKs open at once", at)
                i += 1
                continue
            if kind == _TO_MARK_KEEP:  # APPENDS, SETITEMS, ADDITEMS: the container stays
                pop_mark()
                if not stack:
                    raise ScanRefusal(f"{_NAME[code]} with no container under its MARK", at)
                i += 1
                continue
            i += 1
            size = arg_of[code]
            if size is None:
                raise ScanRefusal(f"unknown opcode 0x{code:02x}", at)
            # -- the argument: data[arg_at:i]
            arg_at = i
            if size > 0:
                i += size
            elif size < 0:
                if size >= -8:
                    width = -size
                    if i + width > n:
                        raise ScanRefusal(f"{_NAME[code]} runs past the end of the data", at)
                    length = from_bytes(data[i:i + width], "little", signed=code in (_LONG4, _BINSTRING))
                    if length < 0:
                        raise ScanRefusal(f"{_NAME[code]} has a negative length", at)
                    arg_at = i + width
                    i = arg_at + length
                else:
                    i = _line(data, i, n)
                    if size == -102:
                        i = _line(data, i, n)
            if i > n:
                raise ScanRefusal(f"{_NAME[code]} claims {i - arg_at} bytes of argument; only "
                               f"{n - arg_at} follow", at)
            # -- the stack
            if kind == _TEXT_ATOM or kind == _BYTES:
                stack.append(0)
                objects += 1
                if large_bytes is not None and code in _LARGE_BYTES_OPS and i - arg_at >= large_bytes:
                    result.large.append((at, arg_at, i))
            elif kind == _STRING:
                if code in _PY2_STRINGS and not bytes(data[arg_at:i]).isascii():
                    raise ScanRefusal("a protocol-2 byte string (BINSTRING) of non-ASCII bytes, which readers "
                                   "decode differently (torch.load as UTF-8, old pickles as latin-1)", at)
                stack.append(_text(data, arg_at, i, code) if i - arg_at <= 256 else 0)
                objects += 1
            elif kind == _TEXT_STRING:
                stack.append(_text_line(bytes(data[arg_at:i - 1]), code) if i - arg_at <= 256 else 0)
                objects += 1
            elif kind == _BUILD or kind == _APPEND:
                if len(stack) < 2:
                    raise ScanRefusal(f"{_NAME[code]} with fewer than two items on the stack", at)
                del stack[-1]
            elif kind == _SETITEM:
                if len(stack) < 3:
                    raise ScanRefusal("SETITEM with fewer than three items on the stack", at)
                del stack[-2:]
            elif kind == _TUPLE1 or kind == _TUPLE2 or kind == _TUPLE3:
                count = kind - _TUPLE1 + 1
                if len(stack) < count:
                    raise ScanRefusal(f"{_NAME[code]} with fewer than {count} items on the stack", at)
                depth = 1 + max(d if d.__class__ is int else 0 for d in stack[-count:])
                del stack[-count:]
                stack.append(_depth(depth, at))
                objects += 1
            elif kind == _TO_MARK_TUPLE:
                items = pop_mark()
                depth = 1 + max((d if d.__class__ is int else 0 for d in items), default=0)
                stack.append(_depth(depth, at))
                objects += 1
            elif kind == _TO_MARK_OBJ:  # LIST, DICT, FROZENSET
                pop_mark()
                stack.append(0)
                objects += 1
            elif kind == _GET or kind == _PUT:
                text = bytes(data[arg_at:i]).strip()
                if not text.isdigit() or len(text) > 12:
                    raise ScanRefusal(f"bad memo index {text[:20]!r}", at)
                key = int(text)
                if kind == _PUT:
                    store(key)
                elif key >= len(memo):
                    raise ScanRefusal(f"memo index {key} is fetched but was never stored", at)
                else:
                    stack.append(memo[key])
            elif kind == _MEMOIZE:
                store(len(memo))
            elif kind == _GLOBAL or kind == _INST:
                module, _, name = bytes(data[arg_at:i - 1]).partition(b"\n")
                add_global(_decode(module, at), _decode(name, at))
                if kind == _INST:
                    pop_mark()
                stack.append(0)
                objects += 1
            elif kind == _STACK_GLOBAL:
                module, name = stack[-2], stack[-1]
                if module.__class__ is not str or name.__class__ is not str:
                    raise ScanRefusal("STACK_GLOBAL names a global with something other than two strings", at)
                add_global(module, name)
                del stack[-1]
                stack[-1] = 0
                objects += 1
            elif kind == _OBJ:
                if not pop_mark():
                    raise ScanRefusal("OBJ with no class under its MARK", at)
                stack.append(0)
                objects += 1
            elif kind == _NEWOBJ_EX:
                del stack[-2:]
                stack[-1] = 0
                objects += 1
            elif kind == _POP:
                if stack:
                    del stack[-1]
                else:
                    pop_mark()
            elif kind == _POP_MARK:
                pop_mark()
            elif kind == _DUP:
                stack.append(stack[-1])
                objects += 1  # not a new object, but a new stack slot: bounded alike
            elif kind == _PERSID or kind == _BINPERSID:
                if kind == _BINPERSID:
                    stack[-1] = 0
                else:
                    stack.append(0)
                result.persistent_ids += 1
                objects += 1
            elif kind == _PROTO:
                if data[arg_at] > 5:
                    raise ScanRefusal(f"unsupported pickle protocol {data[arg_at]}", at)
            elif kind == _FRAME:
                pass
            elif kind == _STOP:
                if len(stack) != 1 or marks:
                    raise ScanRefusal(f"STOP with {len(stack)} items on the stack and {len(marks)} open "
                                   "MARKs", at)
                result.end = i
                result.globals = list(seen_globals)
                return
            else:
                raise ScanRefusal(f"opcode {_NAME[code]} is not read here (extension registry or "
                               "out-of-band buffers)", at)
            if objects > MAX_OBJECTS:
                raise ScanRefusal(f"it creates more than {MAX_OBJECTS} objects", at)
    except IndexError:  # popped an empty stack, or an argument cut off by the end of the data
        raise ScanRefusal("an opcode needs more items than the stack holds, or its argument is cut off",
                       at) from None
    raise ScanRefusal("the pickle ends without a STOP opcode (truncated)", n)


def _decode(raw: bytes, at: int) -> str:
    """A name as CPython's unpickler decodes it (UTF-8, lone surrogates passed through)."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ScanRefusal("a name that is not UTF-8", at) from None


def _text(data: bytes | memoryview, start: int, stop: int, code: int) -> str | int:
    """A short string constant, as STACK_GLOBAL would see it (0 for byte strings of protocol 2)."""
    raw = bytes(data[start:stop])
    if code in _PY2_STRINGS:  # BINSTRING / SHORT_BINSTRING: decoded with the reader's latin-1
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return 0  # the unpickler refuses it; as a global name it is no string


def _text_line(raw: bytes, code: int) -> str | int:
    """A protocol-0 string as CPython decodes it: STRING is a quoted, escaped literal (read as
    latin-1 here, as the reader does), UNICODE is raw-unicode-escape (0: not a string)."""
    try:
        if code == _UNICODE:
            return raw.decode("raw_unicode_escape")
        if len(raw) >= 2 and raw[:1] == raw[-1:] and raw[:1] in (b"'", b'"'):
            return codecs.escape_decode(raw[1:-1])[0].decode("latin-1")
    except (UnicodeDecodeError, ValueError):
        pass
    return 0


def _depth(depth: int, at: int) -> int:
    if depth > MAX_TUPLE_DEPTH:
        raise ScanRefusal(f"tuples nest more than {MAX_TUPLE_DEPTH} deep", at)
    return depth
