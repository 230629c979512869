"""`ImageEncoder` and `ClassificationHead`: the task-arithmetic modules, rebuilt safely.

Both mirror the originals in ``src.modeling`` (attributes, forward, ``state_dict()`` keys) but are
built from weights: the CLIP is constructed on the meta device and the checkpoint's tensors are
assigned into it, so there is no download and no initialisation thrown away.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from os import PathLike
from typing import Any

import torch
from torch import nn

from .arch import (
    VisionArch,
    arch_for_name,
    build_clip,
    check_arch,
    default_quick_gelu,
    infer_arch,
    name_for_arch,
    recorded_heads,
    recorded_quick_gelu,
)
from .checkpoint import Checkpoint, read_checkpoint
from .errors import ArchitectureMismatchError, CheckpointError, ConfigError, printable
from .gcpause import paused_gc
from .keys import TEXT_SIDE_KEYS, key_mismatch, strip_ddp, to_clip_keys, to_clip_modules

__all__ = ["ImageEncoder", "ClassificationHead", "DType"]

log = logging.getLogger(__name__)

DType = torch.dtype | str | None
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


def resolve_dtype(dtype: DType) -> torch.dtype | None:
    """``"bf16"``, ``"torch.bfloat16"`` or a torch.dtype -> torch.dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def place_module(module: nn.Module, device: Any, dtype: DType) -> nn.Module:
    """The module in ``dtype`` on ``device``. A dict ``map_location`` placed each tensor when the
    file was read: the module is then not moved as a whole. A module already there (the tensors
    were read onto the device in the right dtype) is left as it is, without ``Module.to``'s walk."""
    dt = resolve_dtype(dtype)
    if isinstance(device, Mapping):
        device = None
    if (device is not None or dt is not None) and not _placed(module, device, dt):
        module = module.to(device=device, dtype=dt)
    return module


def _placed(module: nn.Module, device: Any, dtype: torch.dtype | None) -> bool:
    """Whether every parameter and buffer is on ``device`` already and, if floating point, of
    ``dtype`` (what ``Module.to(device, dtype)`` would leave unchanged)."""
    try:
        target = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        return False  # Module.to reports it
    if target is not None and target.index is None and target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())
    for tensor in (*module.parameters(), *module.buffers()):
        if target is not None and tensor.device != target:
            return False
        if dtype is not None and (tensor.is_floating_point() or tensor.is_complex()) and tensor.dtype != dtype:
            return False
    return True


