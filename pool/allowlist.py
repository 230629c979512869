"""The globals a checkpoint may name: an allowlist, derived from the writers of real files.

A pickle names globals (``module.name``); `pool` never imports or calls them, but other readers of
the same file do (``torch.load(weights_only=False)`` in task_vectors-style code, ``pickle.load``).
So a file passes only if every global it names is one that real writers of these checkpoints use,
each listed here by its exact name with the writer that needs it, and with the role it may play
in the pickle (checked by `pool.records.check_roles`):

- ``rebuild``: torch's tensor and parameter rebuild functions, called with their arguments.
- ``storage``: torch's storage types, only as the type inside a storage reference.
- ``dtype``: torch dtypes, only as values (``_rebuild_tensor_v3``'s dtype argument).
- ``call``: plain constructors torch's own ``weights_only`` reader also calls (``OrderedDict``,
  ``set``, ``torch.Size``, ``_codecs.encode``, ...).
- ``class``: classes of a pickled model (``torch.nn``, open_clip, task_vectors' ``src.modeling``,
  torchvision transforms): made empty (``NEWOBJ`` with no arguments) and given their state.
- ``enum``: an enum looked up by value (torchvision's ``InterpolationMode('bicubic')``).
- ``blob``: ``torch.storage._load_from_bytes``, whose byte string `pool` parses with its own
  legacy reader (a plain ``pickle.dump`` of a module).
- ``reference``: named, never called (open_clip's ``_convert_to_rgb`` in a pickled ``Compose``).

``copyreg._reconstructor`` (how protocols 0 and 1 pickle an object) is not listed: it calls the
``__init__`` of a class the file names, no checkpoint writer of this field uses those protocols for
a model, and a user who has such a file allows it explicitly.

Tiers: ``state`` globals are what ``torch.load(weights_only=True)`` itself accepts; ``model``
globals appear only in a pickled model, which that reader refuses, so a torch file whose root is
a state dict may not name them (`pool.records.check_roles`). Everything else is refused with
`pool.errors.UnsafeCheckpointError`, however harmless it looks: every published pickle-scanner
bypass was a name missing from a deny-list. Users extend the list explicitly (``allow_globals=``,
``allow_globals:`` in a pool config, ``--allow-global MODULE.NAME``); a user-allowed global stays
an inert record and plays any role. Knows names only: nothing is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["Allowed", "ALLOWLIST", "lookup", "parse_allow_globals"]

#: The ``writer`` of a global the user allowed.
_USER_WRITER = "allowed by you"


@dataclass(frozen=True)
class Allowed:
    """One allowed global: its role in a pickle, its tier, and the writer that needs it.

    Attributes:
        role: how the pickle may use it (see the module docstring).
        tier: ``state`` (``torch.load(weights_only=True)`` accepts it too) or ``model``.
        writer: who writes files that name it.
    """

    role: str
    tier: str
    writer: str


_TORCH = "torch.save (torch 1.6-2.x)"
_TORCH_LEGACY = "torch.save, legacy format (_use_new_zipfile_serialization=False)"
_NN = "torch.save / pickle.dump of a whole torch.nn model"
_OPEN_CLIP_2_0 = "open_clip 2.0.x (task_vectors' published checkpoints)"
_OPEN_CLIP = "open_clip 2.7-3.x"
_TASK_VECTORS = "task_vectors (src.modeling, the published zeroshot.pt / finetuned.pt / head_*.pt)"
_FUSION_BENCH = "FusionBench (fusion_bench.models.open_clip.modeling)"
_TORCHVISION = "torchvision transforms pickled with an encoder's train/val preprocess"
_PICKLE = "pickle.dump (any protocol)"

_STORAGE_TYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                  "ComplexFloat", "ComplexDouble")
# canonical names only: a dtype pickles as torch.<canonical name>, never as an alias (torch.float)
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
           "uint16", "uint32", "uint64")
_NN_CLASSES = {
    "container": ("Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict"),
    "linear": ("Linear", "Identity", "Bilinear", "NonDynamicallyQuantizableLinear", "_LinearWithBias"),
    "conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
    "normalization": ("LayerNorm", "GroupNorm", "LocalResponseNorm", "RMSNorm"),
    "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"),
    "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    "activation": ("ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Tanh", "Softmax", "LeakyReLU", "Hardswish",
                   "Hardsigmoid", "Mish", "ELU", "PReLU", "Softplus", "MultiheadAttention"),
    "dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"),
    "pooling": ("AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool1d", "MaxPool2d", "MaxPool3d",
                "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool2d"),
    "sparse": ("Embedding", "EmbeddingBag"),
    "flatten": ("Flatten", "Unflatten"),
    "transformer": ("Transformer", "TransformerEncoder", "TransformerEncoderLayer", "TransformerDecoder",
                    "TransformerDecoderLayer"),
}
_OPEN_CLIP_2_0_CLASSES = ("model.CLIP", "model.VisualTransformer", "model.Transformer", "model.ResidualAttentionBlock",
                          "model.LayerNorm", "model.QuickGELU", "model.Attention", "model.ModifiedResNet",
                          "model.Bottleneck", "model.AttentionPool2d", "transform.ResizeMaxSize")
_OPEN_CLIP_CLASSES = ("model.CLIP", "model.CustomTextCLIP", "transformer.VisionTransformer", "transformer.Transformer",
                      "transformer.ResidualAttentionBlock", "transformer.CustomResidualAttentionBlock",
                      "transformer.LayerNorm", "transformer.LayerNormFp32", "transformer.QuickGELU",
                      "transformer.Attention", "transformer.AttentionalPooler", "transformer.LayerScale",
                      "transformer.PatchDropout", "transformer.TextTransformer", "modified_resnet.ModifiedResNet",
                      "modified_resnet.Bottleneck", "modified_resnet.AttentionPool2d", "transform.ResizeMaxSize",
                      "transform.ResizeKeepRatio", "transform.CenterCropOrPad", "transform.MaybeConvertMode",
                      "transform.MaybeToTensor", "transform.color_jitter", "transform.gray_scale")
_TORCHVISION_CLASSES = ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "RandomResizedCrop",
                        "RandomHorizontalFlip", "RandomCrop", "ColorJitter", "RandomGrayscale", "Grayscale",
                        "RandomApply", "ConvertImageDtype", "PILToTensor", "Pad", "GaussianBlur")


def _table() -> dict[str, Allowed]:
    table: dict[str, Allowed] = {}

    def add(names: Iterable[str], role: str, tier: str, writer: str) -> None:
        for name in names:
            known = table.get(name)  # named by several writers (open_clip.model.CLIP): say each
            table[name] = Allowed(role, tier, f"{known.writer}; {writer}" if known else writer)

    add(("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
         "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
         "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter"), "rebuild", "state", _TORCH)
    add((f"torch.{t}Storage" for t in _STORAGE_TYPES), "storage", "state", _TORCH)
    add((f"torch.cuda.{t}Storage" for t in _STORAGE_TYPES), "storage", "state", _TORCH + ", saved on a GPU")
    add(("torch.storage.UntypedStorage",), "storage", "state", _TORCH + " (an untyped storage)")
    add((f"torch.{d}" for d in _DTYPES), "dtype", "state", _TORCH + " (torch >= 2.1: _rebuild_tensor_v3)")
    add(("torch.Tensor",), "reference", "state", _TORCH + " (a tensor subclass record names its type)")
    add(("collections.OrderedDict", "torch.Size", "torch.device", "_codecs.encode", "builtins.set",
         "builtins.bytearray", "builtins.complex", "collections.Counter"), "call", "state", _TORCH)
    add((f"torch.nn.modules.{module}.{name}" for module, names in _NN_CLASSES.items() for name in names),
        "class", "model", _NN)
    add((f"open_clip.{name}" for name in _OPEN_CLIP_2_0_CLASSES), "class", "model", _OPEN_CLIP_2_0)
    add((f"open_clip.{name}" for name in _OPEN_CLIP_CLASSES), "class", "model", _OPEN_CLIP)
    add(("open_clip.transform._convert_to_rgb",), "reference", "model", _OPEN_CLIP_2_0 + " and later")
    add((f"src.modeling.{name}" for name in ("ImageEncoder", "ClassificationHead", "ImageClassifier",
                                             "MultiHeadImageClassifier")), "class", "model", _TASK_VECTORS)
    add((f"fusion_bench.models.open_clip.modeling.{name}" for name in ("ImageEncoder", "ClassificationHead",
                                                                       "ImageClassifier")),
        "class", "model", _FUSION_BENCH)
    add((f"torchvision.transforms.transforms.{name}" for name in _TORCHVISION_CLASSES), "class", "model", _TORCHVISION)
    add(("torchvision.transforms.functional.InterpolationMode",), "enum", "model", _TORCHVISION)
    add(("torch.storage._load_from_bytes",), "blob", "model", _PICKLE + " of a module: storages as legacy byte blobs")
    add(("builtins.frozenset", "builtins.slice"), "call", "model", _PICKLE)
    return table


#: Every allowed global by exact ``module.name``.
ALLOWLIST: dict[str, Allowed] = _table()

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def lookup(name: str, user: frozenset[str] = frozenset()) -> Allowed | None:
    """The allowlist entry of ``module.name``, a user-allowed entry, or None (refused).

    Args:
        name: the global's ``module.name`` as the file spells it (Python 2 names mapped).
        user: the globals the user allowed for this read.

    Returns:
        The `Allowed` entry, or None when the file is to be refused for naming it.

    Example:
        >>> lookup("torch._utils._rebuild_tensor_v2").role, lookup("pydoc.pipepager")
        ('rebuild', None)
    """
    entry = ALLOWLIST.get(name)
    if entry is None and name in user:
        return Allowed("any", "user", _USER_WRITER)
    return entry


def parse_allow_globals(values: Iterable[str] | str | None) -> frozenset[str]:
    """Validate user-allowed globals: exact ``module.name`` strings (no wildcards, no prefixes).

    Args:
        values: names, one name, or None.

    Returns:
        The names as a frozenset.

    Raises:
        ConfigError: a value is not a dotted Python name (``numpy.core.multiarray._reconstruct``).

    Example:
        >>> sorted(parse_allow_globals(["numpy.dtype"]))
        ['numpy.dtype']
    """
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = [values]
    names = []
    for value in values:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise ConfigError(f"allow_globals: {value!r} is not an exact global name MODULE.NAME "
                             "(such as numpy.dtype); wildcards and module prefixes are not accepted.")
        names.append(value)
    return frozenset(names)
