"""A structure-aware mutation engine for the differential test of ``pool`` against ``torch.load``.

Starts from REAL files (``torch.save`` output of small state dicts: several dtypes, shared storages
and views, a Parameter, nested dicts, a module's ``state_dict()``; zip and legacy containers;
pickle protocols 2 and 4), parses them into an editable structure, mutates it, and writes bytes:

* `Doc`: one checkpoint. A zip is its members (raw name bytes, general-purpose flags, data); a
  legacy file is its preamble pickles, its main pickle, its storage-key list and its raw storage
  records (key, element-count field, bytes). The main pickle (``data.pkl``) is a graph of `Node`s
  read by a symbolic unpickler (`parse_pickle`, over `pickletools.genops`: nothing is imported or
  called), written back by `emit_pickle` (shared nodes memoised, as pickle does).
* `MUTATIONS`: named mutation classes (`Mutation`), each ``fn(doc, rnd)``, applicable to zip,
  legacy or both. `mutate` applies a few of them.
* `compare`: loads one file with ``pool.checkpoint.load_state_dict`` and with
  ``torch.load(weights_only=True)`` and says how they disagree (None when they agree), under the
  gate's rule: whatever pool returns, torch returns too, key for key and byte for byte; whatever
  torch refuses, pool refuses (with a ``CheckpointError``).

Nothing here runs ``pickle.load`` or ``torch.load(weights_only=False)`` on a mutated file.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import pickletools
import random
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.redteam_files import LEGACY_MAGIC, ZipMember, zip_bytes

# -- the pickle graph ------------------------------------------------------------------------------


class Node:
    """A pickled object that is not a plain scalar. ``setitems`` / ``appends`` / ``builds`` are what
    SETITEMS, APPENDS and BUILD did to it afterwards (written back right after it)."""

    def __init__(self) -> None:
        self.setitems: list[tuple[Any, Any]] = []
        self.appends: list[Any] = []
        self.builds: list[Any] = []


class G(Node):
    def __init__(self, module: str, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"G({self.full})"


class Tup(Node):
    def __init__(self, items: list[Any]) -> None:
        super().__init__()
        self.items = list(items)

    def __repr__(self) -> str:
        return f"Tup({self.items!r})"


class Lst(Node):
    def __init__(self, items: list[Any] | None = None) -> None:
        super().__init__()
        self.appends = list(items or [])


class Dct(Node):
    def __init__(self, pairs: list[tuple[Any, Any]] | None = None) -> None:
        super().__init__()
        self.setitems = list(pairs or [])


class Call(Node):
    """func(*args) (REDUCE), cls.__new__(cls, *args) (NEWOBJ) or with kwargs (NEWOBJ_EX)."""

    def __init__(self, func: Any, args: Any, kind: str = "reduce", kwargs: Any = None) -> None:
        super().__init__()
        self.func, self.args, self.kind, self.kwargs = func, args, kind, kwargs

    @property
    def name(self) -> str | None:
        return self.func.full if isinstance(self.func, G) else None

    def __repr__(self) -> str:
        return f"Call({self.name}, {self.args!r})"


class Pid(Node):
    """BINPERSID of a persistent id (a `Tup`)."""

    def __init__(self, pid: Any) -> None:
        super().__init__()
        self.pid = pid

    def __repr__(self) -> str:
        return f"Pid({self.pid!r})"


class Raw(Node):
    """Opcodes written as they are (pushing exactly one value)."""

    def __init__(self, ops: bytes) -> None:
        super().__init__()
        self.ops = ops


def parse_pickle(data: bytes) -> tuple[Any, int, int]:  # noqa: C901 - one branch per opcode
    """A pickle -> (root node, protocol, end offset). Symbolic: nothing is imported or called."""
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    proto = 0

    def pop_mark() -> list[Any]:
        nonlocal stack
        items = stack
        stack = metastack.pop()
        return items

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name == "PROTO":
            proto = arg
        elif name == "FRAME":
            pass
        elif name == "STOP":
            return stack.pop(), proto, pos + 1
        elif name == "MARK":
            metastack.append(stack)
            stack = []
        elif name == "GLOBAL":
            module, gname = arg.split(" ", 1)
            stack.append(G(module, gname))
        elif name == "STACK_GLOBAL":
            gname = stack.pop()
            module = stack.pop()
            stack.append(G(module, gname))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name == "TUPLE":
            items = pop_mark()  # (stack.append(Tup(pop_mark())) would append to the popped list)
            stack.append(Tup(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = stack[-n:]
            del stack[-n:]
            stack.append(Tup(items))
        elif name == "EMPTY_TUPLE":
            stack.append(Tup([]))
        elif name == "EMPTY_LIST":
            stack.append(Lst())
        elif name == "EMPTY_DICT":
            stack.append(Dct())
        elif name == "APPEND":
            item = stack.pop()
            stack[-1].appends.append(item)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].appends.extend(items)
        elif name == "SETITEM":
            v, k = stack.pop(), stack.pop()
            stack[-1].setitems.append((k, v))
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].setitems.extend(zip(items[::2], items[1::2], strict=True))
        elif name == "REDUCE":
            args = stack.pop()
            stack[-1] = Call(stack[-1], args)
        elif name == "NEWOBJ":
            args = stack.pop()
            stack[-1] = Call(stack[-1], args, "newobj")
        elif name == "NEWOBJ_EX":
            kwargs, args = stack.pop(), stack.pop()
            stack[-1] = Call(stack[-1], args, "newobj_ex", kwargs)
        elif name == "BUILD":
            state = stack.pop()
            stack[-1].builds.append(state)
        elif name == "BINPERSID":
            stack[-1] = Pid(stack[-1])
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "POP":
            stack.pop()
        elif name == "DUP":
            stack.append(stack[-1])
        elif arg is not None or name in ("BINUNICODE", "SHORT_BINUNICODE"):
            stack.append(arg)  # ints, floats, strings, bytes
        else:
            raise ValueError(f"opcode {name} is not handled by the test's pickle parser")
    raise ValueError("no STOP")


def _scalar_ops(value: Any, protocol: int) -> bytes:
    """The opcodes that push one scalar (no PROTO / FRAME / memo / STOP)."""
    raw = pickletools.optimize(pickle.dumps(value, protocol=protocol))
    out = b""
    for op, _arg, pos in pickletools.genops(raw):
        if op.name in ("PROTO", "FRAME", "STOP", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            continue
        end = _op_end(raw, pos)
        out += raw[pos:end]
    return out


def _op_end(raw: bytes, pos: int) -> int:
    ops = list(pickletools.genops(raw[pos:]))  # the op at pos, then the next
    for _op, _arg, p in ops[1:2]:
        return pos + p
    return len(raw)


def _str_ops(text: str, protocol: int) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if protocol >= 4 and len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


class _PickleWriter:
    """Writes a node graph as pickle opcodes; nodes reached twice are memoised (BINPUT / BINGET)."""

    def __init__(self, root: Any, protocol: int) -> None:
        self.protocol = protocol
        self.counts: dict[int, int] = {}
        self.memo: dict[int, int] = {}
        self.out = bytearray()
        self._count(root)

    def _count(self, obj: Any) -> None:
        if isinstance(obj, (tuple, list)):
            for x in obj:
                self._count(x)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self._count(k)
                self._count(v)
        elif isinstance(obj, Node):
            self.counts[id(obj)] = self.counts.get(id(obj), 0) + 1
            if self.counts[id(obj)] == 1:
                for child in _children(obj):
                    self._count(child)

    def _put(self, obj: Node) -> None:
        if self.counts.get(id(obj), 0) > 1:
            index = len(self.memo)
            self.memo[id(obj)] = index
            self.out.extend(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def emit(self, obj: Any) -> None:
        if isinstance(obj, Node) and id(obj) in self.memo:
            index = self.memo[id(obj)]
            self.out.extend(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
        elif isinstance(obj, (tuple, list, dict)):
            self.emit(Tup(list(obj)) if isinstance(obj, tuple) else Lst(obj) if isinstance(obj, list)
                      else Dct(list(obj.items())))
        elif not isinstance(obj, Node):
            self.out.extend(_str_ops(obj, self.protocol) if isinstance(obj, str) else _scalar_ops(obj, self.protocol))
        else:
            self._node(obj)
            self._put(obj)
            self._after(obj)

    def _node(self, obj: Node) -> None:
        """The opcodes that push ``obj`` itself."""
        if isinstance(obj, G):
            if self.protocol >= 4:
                self.out.extend(_str_ops(obj.module, 4) + _str_ops(obj.name, 4) + b"\x93")
            else:
                self.out.extend(b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")
        elif isinstance(obj, Tup):
            self._marked(b"(", obj.items, b"t") if obj.items else self.out.extend(b")")
        elif isinstance(obj, (Lst, Dct)):
            self.out.extend(b"]" if isinstance(obj, Lst) else b"}")
        elif isinstance(obj, Call):
            self.emit(obj.func)
            self.emit(obj.args)
            if obj.kind == "newobj_ex":
                self.emit(obj.kwargs if obj.kwargs is not None else {})
            self.out.extend({"reduce": b"R", "newobj": b"\x81", "newobj_ex": b"\x92"}[obj.kind])
        elif isinstance(obj, Pid):
            self.emit(obj.pid)
            self.out.extend(b"Q")
        elif isinstance(obj, Raw):
            self.out.extend(obj.ops)

    def _marked(self, start: bytes, items: list[Any], end: bytes) -> None:
        self.out.extend(start)
        for x in items:
            self.emit(x)
        self.out.extend(end)

    def _after(self, obj: Node) -> None:
        """The appends, set-items and BUILDs applied to ``obj`` once it is on the stack."""
        if obj.appends:
            self._marked(b"(", obj.appends, b"e")
        if obj.setitems:
            self._marked(b"(", [x for pair in obj.setitems for x in pair], b"u")
        for state in obj.builds:
            self.emit(state)
            self.out.extend(b"b")


def emit_pickle(root: Any, protocol: int = 2) -> bytes:
    """The pickle of a node graph; nodes reached twice are memoised (BINPUT / BINGET)."""
    writer = _PickleWriter(root, protocol)
    writer.emit(root)
    return b"\x80" + bytes([protocol]) + bytes(writer.out) + b"."


def _children(obj: Node) -> list[Any]:
    kids: list[Any] = []
    if isinstance(obj, Tup):
        kids += obj.items
    elif isinstance(obj, Call):
        kids += [obj.func, obj.args] + ([obj.kwargs] if obj.kwargs is not None else [])
    elif isinstance(obj, Pid):
        kids.append(obj.pid)
    kids += obj.appends
    for k, v in obj.setitems:
        kids += [k, v]
    kids += obj.builds
    return kids


def walk_nodes(root: Any) -> list[Node]:
    """Every node reachable from root, each once, in first-reached order."""
    seen: set[int] = set()
    out: list[Node] = []
    pending = [root]
    while pending:
        obj = pending.pop()
        if isinstance(obj, (tuple, list)):
            pending.extend(reversed(obj))
            continue
        if not isinstance(obj, Node) or id(obj) in seen:
            continue
        seen.add(id(obj))
        out.append(obj)
        pending.extend(reversed(_children(obj)))
    return out


# -- storages and tensors ---------------------------------------------------------------------------
STORAGE_OF: dict[torch.dtype, str] = dict(torch.storage._dtype_to_storage_type_map())
DTYPE_OF = {name: dtype for dtype, name in STORAGE_OF.items()}
REBUILD_V2 = ("torch._utils", "_rebuild_tensor_v2")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_call(obj: Any, full: str) -> bool:
    return isinstance(obj, Call) and obj.name == full


def pid_fields(pid: Pid) -> list[Any]:
    return pid.pid.items if isinstance(pid.pid, Tup) else list(pid.pid)


# -- documents --------------------------------------------------------------------------------------
@dataclass
class Member:
    name: bytes
    data: bytes = b""
    flags: int = 0x800
    pickle: Any = None  # a node graph written as this member's data (data.pkl and its duplicates)


@dataclass
class Doc:
    """One editable checkpoint."""

    kind: str  # "zip" | "legacy"
    root: Any  # the main pickle's node graph
    protocol: int
    members: list[Member] = field(default_factory=list)  # zip
    prefix: str = "archive"  # zip
    preamble: bytes = b""  # legacy: magic, protocol, sys_info pickles
    records: list[list[Any]] = field(default_factory=list)  # legacy: [key, numel field, raw bytes]
    keys: list[Any] | None = None  # legacy storage-key list as written (None: the records' keys)
    trailer: bytes = b""  # legacy: bytes after the last record
    flips: list[tuple[float, int]] = field(default_factory=list)  # byte flips in the main pickle
    applied: list[str] = field(default_factory=list)
    next_key: int = 1000

    # storages
    def storage_pids(self) -> list[Pid]:
        return [n for n in walk_nodes(self.root) if isinstance(n, Pid)]

    def tensor_calls(self) -> list[Call]:
        return [n for n in walk_nodes(self.root) if is_call(n, "torch._utils._rebuild_tensor_v2")
                and isinstance(n.args, Tup) and len(n.args.items) >= 4]

    def entries(self) -> list[tuple[Node, int]]:
        """(mapping node, index in its setitems) of every dict entry."""
        return [(n, i) for n in walk_nodes(self.root) for i in range(len(n.setitems))]

    def storage_bytes(self, key: str) -> bytes | None:
        if self.kind == "zip":
            for m in self.members:
                if m.name == f"{self.prefix}/data/{key}".encode():
                    return m.data
            return None
        for rec in self.records:
            if rec[0] == key:
                return rec[2]
        return None

    def new_storage(self, dtype: torch.dtype, raw: bytes, key: str | None = None) -> Pid:
        """A new storage record with these bytes, and a persistent id for it."""
        if key is None:
            key = str(self.next_key)
            self.next_key += 1
        numel = len(raw) // itemsize(dtype)
        if self.kind == "zip":
            self.members.insert(-1, Member(f"{self.prefix}/data/{key}".encode(), raw))
            return Pid(Tup(["storage", G("torch", STORAGE_OF[dtype]), key, "cpu", numel]))
        self.records.append([key, numel, raw])
        if self.keys is not None:
            self.keys.append(key)
        return Pid(Tup(["storage", G("torch", STORAGE_OF[dtype]), key, "cpu", numel, None]))

    def new_tensor(self, rnd: random.Random, dtype: torch.dtype = torch.float32, numel: int = 4) -> Call:
        """A contiguous tensor over a new storage of random bytes (other weights than the file's)."""
        raw = bytes(rnd.randrange(1, 256) for _ in range(numel * itemsize(dtype)))
        return tensor_call(self.new_storage(dtype, raw), 0, (numel,), (1,))

    # bytes
    def pickle_bytes(self, root: Any = None) -> bytes:
        data = bytearray(emit_pickle(self.root if root is None else root, self.protocol))
        if root is None:
            for where, xor in self.flips:
                i = 2 + int(where * (len(data) - 3))
                data[i] ^= xor
        return bytes(data)

    def to_bytes(self) -> bytes:
        if self.kind == "zip":
            members = [ZipMember(m.name, self.pickle_bytes(None if m.pickle is True else m.pickle)
                                 if m.pickle is not None else m.data, flags=m.flags) for m in self.members]
            return zip_bytes(members)
        keys = [r[0] for r in self.records] if self.keys is None else self.keys
        out = bytearray(self.preamble + self.pickle_bytes() + emit_pickle(list(keys), 2))
        for _key, numel, raw in self.records:
            out += struct.pack("<q", numel) + raw
        return bytes(out + self.trailer)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def tensor_call(storage: Any, offset: int, size: tuple, stride: tuple, *extra: Any) -> Call:
    args = [storage, offset, Tup(list(size)), Tup(list(stride)), False, Call(G("collections", "OrderedDict"), Tup([]))]
    return Call(G(*REBUILD_V2), Tup(args + list(extra)))


def parse_doc(data: bytes) -> Doc:
    """A torch.save file (ours, trusted) -> an editable Doc."""
    if data.startswith(b"PK"):
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = []
        prefix = zf.infolist()[0].filename.split("/", 1)[0]
        root, proto = None, 2
        for info in zf.infolist():
            m = Member(info.filename.encode("utf-8"), zf.read(info), 0x800)
            if info.filename == f"{prefix}/data.pkl":
                root, proto, _ = parse_pickle(m.data)
                m.pickle = True
            members.append(m)
        return Doc("zip", root, proto, members=members, prefix=prefix)
    pos, preamble = 0, b""
    for _ in range(3):
        _, _, end = parse_pickle(data[pos:])
        preamble += data[pos:pos + end]
        pos += end
    root, proto, end = parse_pickle(data[pos:])
    pos += end
    keys_node, _, end = parse_pickle(data[pos:])
    pos += end
    keys = list(keys_node.appends)
    doc = Doc("legacy", root, proto, preamble=preamble)
    dtype_by_key = {}
    for pid in doc.storage_pids():
        f = pid_fields(pid)
        dtype_by_key[f[2]] = DTYPE_OF[f[1].name]
    for key in keys:
        (numel,) = struct.unpack_from("<q", data, pos)
        n = numel * itemsize(dtype_by_key[key])
        doc.records.append([key, numel, data[pos + 8:pos + 8 + n]])
        pos += 8 + n
    doc.trailer = data[pos:]
    return doc


# -- base files -------------------------------------------------------------------------------------
def base_objects() -> dict[str, Any]:
    """Small state dicts as real writers make them."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g)
    flat = {
        "w": w,
        "w_row": w[1],  # a view sharing w's storage (offset 4)
        "w_t": w.t(),  # non-contiguous view of the same storage
        "half": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "bf16": torch.linspace(-1, 1, 5, dtype=torch.bfloat16),
        "i64": torch.tensor([1, -2, 3 << 40]),
        "i32": torch.tensor([7, 8, 9], dtype=torch.int32),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "param": torch.nn.Parameter(torch.full((2, 2), 0.5)),
        "nested": {"a": torch.ones(2, dtype=torch.float32), "deeper": {"b": torch.zeros(3, dtype=torch.int16)}},
    }
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    return {"flat": flat, "module_sd": module.state_dict(), "wrapped": {"state_dict": {"x": torch.ones(4)},
                                                                          "epoch": 3}}


def torch_save_bytes(obj: Any, *, zip_format: bool, protocol: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
    return buf.getvalue()


_BASES: dict[str, bytes] = {}


def base_files() -> dict[str, bytes]:
    """name -> bytes of each base file (zip and legacy, protocols 2 and 4)."""
    if not _BASES:
        for name, obj in base_objects().items():
            for zip_format in (True, False):
                for protocol in (2, 4):
                    kind = "zip" if zip_format else "legacy"
                    _BASES[f"{name}-{kind}-p{protocol}"] = torch_save_bytes(obj, zip_format=zip_format,
                                                                            protocol=protocol)
    return _BASES


def base_doc(name: str) -> Doc:
    return parse_doc(base_files()[name])


# -- mutations --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    name: str
    fn: Callable[[Doc, random.Random], None]
    kinds: tuple[str, ...] = ("zip", "legacy")


MUTATIONS: dict[str, Mutation] = {}


def mutation(*kinds: str) -> Callable:
    def register(fn: Callable[[Doc, random.Random], None]) -> Callable:
        name = fn.__name__.removeprefix("m_")
        MUTATIONS[name] = Mutation(name, fn, kinds or ("zip", "legacy"))
        return fn
    return register


def _pick(rnd: random.Random, items: list) -> Any:
    return items[rnd.randrange(len(items))] if items else None


def _member(doc: Doc, suffix: str) -> Member | None:
    for m in doc.members:
        if m.name == f"{doc.prefix}/{suffix}".encode():
            return m
    return None


def _alt_root(doc: Doc, rnd: random.Random) -> Any:
    """A copy of the main pickle whose first tensor reads other (new) bytes."""
    alt = copy.deepcopy(doc.root)
    calls = [n for n in walk_nodes(alt) if is_call(n, "torch._utils._rebuild_tensor_v2")]
    if calls:
        call = calls[0]
        f = pid_fields(call.args.items[0]) if isinstance(call.args.items[0], Pid) else None
        if f is not None:
            dtype = DTYPE_OF.get(f[1].name, torch.float32)
            numel = f[4]
            new = doc.new_storage(dtype, bytes(rnd.randrange(256) for _ in range(numel * itemsize(dtype))))
            call.args.items[0] = new
    return alt


def _swap_case(text: str, rnd: random.Random) -> str:
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if not letters:
        return text
    chosen = set(rnd.sample(letters, rnd.randint(1, len(letters))))
    return "".join(c.swapcase() if i in chosen else c for i, c in enumerate(text))


# zip members -----------------------------------------------------------------------------------
@mutation("zip")
def m_member_case(doc: Doc, rnd: random.Random) -> None:
    """Rename one member to a case variant of its name."""
    m = _pick(rnd, doc.members)
    m.name = _swap_case(m.name.decode("utf-8", "surrogateescape"), rnd).encode("utf-8", "surrogateescape")


@mutation("zip")
def m_member_rename(doc: Doc, rnd: random.Random) -> None:
    """Rename one member: another folder, a suffix, a leading slash, a dot segment."""
    m = _pick(rnd, doc.members)
    name = m.name.decode("utf-8")
    head, _, tail = name.partition("/")
    m.name = _pick(rnd, [f"other/{tail}", f"{name}x", f"/{name}", f"{head}/./{tail}", f"{head}//{tail}",
                          f"{head}/{tail}/", f"{head}\\{tail}", f"x/{name}", tail]).encode()


@mutation("zip")
def m_member_duplicate(doc: Doc, rnd: random.Random) -> None:
    """A second member with the same (or a case-variant) name and other contents, before or after."""
    m = _pick(rnd, [m for m in doc.members if b"/data/" in m.name or m.pickle is not None])
    name = m.name if rnd.random() < 0.5 else _swap_case(m.name.decode(), rnd).encode()
    if m.pickle is not None:
        twin = Member(name, pickle=_alt_root(doc, rnd))
    else:
        twin = Member(name, bytes(rnd.randrange(256) for _ in range(len(m.data))))
    i = doc.members.index(m)
    doc.members.insert(i + 1 if rnd.random() < 0.7 else i, twin)


@mutation("zip")
def m_storage_case_pair(doc: Doc, rnd: random.Random) -> None:
    """Storage members data/a and data/A: two tensors over keys that differ in case only."""
    calls = [c for c in doc.tensor_calls() if isinstance(c.args.items[0], Pid)]  # not a storage call
    if len(calls) < 2:
        return
    a, b = rnd.sample(calls, 2)
    for call, key in ((a, "k"), (b, "K")):
        f = pid_fields(call.args.items[0])
        raw = doc.storage_bytes(f[2]) or b""
        pid = doc.new_storage(DTYPE_OF[f[1].name], raw, key)
        call.args.items[0] = pid
        pid.pid.items[4] = f[4]


@mutation("zip")
def m_name_encoding(doc: Doc, rnd: random.Random) -> None:
    """Non-ASCII names with the UTF-8 flag cleared (or set), or cp437 lookalikes."""
    choice = rnd.randrange(4)
    if choice == 0:  # the whole archive folder non-ASCII, UTF-8 flag cleared on some members
        new = "archivé"
        for m in doc.members:
            m.name = m.name.replace(doc.prefix.encode(), new.encode("utf-8"), 1)
            if rnd.random() < 0.5:
                m.flags &= ~0x800
        doc.prefix = new
    elif choice == 1:  # the folder spelled in cp437 bytes (é = 0x82), flag cleared
        new = "archivé"
        for m in doc.members:
            m.name = m.name.replace(doc.prefix.encode(), new.encode("cp437"), 1)
            m.flags &= ~0x800
        doc.prefix = new
    elif choice == 2:  # a storage key with non-ASCII characters, flag cleared on its member
        call = _pick(rnd, doc.tensor_calls())
        if call is None:
            return
        f = pid_fields(call.args.items[0])
        raw = doc.storage_bytes(f[2]) or b""
        key = _pick(rnd, ["é", "Ω", "ß", "Ä"])
        pid = doc.new_storage(DTYPE_OF[f[1].name], raw, key)
        pid.pid.items[4] = f[4]
        call.args.items[0] = pid
        member = doc.members[-2]
        member.flags &= ~0x800
        if rnd.random() < 0.5:
            member.name = member.name.decode("utf-8").encode("cp437", "replace")
    else:  # a member whose name bytes are cp437 for a UTF-8 name: the same name to a cp437 reader
        m = _pick(rnd, doc.members)
        m.flags ^= 0x800


@mutation("zip")
def m_drop_member(doc: Doc, rnd: random.Random) -> None:
    """Drop version / byteorder / data.pkl / .format_version / ... / a storage record."""
    m = _pick(rnd, doc.members)
    doc.members.remove(m)


@mutation("zip")
def m_member_content(doc: Doc, rnd: random.Random) -> None:
    """Other contents for version / byteorder / .format_version / .storage_alignment / serialization_id."""
    meta = [m for m in doc.members if m.pickle is None and b"/data/" not in m.name]
    m = _pick(rnd, meta)
    if m is not None:
        m.data = _pick(rnd, [b"", b"1\n", b"2\n", b"4\n", b"99\n", b"-1\n", b"big", b"little\n", b"LITTLE",
                             b"x", b"3", b"0\n", b"1000\n", b"\xff"])


@mutation("zip")
def m_member_extra(doc: Doc, rnd: random.Random) -> None:
    """A stray member: outside the folder, another pickle, an unused storage, TorchScript parts."""
    name = _pick(rnd, ["other/data.pkl", f"{doc.prefix}/extra", f"{doc.prefix}/data/9999",
                       f"{doc.prefix}/constants.pkl", f"{doc.prefix}/code/x.py", "top",
                       f"{doc.prefix}/.data/version", f"{doc.prefix}/data/sub/0", f"{doc.prefix}/data.pkl.bak"])
    data = emit_pickle(_alt_root(doc, rnd)) if name.endswith(".pkl") else b"3\n"
    doc.members.insert(rnd.randrange(len(doc.members) + 1), Member(name.encode(), data))


@mutation("zip")
def m_member_order(doc: Doc, rnd: random.Random) -> None:
    rnd.shuffle(doc.members)


@mutation("zip")
def m_storage_length(doc: Doc, rnd: random.Random) -> None:
    """A storage member longer or shorter than the pickle says."""
    m = _pick(rnd, [m for m in doc.members if b"/data/" in m.name])
    if m is not None:
        m.data = m.data[:rnd.randrange(len(m.data) + 1)] if rnd.random() < 0.5 else m.data + bytes(
            rnd.randrange(1, 9))


# pickle: rebuild states --------------------------------------------------------------------------
@mutation()
def m_from_type_state(doc: Doc, rnd: random.Random) -> None:
    """Wrap a tensor in _rebuild_from_type_v2(_rebuild_tensor_v2, torch.Tensor|Parameter, args, state)."""
    holders = [(n, i) for n, i in doc.entries() if is_call(n.setitems[i][1], "torch._utils._rebuild_tensor_v2")]
    if not holders:
        return
    node, i = _pick(rnd, holders)
    k, call = node.setitems[i]
    other = doc.new_tensor(rnd)
    state = _pick(rnd, [{"data": other}, (Dct([("data", other)]), {"x": 1}), ({}, {"data": other}), {},
                        {"requires_grad": True}, Dct([("foo", 1)]), (None, {"foo": 1}), None])
    cls = _pick(rnd, [G("torch._tensor", "Tensor"), G("torch", "Tensor"), G("torch.nn.parameter", "Parameter")])
    wrapped = Call(G("torch._tensor", "_rebuild_from_type_v2"), Tup([call.func, cls, call.args, state]))
    node.setitems[i] = (k, wrapped)


@mutation()
def m_parameter_state(doc: Doc, rnd: random.Random) -> None:
    """A Parameter rebuilt with _rebuild_parameter_with_state(data, requires_grad, hooks, state)."""
    holders = [(n, i) for n, i in doc.entries() if isinstance(n.setitems[i][1], Call)
               and n.setitems[i][1].name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2")]
    if not holders:
        return
    node, i = _pick(rnd, holders)
    k, call = node.setitems[i]
    data = call.args.items[0] if call.name == "torch._utils._rebuild_parameter" else call
    other = doc.new_tensor(rnd)
    state = _pick(rnd, [{"data": other}, (Dct([("data", other)]), Dct()), (None, {"data": other}), {},
                        {"foo": 1}, ({"foo": 1}, None)])
    hooks = Call(G("collections", "OrderedDict"), Tup([]))
    node.setitems[i] = (k, Call(G("torch._utils", "_rebuild_parameter_with_state"),
                                Tup([data, rnd.random() < 0.5, hooks, state])))


@mutation()
def m_tensor_metadata(doc: Doc, rnd: random.Random) -> None:
    """_rebuild_tensor_v2 with a metadata dict (7th argument) or non-empty backward hooks."""
    call = _pick(rnd, doc.tensor_calls())
    if call is None:
        return
    items = call.args.items
    if rnd.random() < 0.5:
        del items[6:]
        items.append(_pick(rnd, [{"foo": 1}, {}, None, {"requires_grad": True}]))
    else:
        hooks = Call(G("collections", "OrderedDict"), Tup([]))
        hooks.setitems.append((0, _pick(rnd, [None, 1, "x"])))
        items[5] = hooks


@mutation()
def m_build_tensor(doc: Doc, rnd: random.Random) -> None:
    """BUILD on a tensor (torch: Tensor.set_(*state)) or on a Parameter / OrderedDict."""
    calls = doc.tensor_calls()
    if not calls:
        return
    call = _pick(rnd, calls)
    other = doc.new_tensor(rnd)
    if rnd.random() < 0.6:
        f = other.args.items
        call.builds.append(Tup([f[0], 0, Tup([2]), Tup([1])]))
    else:
        call.builds.append(_pick(rnd, [Dct([("foo", 1)]), Tup([other]), (None, {"x": 1})]))


@mutation()
def m_root_build(doc: Doc, rnd: random.Random) -> None:
    """BUILD on the root mapping / a nested OrderedDict (attributes, not items)."""
    maps = [n for n in walk_nodes(doc.root) if n.setitems]
    m = _pick(rnd, maps)
    if m is not None:
        m.builds.append(Dct([("w", doc.new_tensor(rnd)), ("_metadata", Dct())]))


# pickle: storages ----------------------------------------------------------------------------------
@mutation()
def m_storage_dtype(doc: Doc, rnd: random.Random) -> None:
    """One persistent id names its storage with another class (another dtype)."""
    pid = _pick(rnd, doc.storage_pids())
    if pid is not None:
        f = pid_fields(pid)
        f[1] = G(_pick(rnd, ["torch", "torch", "torch.cuda"]),
                 _pick(rnd, ["FloatStorage", "IntStorage", "ByteStorage", "HalfStorage", "DoubleStorage",
                             "LongStorage", "BoolStorage", "UntypedStorage", "BFloat16Storage", "ShortStorage"]))


@mutation()
def m_storage_key_reuse(doc: Doc, rnd: random.Random) -> None:
    """A tensor's persistent id names another tensor's key (same or another dtype / size)."""
    pids = doc.storage_pids()
    if len(pids) < 2:
        return
    a, b = rnd.sample(pids, 2)
    fa, fb = pid_fields(a), pid_fields(b)
    fa[2] = fb[2]
    if rnd.random() < 0.5:
        fa[4] = fb[4]


@mutation()
def m_storage_numel(doc: Doc, rnd: random.Random) -> None:
    pid = _pick(rnd, doc.storage_pids())
    if pid is not None:
        f = pid_fields(pid)
        f[4] = _pick(rnd, [0, 1, f[4] - 1, f[4] + 1, f[4] * 2, -1, 1 << 40, (1 << 63) - 1])


@mutation()
def m_storage_location(doc: Doc, rnd: random.Random) -> None:
    pid = _pick(rnd, doc.storage_pids())
    if pid is not None:
        pid_fields(pid)[3] = _pick(rnd, ["bogus", "meta", "CPU", "cpu:0", "", 7, None])


@mutation()
def m_storage_pid_shape(doc: Doc, rnd: random.Random) -> None:
    """Persistent ids of other lengths / tags; a view on a zip pid."""
    pid = _pick(rnd, doc.storage_pids())
    if pid is None:
        return
    f = pid_fields(pid)
    choice = rnd.randrange(4)
    if choice == 0:
        f.append(None) if len(f) == 5 else f.pop()
    elif choice == 1:
        f[0] = _pick(rnd, [b"storage", "Storage", "module"])
    elif choice == 2:
        f[2] = _pick(rnd, [int(f[2]) if str(f[2]).isdigit() else 0, f"{f[2]} ", f"../{f[2]}", f"{f[2]}/x"])
    else:
        if len(f) == 5:
            f.append(None)
        f[5] = Tup([f"v{rnd.randrange(3)}", rnd.randrange(3), rnd.randrange(1, 4)])


@mutation()
def m_tensor_geometry(doc: Doc, rnd: random.Random) -> None:
    """Offsets, sizes, strides changed: out of bounds, negative, overlapping, zero."""
    call = _pick(rnd, doc.tensor_calls())
    if call is None:
        return
    items = call.args.items
    choice = rnd.randrange(3)
    if choice == 0:
        items[1] = _pick(rnd, [items[1] + 1, items[1] - 1, -1, 1 << 40, 2, 0, True, 1.0])
    elif choice == 1:
        size = items[2]
        if isinstance(size, Tup) and size.items:
            j = rnd.randrange(len(size.items))
            size.items[j] = _pick(rnd, [0, 1, size.items[j] + 1, -1, 1 << 31, 1 << 62])
        else:
            items[2] = Tup([_pick(rnd, [1, 2, 100])])
            items[3] = Tup([1])
    else:
        stride = items[3]
        if isinstance(stride, Tup) and stride.items:
            j = rnd.randrange(len(stride.items))
            stride.items[j] = _pick(rnd, [0, -1, stride.items[j] + 1, 1 << 40, 2])
        else:
            items[3] = Tup([1])


@mutation()
def m_drop_entry(doc: Doc, rnd: random.Random) -> None:
    entries = doc.entries()
    if entries:
        node, i = _pick(rnd, entries)
        del node.setitems[i]


@mutation()
def m_duplicate_key(doc: Doc, rnd: random.Random) -> None:
    """The same dict key twice (later wins in pickle)."""
    entries = [(n, i) for n, i in doc.entries() if isinstance(n.setitems[i][1], Call)]
    if entries:
        node, i = _pick(rnd, entries)
        k = node.setitems[i][0]
        node.setitems.insert(rnd.randrange(len(node.setitems) + 1), (k, doc.new_tensor(rnd)))


@mutation()
def m_extra_storage_call(doc: Doc, rnd: random.Random) -> None:
    """An entry built by calling a storage class: NEWOBJ / NEWOBJ_EX / REDUCE, beside real weights."""
    cls = G(_pick(rnd, ["torch", "torch.storage"]), _pick(rnd, ["UntypedStorage", "FloatStorage", "TypedStorage"]))
    kind = _pick(rnd, ["reduce", "newobj", "newobj_ex"])
    args = Tup([_pick(rnd, [8, 0, 1 << 36 if kind == "newobj_ex" else 16])])  # no big allocation in torch
    kwargs = Dct([("device", _pick(rnd, ["cpu", "cuda", "meta"]))]) if kind == "newobj_ex" else None
    call = Call(cls, args, kind, kwargs)
    holder = _pick(rnd, [n for n in walk_nodes(doc.root) if n.setitems])
    if holder is None:
        return
    value = call if rnd.random() < 0.5 else tensor_call(call, 0, (2,), (1,))
    holder.setitems.append((f"extra{rnd.randrange(9)}", value))


@mutation()
def m_many_records(doc: Doc, rnd: random.Random) -> None:
    """Many entries (bounded: a few thousand), each the same tensor again or a new call of it."""
    calls = doc.tensor_calls()
    holder = _pick(rnd, [n for n in walk_nodes(doc.root) if n.setitems])
    if not calls or holder is None:
        return
    call = _pick(rnd, calls)
    n = rnd.choice([2000, 5000])
    if rnd.random() < 0.5:
        holder.setitems.extend((f"many{i}", call) for i in range(n))
    else:
        holder.setitems.extend((f"many{i}", Call(call.func, call.args)) for i in range(n))


@mutation()
def m_byte_flip(doc: Doc, rnd: random.Random) -> None:
    for _ in range(rnd.randint(1, 3)):
        doc.flips.append((rnd.random(), 1 << rnd.randrange(8)))


@mutation()
def m_wrap_root(doc: Doc, rnd: random.Random) -> None:
    """Wrap the root: {"state_dict": root, ...}, a list, a tuple, a Parameter of it."""
    choice = rnd.randrange(3)
    if choice == 0:
        doc.root = Dct([("state_dict", doc.root), ("other", doc.new_tensor(rnd))])
    elif choice == 1:
        doc.root = Dct([("a", doc.root), ("b", Lst([doc.new_tensor(rnd)]))])
    else:
        doc.root = Tup([doc.root])


@mutation()
def m_ordered_dict_args(doc: Doc, rnd: random.Random) -> None:
    """An OrderedDict built from a list of pairs (its args) rather than SETITEMS; or from a dict."""
    maps = [n for n in walk_nodes(doc.root) if is_call(n, "collections.OrderedDict") and n.setitems]
    m = _pick(rnd, maps)
    if m is None:
        return
    pairs, m.setitems = m.setitems, []
    if rnd.random() < 0.5:
        m.args = Tup([Lst([Tup([k, v]) for k, v in pairs])])
    else:
        m.args = Tup([Dct(pairs)])
    if rnd.random() < 0.5:  # and one more entry after, overriding one
        m.setitems.append((pairs[0][0], doc.new_tensor(rnd)))


# legacy stream ------------------------------------------------------------------------------------
@mutation("legacy")
def m_legacy_view(doc: Doc, rnd: random.Random) -> None:
    """Legacy storage views (view_key, offset, size): a view key reused, or equal to a root key."""
    pids = doc.storage_pids()
    if len(pids) < 2:
        return
    a, b = rnd.sample(pids, 2)
    fa, fb = pid_fields(a), pid_fields(b)
    if len(fa) < 6 or len(fb) < 6:  # an earlier mutation reshaped these ids: no view field to set
        return
    choice = rnd.randrange(3)
    if choice == 0:  # two views with one view key, different offsets
        fa[5] = Tup(["view", 0, 1])
        fb[5] = Tup(["view", 1, 1]) if fb[2] == fa[2] else Tup(["view", 0, 1])
    elif choice == 1:  # a view key equal to another storage's root key
        fa[5] = Tup([fb[2], 0, 1])
    else:  # a view, then a root named like it
        fa[5] = Tup([f"v{fa[2]}", rnd.randrange(2), 1])
        key = f"v{fa[2]}"
        raw = doc.storage_bytes(fb[2]) or b""
        if doc.storage_bytes(key) is None:
            dtype = DTYPE_OF[fb[1].name]
            doc.records.append([key, len(raw) // itemsize(dtype), raw])
            if doc.keys is not None:
                doc.keys.append(key)
        fb[2] = key


@mutation("legacy")
def m_legacy_keys(doc: Doc, rnd: random.Random) -> None:
    """The storage-key list reordered, duplicated, short, or with a stranger."""
    keys = [r[0] for r in doc.records]
    choice = rnd.randrange(4)
    if choice == 0 and len(doc.records) > 1:
        rnd.shuffle(doc.records)
        doc.keys = keys  # the list keeps the old order
    elif choice == 1 and doc.records:
        doc.records.append(list(_pick(rnd, doc.records)))
        doc.records[-1][2] = bytes(rnd.randrange(256) for _ in range(len(doc.records[-1][2])))
    elif choice == 2 and doc.records:
        doc.records.pop(rnd.randrange(len(doc.records)))
    else:
        doc.keys = keys + ["stranger"]


@mutation("legacy")
def m_legacy_record(doc: Doc, rnd: random.Random) -> None:
    """A record's element-count field changed, bytes cut or grown; trailing bytes."""
    rec = _pick(rnd, doc.records)
    if rec is None:
        return
    choice = rnd.randrange(3)
    if choice == 0:
        rec[1] = _pick(rnd, [rec[1] + 1, rec[1] - 1, -1, 0, 1 << 40])
    elif choice == 1:
        rec[2] = rec[2][:-1] if rnd.random() < 0.5 else rec[2] + b"\0" * rnd.randrange(1, 9)
    else:
        doc.trailer = _pick(rnd, [b"\0", b"garbage", emit_pickle(["x"], 2)])


@mutation("legacy")
def m_legacy_preamble(doc: Doc, rnd: random.Random) -> None:
    """Other sys_info (big-endian, other type sizes), protocol version or magic."""
    sys_info = _pick(rnd, [{"protocol_version": 1001, "little_endian": False, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                           {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}},
                           {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                           {}, None, 7])
    magic = LEGACY_MAGIC if rnd.random() < 0.8 else LEGACY_MAGIC + 1
    version = 1001 if rnd.random() < 0.8 else _pick(rnd, [1000, 1002])
    doc.preamble = (emit_pickle(magic, 2) + emit_pickle(version, 2) + emit_pickle(sys_info, 2))


def applicable(doc: Doc) -> list[str]:
    return sorted(name for name, m in MUTATIONS.items() if doc.kind in m.kinds)


def mutate(doc: Doc, rnd: random.Random, names: list[str] | None = None, count: int | None = None) -> Doc:
    """Apply ``names`` (or 1-3 random applicable mutations) to ``doc`` in place; return it."""
    if names is None:
        pool_of = applicable(doc)
        names = [rnd.choice(pool_of) for _ in range(count or rnd.randint(1, 3))]
    for name in names:
        MUTATIONS[name].fn(doc, rnd)
        doc.applied.append(name)
    return doc


# -- the two readers ----------------------------------------------------------------------------------
def flatten(obj: Any) -> dict[str, torch.Tensor] | None:
    """torch's result read the way pool reads a checkpoint: a root ``{"state_dict": mapping}``
    unwrapped, nested mappings joined with ".", tensors kept, anything else dropped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    out: dict[str, torch.Tensor] = {}

    def go(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix[:-1] if prefix else ""] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                go(v, f"{prefix}{k}.")

    go(obj, "")
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)  # flat, stride 1 (size-1 dims keep odd strides otherwise)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


@dataclass
class Outcome:
    pool: dict[str, torch.Tensor] | None
    pool_error: BaseException | None
    torch: dict[str, torch.Tensor] | None
    torch_error: BaseException | None


def load_both(path: Path) -> Outcome:
    """pool.checkpoint.load_state_dict and torch.load(weights_only=True) on one file. pool's
    refusals must be CheckpointError: anything else propagates (a bug)."""
    from pool.checkpoint import load_state_dict
    from pool.errors import CheckpointError

    pool_sd = pool_err = torch_sd = torch_err = None
    try:
        pool_sd = load_state_dict(path)
    except CheckpointError as exc:
        pool_err = exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch_sd = flatten(torch.load(path, weights_only=True))
        except BaseException as exc:  # torch may raise anything on a crafted file
            if isinstance(exc, KeyboardInterrupt):
                raise
            torch_err = exc
    return Outcome(pool_sd, pool_err, torch_sd, torch_err)


def torch_reason(exc: BaseException | None) -> str:
    """One line of why torch refused (its weights_only message is long: what follows
    "WeightsUnpickler error:")."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:240]


def disagreement(out: Outcome) -> str | None:
    """Why the outcome breaks the gate's promise, or None."""
    if out.pool is None:
        return None  # pool refused: always allowed
    if out.torch is None:
        return f"lax: pool loads {sorted(out.pool)[:4]}..., torch refuses: {torch_reason(out.torch_error)}"
    if set(out.pool) != set(out.torch):
        return (f"spoof: other keys: pool only {sorted(set(out.pool) - set(out.torch))[:5]}, "
                f"torch only {sorted(set(out.torch) - set(out.pool))[:5]}")
    for key in out.pool:
        a, b = out.pool[key], out.torch[key]
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            return f"spoof: {key!r}: pool {a.dtype} {tuple(a.shape)}, torch {b.dtype} {tuple(b.shape)}"
        if b.device.type != "cpu":
            return f"spoof: {key!r}: pool reads bytes, torch gives a tensor on {b.device} ({b.device.type} location)"
        if tensor_bytes(a) != tensor_bytes(b):
            return f"spoof: {key!r}: other bytes (pool {a.flatten()[:4].tolist()}, torch {b.flatten()[:4].tolist()})"
    return None


def check_file(path: Path) -> str | None:
    return disagreement(load_both(path))


if __name__ == "__main__":  # a census: python -m tests.differential [N] [p4]
    import re
    import sys
    import tempfile
    from collections import Counter

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    names = [b for b in sorted(base_files()) if ("p4" in sys.argv) == b.endswith("p4")]
    seen: Counter = Counter()
    examples: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(n):
            rnd = random.Random(seed)
            name = rnd.choice(names)
            doc = base_doc(name)
            mutate(doc, rnd, count=1)
            path = doc.write(Path(tmp) / f"{seed}.pt")
            why = check_file(path)
            if why:
                short = re.sub(r"\d+|'[^']*'|\[[^]]*\]", "#", why.split("torch refuses:")[-1])[:70]
                tag = f"{name.split('-')[1]}:{'+'.join(doc.applied)}:{why.split(':')[0]}:{short}"
                seen[tag] += 1
                examples.setdefault(tag, f"{name} seed {seed}: {why}")
            os.unlink(path)
    for tag, c in seen.most_common():
        print(c, tag, "\n      ", examples[tag][:300])
