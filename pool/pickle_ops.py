"""The pickle opcode tables `pool.pickle_scan` reads by: each opcode byte's argument layout,
name, handler family, and whether torch's ``weights_only`` unpickler reads it.

Built once from `pickletools`. Knows opcodes, nothing of what a pickle holds.
"""

from __future__ import annotations

import codecs
import pickletools

__all__ = ["ARG", "NAME", "HANDLER", "TORCH_READS", "LONG4", "BINSTRING", "LARGE_BYTES_OPS", "PY2_STRINGS",
           "UNICODE", "string_constant", "line_constant"]

# Argument layout per opcode byte: n >= 0 fixed bytes; -1/-4/-8 a little-endian length of that
# many bytes, then the bytes; -101 one newline-terminated line; -102 two lines; None: no opcode.
ARG: list[int | None] = [None] * 256
NAME: list[str] = ["?"] * 256
#: the `pool.pickle_scan` handler that handles each opcode, by name (families of opcodes share one)
_FAMILIES: dict[str, tuple[str, ...]] = {
    "_atom": ("BININT", "BININT1", "BININT2", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_LIST",
              "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET"),
    "_literal": ("FLOAT", "INT", "LONG", "LONG1", "LONG4", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
                "BYTEARRAY8"),
    "_string": ("BINSTRING", "SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"),
    "_text_string": ("STRING", "UNICODE"),
    "_binget": ("BINGET", "LONG_BINGET"), "_binput": ("BINPUT", "LONG_BINPUT"), "_memoize": ("MEMOIZE",),
    "_text_memo": ("GET", "PUT"),
    "_mark": ("MARK",), "_pop": ("POP",), "_pop_mark": ("POP_MARK",), "_dup": ("DUP",),
    "_extend": ("APPENDS", "SETITEMS", "ADDITEMS"), "_append": ("APPEND", "BUILD"), "_setitem": ("SETITEM",),
    "_tuple_n": ("TUPLE1", "TUPLE2", "TUPLE3"), "_tuple": ("TUPLE",), "_collection": ("LIST", "DICT", "FROZENSET"),
    "_global": ("GLOBAL", "INST"), "_stack_global": ("STACK_GLOBAL",), "_reduce": ("REDUCE", "NEWOBJ"),
    "_obj": ("OBJ",), "_newobj_ex": ("NEWOBJ_EX",), "_persid": ("PERSID", "BINPERSID"), "_proto": ("PROTO",),
    "_frame": ("FRAME",), "_stop": ("STOP",),
}  # any other opcode (EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER, unknown bytes): "_refused"
HANDLER: list[str] = ["_refused"] * 256


def _build_tables() -> None:
    variable = {pickletools.UP_TO_NEWLINE: -101, pickletools.TAKEN_FROM_ARGUMENT1: -1,
                pickletools.TAKEN_FROM_ARGUMENT4: -4, pickletools.TAKEN_FROM_ARGUMENT4U: -4,
                pickletools.TAKEN_FROM_ARGUMENT8U: -8}
    family = {name: handler for handler, names in _FAMILIES.items() for name in names}
    for op in pickletools.opcodes:
        code = ord(op.code)
        arg = op.arg
        ARG[code] = 0 if arg is None else arg.n if arg.n >= 0 else variable[arg.n]
        HANDLER[code] = family.get(op.name, "_refused")
        NAME[code] = op.name
    ARG[ord("c")] = ARG[ord("i")] = -102  # GLOBAL and INST: module and name lines


_build_tables()
#: Opcodes torch's ``weights_only`` unpickler reads; it refuses a pickle using any other.
TORCH_READS = [False] * 256
for _op in ("APPEND", "APPENDS", "BINFLOAT", "BINGET", "LONG_BINGET", "BININT", "BININT1", "BININT2",
            "BINPERSID", "BINPUT", "LONG_BINPUT", "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST",
            "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "LONG1", "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE",
            "PROTO", "REDUCE", "SETITEM", "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1", "TUPLE2",
            "TUPLE3"):
    TORCH_READS[NAME.index(_op)] = True
LONG4, BINSTRING = ord("\x8b"), ord("T")  # signed 4-byte lengths
LARGE_BYTES_OPS = (ord("B"), ord("\x8e"))  # BINBYTES, BINBYTES8
PY2_STRINGS = (ord("T"), ord("U"))  # BINSTRING, SHORT_BINSTRING
UNICODE = ord("V")


def string_constant(data: bytes | memoryview, start: int, stop: int, code: int) -> str | int:
    """A short string constant, as STACK_GLOBAL would see it.

    Args:
        data: the pickle's bytes.
        start: where the string's bytes start.
        stop: where they end.
        code: the opcode byte that holds it.

    Returns:
        The text (a protocol-2 byte string decoded as latin-1), or 0 for bytes no reader decodes.
    """
    raw = bytes(data[start:stop])
    if code in PY2_STRINGS:  # BINSTRING / SHORT_BINSTRING: decoded with the reader's latin-1
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return 0  # the unpickler refuses it; as a global name it is no string


def line_constant(raw: bytes, code: int) -> str | int:
    """A protocol-0 string as CPython decodes it.

    Args:
        raw: the line, without its newline.
        code: the opcode byte: STRING (a quoted, escaped literal, read as latin-1 here, as the
            reader does) or UNICODE (raw-unicode-escape).

    Returns:
        The text, or 0 when it is not a string.
    """
    try:
        if code == UNICODE:
            return raw.decode("raw_unicode_escape")
        if len(raw) >= 2 and raw[:1] == raw[-1:] and raw[:1] in (b"'", b'"'):
            return codecs.escape_decode(raw[1:-1])[0].decode("latin-1")
    except (UnicodeDecodeError, ValueError):
        pass
    return 0
