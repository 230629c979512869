"""Builders for the hostile checkpoint files of ``test_redteam.py`` (and the legit ones they mimic).

Everything here makes bytes; nothing reads a checkpoint. Pickles are assembled opcode by opcode
(`Op`), so a test can name any global, any memo index, any length prefix, whatever pickle's own
writer would refuse to produce. Containers are written by hand too (`torch_zip`, `legacy_file`,
`ZipMember`/`zip_bytes`, `tar_bytes`, `safetensors_bytes`), shaped like torch's own output (64-byte
aligned zip records, the legacy magic / protocol / sys_info preamble) so that a benign file from the
same builder reads with ``torch.load(weights_only=True)``: a hostile variant then differs from a
legit file only in the feature under test.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# -- pickle assembler ---------------------------------------------------------------------------
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
DTYPE_STORAGE = {torch.float32: "FloatStorage", torch.uint8: "ByteStorage", torch.int64: "LongStorage"}


class Op:
    """Pickle opcodes as bytes. Every method returns the opcodes that push one value."""

    @staticmethod
    def data(value: Any) -> bytes:
        """Plain data (None, bool, int, str, bytes, tuples/lists/dicts of them) without memo ops,
        so it cannot collide with the memo indexes a test uses on purpose."""
        return pickletools.optimize(pickle.dumps(value, protocol=3))[2:-1]

    @staticmethod
    def str(text: str) -> bytes:
        """BINUNICODE, any code point (lone surrogates too: pickle decodes with surrogatepass)."""
        raw = text.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(raw)) + raw

    @staticmethod
    def glob(module: str, name: str) -> bytes:
        """GLOBAL: module and name on their own lines (no newline inside either)."""
        return b"c" + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n"

    @staticmethod
    def stack_glob(module: str, name: str) -> bytes:
        """STACK_GLOBAL (protocol 4): module and name as strings, any characters."""
        return Op.str(module) + Op.str(name) + b"\x93"

    @staticmethod
    def tuple(*items: bytes) -> bytes:
        return b"(" + b"".join(items) + b"t"

    @staticmethod
    def call(func: bytes, *args: bytes) -> bytes:
        """func(*args) through REDUCE."""
        return func + Op.tuple(*args) + b"R"

    @staticmethod
    def newobj(cls: bytes, *args: bytes) -> bytes:
        """cls.__new__(cls, *args) through NEWOBJ (protocol 2), no REDUCE involved."""
        return cls + Op.tuple(*args) + b"\x81"

    @staticmethod
    def build(obj: bytes, state: bytes) -> bytes:
        return obj + state + b"b"

    @staticmethod
    def dict(*items: tuple[bytes, bytes]) -> bytes:
        return b"}(" + b"".join(k + v for k, v in items) + b"u"

    @staticmethod
    def ordered_dict() -> bytes:
        return Op.call(Op.glob("collections", "OrderedDict"))

    @staticmethod
    def put(index: int) -> bytes:
        return b"r" + struct.pack("<I", index)

    @staticmethod
    def get(index: int) -> bytes:
        return b"j" + struct.pack("<I", index)


def pickle_of(body: bytes, protocol: int = 2) -> bytes:
    """PROTO, the body, STOP."""
    return b"\x80" + bytes([protocol]) + body + b"."


def rebuild_v2(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    return Op.call(Op.glob("torch._utils", "_rebuild_tensor_v2"), storage, Op.data(offset), Op.data(size),
                   Op.data(stride), Op.data(False), Op.ordered_dict())


# -- containers ----------------------------------------------------------------------------------
@dataclass
class Storage:
    """One storage record a pickle refers to: key, dtype, raw bytes (the file's data)."""

    key: str
    dtype: torch.dtype
    raw: bytes

    @property
    def numel(self) -> int:
        return len(self.raw) // torch.empty((), dtype=self.dtype).element_size()


class Pickled:
    """One pickle and the storages it refers to, writable into any container.

    `storage(key, dtype, raw)` returns the opcodes that push that storage in the container's own
    way: a persistent id for ``zip`` and ``legacy``, a ``torch.storage._load_from_bytes`` blob (a
    legacy file) for the plain ``pickle`` container. Memoised (indexes dense from 0, as every
    pickle writer numbers them): a second use of a key is a BINGET.
    """

    def __init__(self, container: str) -> None:
        if container not in ("zip", "legacy", "pickle"):
            raise ValueError(container)
        self.container = container
        self.storages: dict[str, Storage] = {}
        self._memo: dict[str, int] = {}
        self._next_memo = 0  # dense from 0, as every pickle writer numbers its memo

    def storage(self, key: str, dtype: torch.dtype, raw: bytes, *, numel: int | None = None) -> bytes:
        if key in self._memo:
            return Op.get(self._memo[key])
        record = Storage(key, dtype, raw)
        self.storages[key] = record
        count = record.numel if numel is None else numel
        type_ops = Op.glob("torch", DTYPE_STORAGE[dtype])
        if self.container == "zip":
            ops = Op.tuple(Op.data("storage"), type_ops, Op.data(key), Op.data("cpu"), Op.data(count)) + b"Q"
        elif self.container == "legacy":
            ops = Op.tuple(Op.data("storage"), type_ops, Op.data(key), Op.data("cpu"), Op.data(count),
                           Op.data(None)) + b"Q"
        else:
            inner = Pickled("legacy")
            blob = inner.finish(inner.storage(key, dtype, raw, numel=numel))
            ops = Op.call(Op.glob("torch.storage", "_load_from_bytes"), Op.data(blob))
        self._memo[key] = self._next_memo
        self._next_memo += 1
        return ops + Op.put(self._memo[key])

    def tensor(self, key: str, values: torch.Tensor) -> bytes:
        """A contiguous tensor over its own storage record, as torch.save writes it."""
        values = values.contiguous()
        raw = values.numpy().tobytes()
        storage = self.storage(key, values.dtype, raw)
        return rebuild_v2(storage, 0, tuple(values.shape), tuple(values.stride()))

    def finish(self, body: bytes, *, protocol: int = 2, storage_keys: list[str] | None = None) -> bytes:
        """The whole file: ``body`` (opcodes pushing the root object) in this container."""
        data_pkl = pickle_of(body, protocol)
        if self.container == "zip":
            return torch_zip(data_pkl, {s.key: s.raw for s in self.storages.values()})
        if self.container == "legacy":
            keys = list(self.storages) if storage_keys is None else storage_keys
            return legacy_file(data_pkl, list(self.storages.values()), keys)
        return data_pkl

    def write(self, path: Path, body: bytes, **kwargs: Any) -> Path:
        path.write_bytes(self.finish(body, **kwargs))
        return path


def legacy_preamble() -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2))


