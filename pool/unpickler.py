"""Restricted unpickling: turn pickle bytes into data without running anything from the file.

A pickle names globals (``module.name``) and asks the reader to import and call them. This
unpickler imports only a short allowlist of tensor-rebuilding functions and plain containers.
Every other global becomes an inert stand-in class (`InertRecord`) that only remembers the
arguments and state the pickle hands it. Globals that could run code or touch the system are
refused outright with `UnsafeCheckpointError` (or, for `inspect`, recorded and kept inert).

This module knows about torch tensors and storages, and nothing about open_clip or any model.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["InertRecord", "GlobalName", "RestrictedReader", "is_unsafe_global"]

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
        "operator", "functools", "types", "commands", "pdb", "bdb", "timeit",
        "trace", "cProfile", "profile", "sqlite3", "mmap", "fcntl", "resource", "glob",
    }
)
# torch entry points that read files, compile or execute code.
_UNSAFE_TORCH_PREFIXES = (
    "torch.load", "torch.save", "torch.hub", "torch.jit", "torch._C", "torch.ops",
    "torch.utils.cpp_extension", "torch.package", "torch._dynamo", "torch.compile",
    "torch.serialization", "torch.storage._load_from_file", "torch.from_file",
    "torch.classes", "torch.library", "torch._ops", "torch.cuda",
)
# Plain builtins a state dict or module may legitimately name; every other builtin is refused.
_SAFE_BUILTINS: dict[str, Any] = {
    name: getattr(__import__("builtins"), name)
    for name in (
        "set", "frozenset", "slice", "complex", "bytearray", "list", "dict", "tuple",
        "int", "float", "bool", "str", "bytes", "range", "object",
    )
}
# The legacy storage class names a torch pickle uses for each dtype.
_STORAGE_NAMES = {
    torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage", torch.complex64: "ComplexFloatStorage",
    torch.complex128: "ComplexDoubleStorage",
}
_TORCH_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                     "_rebuild_parameter", "_rebuild_parameter_with_state")
# The rebuilders that view a storage: their size/stride/offset are checked against the storage
# first, because ``Tensor.set_`` silently grows a resizable storage (legacy blobs are resizable),
# which would hand back uninitialised memory as weights.
_STORAGE_VIEW_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")


@dataclass(frozen=True)
class GlobalName:
    """One ``module.name`` a file names, and whether it is on the unsafe list."""

    module: str
    name: str
    unsafe: bool = False

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


def is_unsafe_global(module: str, name: str) -> bool:
    """Whether a global could run code or touch the system if it were ever called."""
    root = module.split(".", 1)[0]
    if module == "builtins":
        return name not in _SAFE_BUILTINS
    if root in _UNSAFE_MODULE_ROOTS:
        return True
    dotted = f"{module}.{name}"
    if dotted == "torch.storage._load_from_bytes":
        return False  # read by this module's own rules, see RestrictedReader.load_from_bytes
    return any(dotted == p or dotted.startswith(p + ".") or module == p or module.startswith(p + ".")
               for p in _UNSAFE_TORCH_PREFIXES)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (protocol-2 pickles write ``__builtin__.set``) as pickle itself does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _opcode_table() -> list[int]:
    """Per opcode byte, how its argument is laid out: ``n >= 0`` n fixed bytes; ``-1``, ``-4``,
    ``-8`` a length of that many bytes, then that many bytes; ``-101`` / ``-102`` one / two
    newline-terminated lines; ``-999`` not an opcode."""
    import pickletools

    variable = {pickletools.UP_TO_NEWLINE: -101, pickletools.TAKEN_FROM_ARGUMENT1: -1,
                pickletools.TAKEN_FROM_ARGUMENT4: -4, pickletools.TAKEN_FROM_ARGUMENT4U: -4,
                pickletools.TAKEN_FROM_ARGUMENT8U: -8}
    table = [-999] * 256
    for op in pickletools.opcodes:
        arg = op.arg
        table[ord(op.code)] = 0 if arg is None else arg.n if arg.n >= 0 else variable[arg.n]
    table[ord("c")] = table[ord("i")] = -102  # GLOBAL and INST: module and name lines
    return table


_OPCODES = _opcode_table()
_PUT, _LONG_BINPUT, _STOP = ord("p"), ord("r"), ord(".")


def memo_is_bounded(data: bytes) -> bool:
    """Walk a pickle's opcodes (without running them) and check that every memo index it stores
    is smaller than the pickle itself, as in any real pickle. False for anything unusual
    (unknown opcode, truncated argument, huge index): the caller then uses the pure-Python
    unpickler, whose dict memo cannot be made to allocate."""
    i, n, table, from_bytes = 0, len(data), _OPCODES, int.from_bytes
    try:
        while i < n:
            code = data[i]
            size = table[code]
            i += 1
            if size >= 0:
                if code == _LONG_BINPUT and from_bytes(data[i:i + 4], "little") >= n:
                    return False
                i += size
            elif size >= -8:
                i += -size + from_bytes(data[i:i - size], "little")
            elif size == -101:
                end = data.index(b"\n", i)
                if code == _PUT and (end - i > 12 or int(data[i:end]) >= n):
                    return False
                i = end + 1
            elif size == -102:
                i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
            else:
                return False
            if code == _STOP:
                return i <= n
        return False  # no STOP: truncated
    except ValueError:
        return False


class InertRecord:
    """Stand-in for an object of a class the file names. It runs nothing and keeps what the pickle
    gave it: constructor arguments (`_pool_args`), state (`_pool_state`) and appended items."""

    __pool_global__ = "?"
    dump_patches = False  # torch's legacy loader reads this off a module class

    def __new__(cls, *args: Any, **kwargs: Any) -> InertRecord:
        self = object.__new__(cls)
        self.__dict__["_pool_args"] = args
        self.__dict__["_pool_kwargs"] = kwargs
        self.__dict__["_pool_state"] = None
        self.__dict__["_pool_items"] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the class named by the file never runs
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_pool_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["_pool_items"].append((key, value))

    def append(self, value: Any) -> None:
        self.__dict__["_pool_items"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_pool_items"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> InertRecord:
        """A pickle may call what an earlier call returned (``partial(...)()``): the result is one
        more inert record, so an inspected file reads to the end and nothing runs."""
        cls = type(self)
        result = type(f"{cls.__qualname__}()", (InertRecord,),
                      {"__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}()",
                       "__pool_global__": f"{cls.__pool_global__}(...)"})
        return result(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.__pool_global__}>"


def _inert_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor without calling the base class: objects stay inert."""
    if isinstance(cls, type) and issubclass(cls, InertRecord):
        return cls()
    raise CorruptCheckpointError(f"copyreg._reconstructor called with {cls!r}, not a class record")


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: tuple, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2 restricted to plain tensors and parameters."""
    tensor = func(*args)
    if not isinstance(tensor, torch.Tensor):
        raise CorruptCheckpointError(f"tensor rebuild returned {type(tensor).__name__}, not a tensor")
    if new_type is torch.nn.Parameter and not isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    return tensor  # unknown tensor subclasses are read as plain tensors


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tensor_fits(source: str, storage: Any, offset: Any, size: Any, stride: Any,
                      dtype: Any = None) -> None:
    """Refuse a tensor view that reaches past the end of its storage (or has a malformed shape)."""
    if isinstance(storage, torch.storage.TypedStorage):
        nbytes = storage._untyped_storage.nbytes()  # the public nbytes() warns about TypedStorage
        itemsize = torch._utils._element_size(storage.dtype)
    elif isinstance(storage, torch.UntypedStorage):
        nbytes = storage.nbytes()
        itemsize = 1
    else:
        raise CorruptCheckpointError(
            f"{source}: a tensor's storage is a {type(storage).__name__}, not a torch storage; the "
            "file is damaged: download it again.")
    if isinstance(dtype, torch.dtype):
        itemsize = torch._utils._element_size(dtype)
    if not (_is_index(offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and all(map(_is_index, size)) and all(map(_is_index, stride))):
        raise CorruptCheckpointError(
            f"{source}: a tensor has a malformed shape (size {size!r}, stride {stride!r}, offset "
            f"{offset!r}); the file is damaged: download it again.")
    if any(s == 0 for s in size):
        return
    needed = (offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1) * itemsize
    if needed > nbytes:
        raise CorruptCheckpointError(
            f"{source}: a tensor of shape {tuple(size)} (offset {offset}) needs {needed} bytes of its "
            f"storage but the storage holds {nbytes}; the file is truncated or damaged: download it "
            "again.")


class RestrictedReader:
    """One read of one file: the allowlist, the globals seen, and the nested-blob reader.

    `module` is a pickle-module stand-in to hand to ``torch.load(pickle_module=...)``, so torch
    still parses its own containers (zip, legacy, mmap) while every global goes through
    `find_class` here.
    """

    def __init__(self, source: str, *, refuse_unsafe: bool = True, max_bytes: int | None = None,
                 record_sizes: dict[str, int] | None = None) -> None:
        self.source = source
        self.refuse_unsafe = refuse_unsafe
        self.max_bytes = max_bytes
        self.record_sizes = record_sizes
        self.storage_keys: dict[int, str] = {}  # data_ptr -> archive record key
        self.globals: dict[tuple[str, str], GlobalName] = {}
        self._inert_types: dict[tuple[str, str], type] = {}
        self.module = self._make_pickle_module()

    # -- globals -------------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global the file names: allowlisted object, inert class, or refusal."""
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptCheckpointError(f"{self.source}: pickle names a non-string global")
        module, name = _python3_name(module, name)
        unsafe = is_unsafe_global(module, name)
        self.globals.setdefault((module, name), GlobalName(module, name, unsafe))
        if unsafe:
            if self.refuse_unsafe:
                raise UnsafeCheckpointError(
                    f"{self.source}: refused to load: the file names the global '{module}.{name}', "
                    "which could run code or touch the system if called. Nothing from the file was "
                    "executed. This is no checkpoint to keep using: get the file from a trusted "
                    "source, or run `python -m pool inspect` on it to see every global it names.",
                    [f"{module}.{name}"],
                )
            return self._inert(module, name)
        allowed = self._allowed(module, name)
        return allowed if allowed is not None else self._inert(module, name)

    def _allowed(self, module: str, name: str) -> Any:
        if module == "builtins":
            return _SAFE_BUILTINS.get(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "copyreg" and name == "_reconstructor":
            return _inert_reconstructor
        if module == "torch._utils" and name in _STORAGE_VIEW_REBUILDERS:
            return self._checked_rebuilder(name)
        if module == "torch._utils" and name in _TORCH_REBUILDERS:
            return getattr(torch._utils, name, None)
        if module in ("torch._tensor", "torch.tensor") and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch.storage" and name == "_load_from_bytes":
            return self.load_from_bytes
        if module == "_codecs" and name == "encode":
            return self._latin1_encode  # how protocol-2 pickles spell a bytes object
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
                return obj
            if name in ("Size", "device"):
                return obj
            if isinstance(obj, type) and name.endswith("Storage"):
                return obj
        if module == "torch.nn.parameter" and name == "Parameter":
            return torch.nn.Parameter
        return None

    def _checked_rebuilder(self, name: str) -> Callable[..., Any]:
        rebuild = getattr(torch._utils, name)
        source = self.source

        def checked(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
            dtype = rest[2] if name == "_rebuild_tensor_v3" and len(rest) > 2 else None
            check_tensor_fits(source, storage, storage_offset, size, stride, dtype)
            return rebuild(storage, storage_offset, size, stride, *rest)

        return checked

    def _latin1_encode(self, obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        """``_codecs.encode`` restricted to what protocol-2 pickles use it for: str -> latin-1 bytes."""
        if isinstance(obj, str) and encoding in ("latin1", "latin-1") and errors == "strict":
            try:
                return obj.encode("latin-1")
            except UnicodeEncodeError:
                pass
        raise CorruptCheckpointError(
            f"{self.source}: the pickle calls _codecs.encode with {type(obj).__name__} and "
            f"{encoding!r}; only latin-1 byte strings are read. The file is damaged or was not "
            "written by torch.save / pickle.dump of a model.")

    def _inert(self, module: str, name: str) -> type:
        key = (module, name)
        cls = self._inert_types.get(key)
        if cls is None:
            cls = type(name, (InertRecord,), {"__module__": module, "__qualname__": name,
                                               "__pool_global__": f"{module}.{name}"})
            self._inert_types[key] = cls
        return cls

    # -- nested legacy blobs ---------------------------------------------------------------------
    def load_from_bytes(self, data: bytes) -> Any:
        """Read a ``torch.storage._load_from_bytes`` blob (a legacy torch file) by the same rules."""
        if not isinstance(data, (bytes, bytearray)):
            raise CorruptCheckpointError(f"{self.source}: storage blob is {type(data).__name__}, not bytes")
        nested = RestrictedReader(self.source, refuse_unsafe=self.refuse_unsafe, max_bytes=len(data))
        nested.globals = self.globals  # one list of globals for the whole file
        nested._inert_types = self._inert_types
        return nested.torch_load(io.BytesIO(bytes(data)), map_location="cpu", mmap=False)

    def torch_load(self, f: Any, *, map_location: Any, mmap: bool) -> Any:
        """torch's own container parsing, with this reader as its pickle module."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
            # The restricted reader's deliberate use of torch.load: pickle_module=self.module makes
            # every global go through find_class above, so nothing from the file is imported or run.
            return torch.load(f, map_location=map_location, pickle_module=self.module,  # noqa: S614
                              mmap=mmap)

    # -- storage size guard ----------------------------------------------------------------------
    def check_storage(self, pid: Any) -> None:
        """Refuse storages larger than the bytes that could hold them, before torch allocates."""
        if not (isinstance(pid, tuple) and len(pid) >= 5):
            return
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dtype = getattr(storage_type, "dtype", torch.uint8)
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        if not isinstance(numel, int) or numel < 0:
            raise CorruptCheckpointError(f"{self.source}: storage {key!r} has invalid size {numel!r}")
        nbytes = numel * torch._utils._element_size(dtype)
        limit = self.max_bytes
        if self.record_sizes is not None:
            limit = self.record_sizes.get(str(key))
            if limit is None:
                raise CorruptCheckpointError(
                    f"{self.source}: storage {key!r} is named by the pickle but the archive has no "
                    "data record for it; the file is damaged: download it again.")
        if limit is not None and nbytes > limit:
            raise CorruptCheckpointError(
                f"{self.source}: storage {key!r} claims {nbytes} bytes but only {limit} are "
                "there; the file is truncated or damaged: download it again.")

    def _make_pickle_module(self) -> types.SimpleNamespace:
        reader = self

        class _Restricted:
            """Globals and persistent ids go through the reader."""

            def find_class(self, module: str, name: str) -> Any:
                return reader.find_class(module, name)

            @property
            def persistent_load(self) -> Callable[[Any], Any]:
                return self._pool_checked_persistent_load

            @persistent_load.setter
            def persistent_load(self, fn: Callable[[Any], Any]) -> None:
                self._pool_persistent_load = fn

            def _pool_checked_persistent_load(self, pid: Any) -> Any:
                fn = self.__dict__.get("_pool_persistent_load")
                if fn is None:
                    raise CorruptCheckpointError(
                        f"{reader.source}: the pickle refers to external data (persistent id) "
                        "but is not inside a torch container")
                if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
                    # Legacy files record each module class with its source; torch would parse
                    # the installed source of every class to compare (slow), then read
                    # `dump_patches` off the class when they differ (an inert record has none).
                    # The source is only ever a warning, so skip the check: the class is the id.
                    return pid[1] if len(pid) > 1 else None
                reader.check_storage(pid)
                storage = fn(pid)
                reader.note_storage(pid, storage)
                return storage

        class Unpickler(_Restricted, pickle._Unpickler):  # type: ignore[name-defined,misc]
            """Pure-Python unpickler, the default: its memo is a dict, so no index in the file can
            make it allocate. (The C unpickler grows an array to the largest PUT index a pickle
            names: a few bytes can cost gigabytes and seconds before it fails.)"""

        class FastUnpickler(_Restricted, pickle.Unpickler):  # type: ignore[misc]
            """CPython's C unpickler, used only for a pickle `memo_is_bounded` has cleared."""

        def load(file: Any, **kwargs: Any) -> Any:
            return namespace.Unpickler(file, **kwargs).load()

        namespace = types.SimpleNamespace(__name__="pool.unpickler", Unpickler=Unpickler, load=load,
                                          SafeUnpickler=Unpickler, FastUnpickler=FastUnpickler)
        return namespace

    def use_c_unpickler_for(self, data: bytes) -> bool:
        """Switch to the (about 3x faster) C unpickler when ``data`` -- the one pickle torch will
        parse, a zip's data.pkl -- names no memo index beyond its own length. Returns whether it did."""
        if memo_is_bounded(data):
            self.module.Unpickler = self.module.FastUnpickler
            return True
        return False

    def note_storage(self, pid: Any, storage: Any) -> None:
        """Remember which archive record a storage came from (by data pointer), for bulk reads,
        and list the storage class the pickle named (torch resolves those names itself, so they
        never reach `find_class`)."""
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] in ("storage", b"storage"):
            dtype = getattr(pid[1], "dtype", None)
            name = _STORAGE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else None
            if name is not None:
                self.globals.setdefault(("torch", name), GlobalName("torch", name))
            untyped = getattr(storage, "_untyped_storage", storage)
            if isinstance(untyped, torch.UntypedStorage) and untyped.nbytes() > 0:
                self.storage_keys[untyped.data_ptr()] = str(pid[2])

    def unpickle(self, file: Any) -> Any:
        """Unpickle a plain pickle stream (no torch container around it)."""
        return self.module.SafeUnpickler(file, encoding="utf-8").load()

    @property
    def named_globals(self) -> list[GlobalName]:
        return list(self.globals.values())