class ImageEncoder(nn.Module):
    """An open_clip image encoder shaped like task_vectors' ``src.modeling.ImageEncoder``.

    ``.model`` is the open_clip ``CLIP`` (text transformer removed), ``forward(images)`` is
    ``model.encode_image(images)``, ``.train_preprocess`` / ``.val_preprocess`` are open_clip's
    transforms for the architecture, ``.arch`` describes it, and ``state_dict()`` has the
    original checkpoint's keys (``model.visual...``).

    Build one with `load` (a file), `from_checkpoint` (a read checkpoint) or `from_state_dict`
    (tensors); the constructor only wraps a model that exists.

    Args:
        model: the open_clip ``CLIP`` to wrap.
        train_preprocess: the training transform (open_clip's, for the architecture).
        val_preprocess: the evaluation transform.
        arch: the model's architecture, kept as ``.arch``.
        model_name: its open_clip name (None for a custom ViT), kept as ``.model_name``.
        cache_dir: kept as ``.cache_dir``, as the original had it (nothing is downloaded).

    Example:
        >>> import torch
        >>> from pool import ImageEncoder
        >>> encoder = ImageEncoder.load("zeroshot.pt", device="cpu")  # doctest: +SKIP
        >>> encoder.model_name, encoder.embed_dim  # doctest: +SKIP
        ('ViT-B-32', 512)
        >>> encoder(torch.randn(4, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([4, 512])
    """

    def __init__(self, model: nn.Module, train_preprocess: Any = None, val_preprocess: Any = None,
                 *, arch: VisionArch | None = None, model_name: str | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = cache_dir
        self.arch = arch
        self.model_name = model_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images: ``model.encode_image(images)``.

        Args:
            images: a batch ``[N, 3, image_size, image_size]`` in the model's dtype and device
                (``val_preprocess`` turns a PIL image into one item).

        Returns:
            The image features, ``[N, embed_dim]``, not normalised.
        """
        return self.model.encode_image(images)

    @property
    def embed_dim(self) -> int:
        """The size of the image features `forward` returns (``model.visual.output_dim``)."""
        return int(self.model.visual.output_dim)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, model_name: str | None = None,
                        quick_gelu: bool | None = None, device: Any = None, dtype: DType = None,
                        modules: Mapping[str, Any] | None = None, source: str = "state dict",
                        heads: int | None = None) -> ImageEncoder:
        """Build from tensors in any known key layout; infer or check the architecture.

        ``model_name`` (an open_clip name) is checked against the weights; without it the
        architecture is read from the tensor shapes. QuickGELU: an explicit ``quick_gelu`` wins,
        then the activation class a pickle names, then the model name's default (OpenAI names
        use QuickGELU). The CLIP is built on the meta device and the tensors are assigned into
        it (not copied).

        Args:
            state_dict: the weights, in any layout `pool.keys.to_clip_keys` knows (task_vectors'
                ``model.visual...``, open_clip's ``visual...``, a DDP ``module.`` prefix); the
                text transformer, if present, is dropped.
            model_name: an open_clip name to check the weights against; None (the default) reads
                the architecture from the tensor shapes.
            quick_gelu: the activation: True for QuickGELU, False for GELU, None to decide as
                described above.
            device: where the encoder goes; None (or a dict ``map_location``) leaves it where the
                tensors are.
            dtype: a ``torch.dtype`` or a name (``"bf16"``, ``"float16"``, ``"torch.float32"``);
                None keeps the tensors' dtype.
            modules: a pickled module's records (`pool.checkpoint.Checkpoint.modules`), which give
                the attention head count and the activation; None when there are none.
            source: how error messages name the weights (the file, usually).
            heads: attention heads per block, where the file says so apart from the weights (a
                transformers config); None: the pickle's records, else the name's, else width / 64.

        Returns:
            The encoder, with ``.arch``, ``.model_name`` (the given name, else the open_clip name
            of these shapes; None for a custom ViT) and open_clip's transforms.

        Raises:
            ConfigError: ``model_name`` is no open_clip ViT config this loader can build, or
                ``dtype`` is not supported.
            ArchitectureMismatchError: the tensors are no ViT image tower, are not the
                architecture ``model_name`` names, or do not fit it key for key and shape for
                shape (or are not all floating point).

        Example:
            >>> from pool import ImageEncoder
            >>> from pool.synth import make_original_encoder
            >>> original = make_original_encoder()  # a tiny random ViT, as task_vectors pickled it
            >>> encoder = ImageEncoder.from_state_dict(original.state_dict())
            >>> encoder.arch.describe(), encoder.embed_dim
            ('patch 8, width 128, 2 layers, 32 px, embed 32, QuickGELU', 32)
        """
        sd = to_clip_keys(state_dict, source=source)
        weights = infer_arch(sd, to_clip_modules(modules), source=source)
        named = None  # the open_clip name of these shapes, looked up once (the registry is scanned)
        if model_name:
            arch = arch_for_name(model_name)
            check_arch(weights, arch, model_name, source)
            arch = replace(arch, heads=weights.heads if modules else arch.heads,
                           text_context_length=weights.text_context_length,
                           text_vocab_size=weights.text_vocab_size, text_width=weights.text_width)
            if weights.quick_gelu is not None:
                arch = replace(arch, quick_gelu=weights.quick_gelu)
        else:
            named = name_for_arch(weights)
            arch = weights if weights.quick_gelu is not None else replace(
                weights, quick_gelu=default_quick_gelu(named))
            if named and not modules:  # the weights cannot tell the heads: open_clip's config of these shapes does
                arch = replace(arch, heads=arch_for_name(named).heads)
        if quick_gelu is not None:
            arch = replace(arch, quick_gelu=bool(quick_gelu))
        if heads is not None:
            if not (type(heads) is int and heads >= 1 and arch.width % heads == 0):
                raise ArchitectureMismatchError(f"{source}: {heads!r} attention heads do not split the width {arch.width}")
            arch = replace(arch, heads=heads)
        with paused_gc():  # many small objects, no cycles to collect: see pool.gcpause
            model = _assign(build_clip(arch, source=source), sd, source)
            encoder = cls(model, *image_transforms(arch), arch=arch, model_name=model_name or named)
        return place_module(encoder, device, dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, **kwargs: Any) -> ImageEncoder:
        """Build from a `pool.checkpoint.Checkpoint` (uses its module records when it has them).

        Without module records, the activation (unless ``quick_gelu`` is given) and the attention
        head count (unless ``heads`` is) that the checkpoint's metadata records are used: a
        converted file's (`pool.arch.recorded_quick_gelu`, `pool.arch.recorded_heads`) or a
        transformers folder's ``hidden_act`` and ``num_attention_heads``.

        Args:
            checkpoint: a checkpoint read with `pool.checkpoint.read_checkpoint`.
            **kwargs: `from_state_dict`'s keyword arguments (``model_name``, ``quick_gelu``,
                ``device``, ``dtype``, ``source``, ``heads``; ``source`` defaults to the
                checkpoint's path).

        Returns:
            The encoder, as `from_state_dict` builds it.

        Raises:
            ConfigError: ``model_name`` or ``dtype`` is not supported.
            ArchitectureMismatchError: the weights are no ViT image tower, or not the one
                ``model_name`` names; or the metadata records a head count that is no integer
                dividing the width, or a transformers ``hidden_act`` or ``layer_norm_eps`` that
                open_clip's ViT does not have.

        Example:
            >>> from pool import ImageEncoder, read_checkpoint
            >>> ckpt = read_checkpoint("finetuned.pt")  # doctest: +SKIP
            >>> encoder = ImageEncoder.from_checkpoint(ckpt, model_name="ViT-B-32")  # doctest: +SKIP
            >>> encoder.arch.quick_gelu  # doctest: +SKIP
            True
        """
        kwargs.setdefault("source", str(checkpoint.path))
        meta = checkpoint.metadata
        if kwargs.get("quick_gelu") is None and not checkpoint.modules:
            kwargs["quick_gelu"] = recorded_quick_gelu(meta)  # written by pool.convert, or transformers' config
        heads = recorded_heads(meta)
        if heads is not None and kwargs.get("heads") is None and not checkpoint.modules:
            kwargs["heads"] = _config_int(heads, "attention heads", kwargs["source"])
        eps = meta.get("hf.layer_norm_eps")
        if eps is not None and eps not in ("1e-05", "1e-5"):
            raise ArchitectureMismatchError(f"{kwargs['source']}: the transformers config says layer_norm_eps={eps}; "
                                            "open_clip's ViT uses 1e-05, so these weights would compute other features.")
        return cls.from_state_dict(checkpoint.state_dict, modules=checkpoint.modules or None, **kwargs)

    @classmethod
    def load(cls, path: str | PathLike[str], *, model_name: str | None = None, quick_gelu: bool | None = None,
             device: Any = None, dtype: DType = None, mmap: bool | None = None,
             map_location: Any = None, cache_dir: Any = None,
             allow_globals: Iterable[str] | None = None) -> ImageEncoder:
        """Read any supported encoder file (pickle, state dict, safetensors) and build it.

        ``map_location`` is an alias of ``device``, as in ``torch.load``. Nothing from the file
        is run, and nothing is downloaded.

        Args:
            path: the encoder file: a pickled ImageEncoder (torch zip, legacy or plain pickle),
                a state dict (torch zip or legacy) or safetensors; or a transformers CLIP folder.
            model_name: an open_clip name to check the weights against; None (the default)
                reads the architecture from the weights.
            quick_gelu: the activation; None: what the file says, else the name's default.
            device: where the tensors are read to and the encoder goes (None: the CPU).
            dtype: a ``torch.dtype`` or a name such as ``"bf16"``; None keeps the file's.
            mmap: True maps zip and safetensors tensors from the file (they then die with it);
                None (the default) reads them into private memory.
            map_location: used when ``device`` is None, in any form `read_checkpoint` takes
                (a dict maps saved locations).
            cache_dir: the conversion cache (`pool.cache`): None (the default) uses
                ``$OPENCLIP_POOL_CACHE_DIR`` when set, False turns it off.
            allow_globals: exact ``module.name`` globals to accept besides the allowlist
                (`pool.allowlist`), as for `pool.checkpoint.read_checkpoint`.

        Returns:
            The `ImageEncoder`.

        Raises:
            CheckpointNotFoundError: the file does not exist.
            UnsafeCheckpointError: the file names a global on no allowlist, or misuses one.
            CorruptCheckpointError: the file is damaged, truncated or no known container.
            CheckpointError: any other unusable file.
            ConfigError: ``model_name``, ``dtype`` or ``device`` is not supported.
            ArchitectureMismatchError: the weights are no ViT image tower, or not the one
                ``model_name`` names.

        Example:
            >>> from pool import ImageEncoder
            >>> encoder = ImageEncoder.load("zeroshot.pt")  # doctest: +SKIP
            >>> encoder = ImageEncoder.load("cars.safetensors", device="cuda", dtype="bf16")  # doctest: +SKIP
        """
        device = device if device is not None else map_location
        ckpt = read_checkpoint(path, map_location=device, mmap=mmap, cache_dir=cache_dir, allow_globals=allow_globals)
        return cls.from_checkpoint(ckpt, model_name=model_name, quick_gelu=quick_gelu, device=device,
                                   dtype=dtype)


def _config_int(value: str, name: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ArchitectureMismatchError(f"{source}: the recorded {name} is {printable(value[:40])!r}, "
                                        "not an integer") from None


def image_transforms(arch: VisionArch) -> tuple[Any, Any]:
    """open_clip's (train, eval) transforms for an architecture, as the original encoder had."""
    import open_clip

    return (open_clip.image_transform(arch.image_size, is_train=True),
            open_clip.image_transform(arch.image_size, is_train=False))


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Assign checkpoint tensors into a meta-device CLIP; drop text-side parts the file lacks."""
    modules, want = _walk(model)
    for key in TEXT_SIDE_KEYS:
        if key in sd or key not in want:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner and not any(k.startswith(owner + ".") for k in sd):
            delattr(model, owner)  # e.g. no ln_final.* at all: drop the whole module
        else:
            del (model.get_submodule(owner) if owner else model)._parameters[leaf]
        modules, want = _walk(model)  # (rare: a file without some of the text side)
    not_float = [k for k, t in sd.items() if not t.is_floating_point()]
    if not_float:
        raise ArchitectureMismatchError(
            f"{source}: the weights are not all floating point ({printable(not_float[0])} is "
            f"{sd[not_float[0]].dtype}); an image encoder's are. The file is damaged or holds something else.")
    plain = not any(_loads_its_own_way(m) for m in modules.values())
    if not plain:  # a module with state-dict hooks of its own: its state_dict() is what counts
        want = model.state_dict(keep_vars=True)
    problem = key_mismatch(sd, want, "the architecture")
    if problem:
        raise ArchitectureMismatchError(
            f"{source}: the weights do not fit the architecture: {problem}. Is this an open_clip ViT "
            "image encoder, and is model_name right?")
    if not plain:
        model.load_state_dict(sd, strict=True, assign=True)
    else:  # what load_state_dict(assign=True) does for plain modules, without its walks
        for key, tensor in sd.items():
            owner, _, leaf = key.rpartition(".")
            module = modules[owner]
            if leaf in module._parameters:
                module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=want[key].requires_grad))
            else:
                setattr(module, leaf, tensor)  # a persistent buffer (key_mismatch matched the keys)
    leftover = [f"{path}.{name}".lstrip(".") for path, m in modules.items()
                for name, t in (*m._parameters.items(), *m._buffers.items()) if t is not None and t.is_meta]
    if leftover:
        raise ArchitectureMismatchError(f"{source}: no weights for {leftover[:5]}")
    return model


def _loads_its_own_way(module: nn.Module) -> bool:
    """Whether state_dict() or load_state_dict() would run code of the module's own (hooks, or an
    overridden ``_load_from_state_dict``); open_clip's ViT modules have none."""
    return bool(type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
                or type(module)._save_to_state_dict is not nn.Module._save_to_state_dict
                or module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks
                or module._state_dict_hooks or getattr(module, "_state_dict_pre_hooks", None))


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """The modules by path, and the tensors ``state_dict()`` would name (parameters and persistent
    buffers; for modules without state-dict hooks, which `_assign` checks before relying on it)."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared submodule under each of its paths
    tensors: dict[str, torch.Tensor] = {}
    for path, module in modules.items():
        prefix = path + "." if path else ""
        for name, param in module._parameters.items():
            if param is not None:
                tensors[prefix + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[prefix + name] = buffer
    return modules, tensors


class ClassificationHead(nn.Linear):
    """task_vectors' ``ClassificationHead``: a linear map, L2-normalising inputs when ``normalize``.

    Build one from a file with `load` or from a read checkpoint with `from_checkpoint`.

    Args:
        normalize: L2-normalise the inputs before the linear map.
        weights: the weight matrix, ``[classes, embed_dim]`` (copied).
        biases: the bias, ``[classes]`` (copied); None means zeros.

    Example:
        >>> import torch
        >>> from pool import ClassificationHead
        >>> head = ClassificationHead(True, torch.randn(10, 512))
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 10])
    """

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None) -> None:
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size, device="meta", dtype=weights.dtype)
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(weights.detach().clone())
        bias = biases if biases is not None else torch.zeros(output_size, dtype=weights.dtype)
        self.bias = nn.Parameter(bias.detach().clone().to(weights.device))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of features, L2-normalised first when ``normalize``.

        Args:
            inputs: image features, ``[N, embed_dim]``.

        Returns:
            The logits, ``[N, classes]``.
        """
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, normalize: bool | None = None, device: Any = None,
                        dtype: DType = None) -> ClassificationHead:
        """Rebuild from a read checkpoint: weight, bias and the ``normalize`` flag it stored.

        Args:
            checkpoint: a checkpoint read with `pool.checkpoint.read_checkpoint`: a pickled head
                or a ``weight`` / ``bias`` state dict (a DDP prefix is allowed).
            normalize: whether the head normalises its inputs; None (the default) takes the flag
                the checkpoint stored (a pickled head's attribute, a converted file's metadata),
                else True as task_vectors did. A string means True for ``"1"``, ``"true"`` or
                ``"yes"`` (any case), else False.
            device: where the head goes (None, or a dict ``map_location``: where the tensors are).
            dtype: a ``torch.dtype`` or a name such as ``"bf16"``; None keeps the checkpoint's.

        Returns:
            The `ClassificationHead` (its tensors are copies of the checkpoint's).

        Raises:
            CheckpointError: the checkpoint has no 2-d ``weight``: it is no classification head.
            ArchitectureMismatchError: the weight is empty, the tensors are not floating point,
                or the bias does not match the weight.
            ConfigError: ``dtype`` is not supported.

        Example:
            >>> from pool import ClassificationHead, read_checkpoint
            >>> ckpt = read_checkpoint("head_Cars.pt")  # doctest: +SKIP
            >>> head = ClassificationHead.from_checkpoint(ckpt, dtype="float32")  # doctest: +SKIP
            >>> head.out_features, head.normalize  # doctest: +SKIP
            (196, True)
        """
        sd = strip_ddp(checkpoint.state_dict)
        weight, bias = sd.get("weight"), sd.get("bias")
        if weight is None or weight.dim() != 2:
            raise CheckpointError(
                f"{checkpoint.path}: expected a classification head (a 'weight' of shape [classes, "
                f"embed_dim]); found {printable(', '.join(list(sd)[:5]))}.")
        classes, width = weight.shape
        problem = None
        if classes < 1 or width < 1:
            problem = f"its weight has shape {list(weight.shape)}: no classes or no inputs"
        elif not all(t.is_floating_point() for t in (weight, bias) if t is not None):
            problem = "its weights are not floating point (" + ", ".join(
                f"{n} {t.dtype}" for n, t in (("weight", weight), ("bias", bias)) if t is not None) + ")"
        elif bias is not None and tuple(bias.shape) != (classes,):
            problem = f"its bias has shape {list(bias.shape)}, its weight {list(weight.shape)} (expected [{classes}])"
        if problem:
            raise ArchitectureMismatchError(f"{checkpoint.path}: not a classification head this loader can "
                                            f"build: {problem}. The file is damaged or holds something else.")
        stored = checkpoint.attributes.get("normalize", checkpoint.metadata.get("normalize"))
        if normalize is None:
            normalize = stored if stored is not None else True
            if stored is None:
                log.info("%s: no normalize flag stored; using normalize=True as task_vectors did", checkpoint.path)
        if isinstance(normalize, str):
            normalize = normalize.lower() in ("1", "true", "yes")
        head = cls(bool(normalize), weight, bias)
        return place_module(head, device, dtype)

    @classmethod
    def load(cls, path: str | PathLike[str], *, normalize: bool | None = None, device: Any = None,
             dtype: DType = None, map_location: Any = None, cache_dir: Any = None,
             allow_globals: Iterable[str] | None = None) -> ClassificationHead:
        """Read a head file (pickled ClassificationHead, state dict or safetensors) and build it.

        Args:
            path: the head file; its container is recognised by content.
            normalize: whether the head normalises its inputs; None (the default): the flag the
                file stored, else True.
            device: where the tensors are read to and the head goes (None: the CPU).
            dtype: a ``torch.dtype`` or a name such as ``"bf16"``; None keeps the file's.
            map_location: used when ``device`` is None, in any form `read_checkpoint` takes.
            cache_dir: the conversion cache (`pool.cache`): None (the default) uses
                ``$OPENCLIP_POOL_CACHE_DIR`` when set, False turns it off.
            allow_globals: exact ``module.name`` globals to accept besides the allowlist
                (`pool.allowlist`), as for `pool.checkpoint.read_checkpoint`.

        Returns:
            The `ClassificationHead`.

        Raises:
            CheckpointNotFoundError: the file does not exist.
            UnsafeCheckpointError: the file names a global on no allowlist, or misuses one.
            CorruptCheckpointError: the file is damaged, truncated or no known container.
            CheckpointError: any other unusable file, or one that holds no classification head.
            ArchitectureMismatchError: the head's tensors are empty, not floating point or
                inconsistent.
            ConfigError: ``dtype`` or ``device`` is not supported.

        Example:
            >>> from pool import ClassificationHead
            >>> head = ClassificationHead.load("head_Cars.pt")  # doctest: +SKIP
            >>> logits = head(features)  # doctest: +SKIP
        """
        device = device if device is not None else map_location
        ckpt = read_checkpoint(path, map_location=device, cache_dir=cache_dir, allow_globals=allow_globals)
        return cls.from_checkpoint(ckpt, normalize=normalize, device=device, dtype=dtype)