def legacy_file(main_pickle: bytes, storages: list[Storage], keys: list[str]) -> bytes:
    """torch's legacy stream: magic, protocol, sys_info, the pickle, the storage keys, then per key
    an int64 element count and the raw bytes."""
    by_key = {s.key: s for s in storages}
    out = legacy_preamble() + main_pickle + pickle.dumps(keys, protocol=2)
    for key in keys:
        s = by_key[key]
        out += struct.pack("<q", s.numel) + s.raw
    return out


# -- zip -----------------------------------------------------------------------------------------
@dataclass
class ZipMember:
    """One member as written, with every field a test may want to lie about."""

    name: bytes
    data: bytes
    method: int = 0
    flags: int = 0
    crc: int | None = None
    usize: int | None = None

    def fields(self) -> tuple[int, int, int]:
        crc = zlib.crc32(self.data) if self.crc is None else self.crc
        usize = len(self.data) if self.usize is None else self.usize
        return crc, len(self.data), usize


def local_record(member: ZipMember, offset: int, align: int = 64) -> bytes:
    """Local header (data 64-byte aligned with an ``FB`` padding extra field, as torch writes
    it) followed by the member's data; ``offset`` is where the header will sit in the file."""
    crc, csize, usize = member.fields()
    fixed = 30 + len(member.name) + 4
    pad = -(offset + fixed) % align
    extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, member.flags, member.method, 0, 0x21, crc, csize,
                         usize, len(member.name), len(extra))
    return header + member.name + extra + member.data


def central_entry(member: ZipMember, offset: int, comment: bytes = b"") -> bytes:
    crc, csize, usize = member.fields()
    fixed = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, member.flags, member.method, 0, 0x21, crc,
                        csize, usize, len(member.name), 0, len(comment), 0, 0, 0, offset)
    return fixed + member.name + comment


def eocd(count: int, size: int, offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, offset, len(comment)) + comment


def zip_bytes(members: list[ZipMember], *, prefix: bytes = b"") -> bytes:
    """A zip archive after ``prefix`` (member offsets absolute in the result)."""
    out = bytearray(prefix)
    entries = []
    for member in members:
        offset = len(out)
        out += local_record(member, offset)
        entries.append(central_entry(member, offset))
    cd_offset = len(out)
    out += b"".join(entries)
    out += eocd(len(entries), len(out) - cd_offset, cd_offset)
    return bytes(out)


def torch_members(data_pkl: bytes, records: dict[str, bytes], prefix: str = "archive") -> list[ZipMember]:
    """The members torch.save writes: data.pkl, byteorder, data/<key>..., version."""
    members = [ZipMember(f"{prefix}/data.pkl".encode(), data_pkl),
               ZipMember(f"{prefix}/byteorder".encode(), b"little")]
    members += [ZipMember(f"{prefix}/data/{key}".encode(), raw) for key, raw in records.items()]
    members.append(ZipMember(f"{prefix}/version".encode(), b"3\n"))
    return members


def torch_zip(data_pkl: bytes, records: dict[str, bytes], prefix: str = "archive") -> bytes:
    return zip_bytes(torch_members(data_pkl, records, prefix))


def split_zip(data: bytes) -> tuple[bytes, list[bytes]]:
    """A (torch-written, no zip64, no comment) archive -> (everything before its central directory,
    raw central directory entries)."""
    end = data.rfind(b"PK\x05\x06")
    _, size, offset = struct.unpack("<HII", data[end + 10:end + 20])
    cd = data[offset:offset + size]
    entries, i = [], 0
    while i < len(cd):
        name_len, extra_len, comment_len = struct.unpack("<HHH", cd[i + 28:i + 34])
        n = 46 + name_len + extra_len + comment_len
        entries.append(cd[i:i + n])
        i += n
    return data[:offset], entries


def relocate(entry: bytes, delta: int) -> bytes:
    (offset,) = struct.unpack("<I", entry[42:46])
    return entry[:42] + struct.pack("<I", offset + delta) + entry[46:]


def pad_comment(entry: bytes, extra: bytes) -> bytes:
    (comment_len,) = struct.unpack("<H", entry[32:34])
    return entry[:32] + struct.pack("<H", comment_len + len(extra)) + entry[34:] + extra


def align(data: bytes | bytearray, to: int = 64) -> bytes:
    return bytes(data) + b"\0" * (-len(data) % to)


def zip_read_from_first_eocd(data: bytes) -> dict[str, bytes]:
    """A naive second zip parser: the first end-of-central-directory record from the *start* of
    the file, its central directory, each member read from its local header (stored members)."""
    end = data.find(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HII", data[end + 10:end + 20])
    out, i = {}, offset
    for _ in range(count):
        csize, = struct.unpack("<I", data[i + 20:i + 24])
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[i + 28:i + 34])
        local, = struct.unpack("<I", data[i + 42:i + 46])
        name = data[i + 46:i + 46 + name_len].decode("utf-8", "replace")
        lname, lextra = struct.unpack("<HH", data[local + 26:local + 30])
        start = local + 30 + lname + lextra
        out[name] = data[start:start + csize]
        i += 46 + name_len + extra_len + comment_len
    return out


def deflate_bomb(gigabytes: float) -> bytes:
    """A raw deflate stream of ``gigabytes`` GB of zeros, built in milliseconds: one full-flushed
    1 MiB chunk (whose compressed bytes do not depend on what came before) repeated."""
    chunk = 1 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = comp.compress(b"\0" * chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    return one * int(gigabytes * 1024) + tail


# -- tar -------------------------------------------------------------------------------------------
def tar_bytes(members: list[tuple[bytes, str, bytes]]) -> bytes:
    """A ustar archive; each member (raw name bytes, "file" | "fifo", content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for raw_name, kind, content in members:
            info = tarfile.TarInfo(raw_name.decode("utf-8", "surrogateescape"))
            info.mtime = 0
            if kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


# -- safetensors -----------------------------------------------------------------------------------
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], *, raw_header: bytes | None = None) -> bytes:
    """A safetensors file with a hand-written header; every tensor's data is a fill pattern."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _ST_SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(i % 251 + 1 for i in range(offset))


# -- gadgets ------------------------------------------------------------------------------------------
class Reduce:
    """Pickles as ``fn(*args)`` (with torch.save as well as pickle.dump)."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


class FromFileGadget(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates the file at
    ``self.path``: ``torch.from_file(path, shared=True, ...)`` opens it O_CREAT. Proof that a
    TorchScript archive executes code on load, without any Python in the archive."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.register_buffer("w", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        self.w = state[1] + torch.from_file(self.path, True, 2)


_SCRIPTED: list[Any] = []


def torchscript_gadget(marker: Path) -> bytes:
    """The bytes of a TorchScript archive (torch.jit.save) that creates ``marker`` when loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: still what torch.load dispatches to
        if not _SCRIPTED:
            _SCRIPTED.append(torch.jit.script(FromFileGadget("unset")))
        scripted = _SCRIPTED[0]
        scripted.path = str(marker)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def torch_save_bytes(obj: Any, *, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()
