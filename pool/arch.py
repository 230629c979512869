"""Architectures: what a ViT checkpoint's weights say it is, and building it without waste.

`infer_arch` reads patch size, width, layers, image size, MLP ratio and embedding size from the
tensor shapes (and head count / activation from a pickled module's records when there are any);
`arch_for_name` reads open_clip's config for a model name; `build_clip` constructs the open_clip
``CLIP`` for an architecture, on the meta device when asked, so no time goes into initialising
weights that are about to be replaced.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .errors import ArchitectureMismatchError, ConfigError, printable

__all__ = [
    "VisionArch",
    "OPENAI_MODEL_NAMES",
    "arch_for_name",
    "infer_arch",
    "build_clip",
    "check_arch",
    "name_for_arch",
    "default_quick_gelu",
    "known_architectures",
    "recorded_quick_gelu",
    "QUICK_GELU_METADATA",
    "HEADS_METADATA",
    "recorded_heads",
]

log = logging.getLogger(__name__)

# Architectures OpenAI released; the task-arithmetic checkpoints come from their weights, whose
# transformer uses QuickGELU, so these names default to QuickGELU here.
OPENAI_MODEL_NAMES = frozenset(
    {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"}
)
_SHAPE_FIELDS = ("image_size", "patch_size", "width", "layers", "mlp_ratio", "embed_dim")
MAX_LAYERS = 256  # transformer blocks (the largest released ViTs have 48-64)


@dataclass(frozen=True)
class VisionArch:
    """A ViT CLIP image tower plus the shapes of the text pieces an ImageEncoder keeps.

    `infer_arch` reads one off the weights, `arch_for_name` from open_clip's config for a name;
    `build_clip` builds the model. Frozen and hashable.

    Attributes:
        image_size: input resolution in pixels (square images).
        patch_size: side of a patch in pixels.
        width: the vision transformer's width.
        layers: the vision transformer's block count.
        heads: attention heads per block.
        mlp_ratio: each block's MLP hidden size over ``width``.
        embed_dim: the size of the image embedding (the columns of ``visual.proj``).
        quick_gelu: True for QuickGELU, False for GELU, None when not known (yet).
        text_context_length: rows of the kept ``positional_embedding`` (default 77).
        text_vocab_size: rows of the kept ``token_embedding`` (default 49408).
        text_width: width of the kept text pieces (``ln_final``, ``token_embedding``; default 512).

    Example:
        >>> from pool.arch import arch_for_name
        >>> arch = arch_for_name("ViT-B-32")
        >>> arch.patch_size, arch.width, arch.layers, arch.embed_dim, arch.quick_gelu
        (32, 768, 12, 512, True)
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    embed_dim: int
    quick_gelu: bool | None = None
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_width: int = 512

    def describe(self) -> str:
        """One line for people: patch, width, layers, resolution, embedding and activation.

        Returns:
            The description; the activation is left out when ``quick_gelu`` is None.

        Example:
            >>> arch_for_name("ViT-B-32").describe()
            'patch 32, width 768, 12 layers, 224 px, embed 512, QuickGELU'
        """
        act = {True: ", QuickGELU", False: ", GELU", None: ""}[self.quick_gelu]
        return (f"patch {self.patch_size}, width {self.width}, {self.layers} layers, "
                f"{self.image_size} px, embed {self.embed_dim}{act}")

    def shapes(self) -> tuple[Any, ...]:
        """The shapes that decide whether weights fit (what `check_arch` and `name_for_arch` compare).

        Returns:
            ``(image_size, patch_size, width, layers, mlp_ratio, embed_dim)``: no head count,
            activation or text sizes.
        """
        return tuple(getattr(self, f) for f in _SHAPE_FIELDS)

    def vision_cfg(self) -> dict[str, Any]:
        """open_clip's ``vision_cfg`` for this tower.

        Returns:
            ``image_size``, ``patch_size``, ``width``, ``layers``, ``head_width`` (``width``
            over ``heads``) and ``mlp_ratio``.
        """
        return {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
                "layers": self.layers, "head_width": self.width // max(1, self.heads),
                "mlp_ratio": self.mlp_ratio}

    def text_cfg(self) -> dict[str, Any]:
        """open_clip's ``text_cfg`` for the kept text pieces, with a single transformer block.

        Returns:
            ``context_length``, ``vocab_size``, ``width``, ``heads`` (``width`` / 64) and
            ``layers`` (1: the text transformer is deleted right after construction).
        """
        # The text transformer is deleted right after construction; one block keeps it cheap.
        return {"context_length": self.text_context_length, "vocab_size": self.text_vocab_size,
                "width": self.text_width, "heads": max(1, self.text_width // 64), "layers": 1}

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (``inspect --json`` reports it).

        Returns:
            A new dict, ``dataclasses.asdict`` of the architecture.
        """
        return asdict(self)


def known_architectures() -> dict[str, VisionArch]:
    """Every plain-ViT model config open_clip ships, by name.

    Read once per process: the first call imports open_clip. Configs this loader cannot build
    (timm towers, non-square images, layer scale, ...) are left out.

    Returns:
        A new dict, open_clip model name -> `VisionArch` (with the config's own activation).

    Example:
        >>> known = known_architectures()
        >>> "ViT-B-32" in known, "RN50" in known
        (True, False)
    """
    return dict(_registry())


@functools.cache
def _registry() -> dict[str, VisionArch]:
    """Every plain-ViT model config open_clip ships, as VisionArch."""
    import open_clip

    out: dict[str, VisionArch] = {}
    for name in open_clip.list_models():
        try:
            out[name] = _arch_from_config(name, open_clip.get_model_config(name))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _arch_from_config(name: str, cfg: Mapping[str, Any] | None) -> VisionArch:
    if not cfg:
        raise KeyError(name)
    v, t = dict(cfg["vision_cfg"]), dict(cfg.get("text_cfg", {}))
    if v.get("timm_model_name") or not isinstance(v.get("layers"), int) or "patch_size" not in v:
        raise ValueError(f"{name} is not a plain ViT")
    extra = set(v) - {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    if extra - {"ls_init_value", "patch_dropout"} or v.get("ls_init_value"):
        raise ValueError(f"{name} has vision options this loader does not build: {sorted(extra)}")
    width = int(v.get("width", 768))
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ValueError("non-square")
        image_size = image_size[0]
    quick = bool(cfg.get("quick_gelu", False))  # the config's own; arch_for_name adds the OpenAI rule
    return VisionArch(
        image_size=int(image_size), patch_size=int(v["patch_size"]), width=width,
        layers=int(v["layers"]), heads=width // int(v.get("head_width", 64)),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)), embed_dim=int(cfg["embed_dim"]),
        quick_gelu=bool(quick), text_context_length=int(t.get("context_length", 77)),
        text_vocab_size=int(t.get("vocab_size", 49408)), text_width=int(t.get("width", 512)),
    )


def _base_name(name: str) -> str:
    return re.sub(r"-quickgelu$", "", name)


def arch_for_name(model_name: str, quick_gelu: bool | None = None) -> VisionArch:
    """The architecture open_clip's config gives ``model_name``.

    OpenAI names (ViT-B-32, ViT-B-16, ViT-L-14, ...) mean QuickGELU unless ``quick_gelu`` says
    otherwise, because the published checkpoints come from OpenAI's weights. task_vectors' own
    spelling ``NAME__pretrained__TAG`` is understood: a tag other than ``openai`` (LAION weights,
    say) means the config's activation (GELU for the plain names).

    Args:
        model_name: an open_clip ViT name (``ViT-B-32``, ``ViT-B-32-quickgelu``, ...), optionally
            as ``NAME__pretrained__TAG``.
        quick_gelu: the activation to use; None (the default) applies the rules above.

    Returns:
        The `VisionArch`, ``quick_gelu`` set to True or False.

    Raises:
        ConfigError: ``model_name`` is not an open_clip ViT config this loader can build (the
            message lists known names).

    Example:
        >>> arch_for_name("ViT-B-16").quick_gelu, arch_for_name("ViT-B-16", quick_gelu=False).quick_gelu
        (True, False)
        >>> arch_for_name("ViT-B-16__pretrained__laion400m_e32").quick_gelu
        False
    """
    name, _, tag = model_name.partition("__pretrained__")
    registry = _registry()
    if name not in registry:
        vits = sorted(n for n in registry if n.startswith("ViT"))
        raise ConfigError(
            f"model_name {model_name!r} is not an open_clip ViT config this loader can build. "
            f"Known ViT names include: {', '.join(vits[:12])} ... ({len(registry)} in all). Leave "
            "model_name out to infer the architecture from the weights.")
    arch = registry[name]
    if name.endswith("-quickgelu") or (_base_name(name) in OPENAI_MODEL_NAMES and tag in ("", "openai")):
        arch = replace(arch, quick_gelu=True)
    if quick_gelu is not None:
        arch = replace(arch, quick_gelu=bool(quick_gelu))
    return arch


def name_for_arch(arch: VisionArch) -> str | None:
    """The open_clip name whose config has these shapes (OpenAI names first), or None.

    Args:
        arch: the architecture; only its `VisionArch.shapes` are compared.

    Returns:
        The best name (OpenAI names first, then names without ``-quickgelu``, then the shortest),
        or None when no open_clip config has these shapes (a custom ViT).

    Example:
        >>> name_for_arch(arch_for_name("ViT-L-14"))
        'ViT-L-14'
    """
    matches = [n for n, a in _registry().items() if a.shapes() == arch.shapes()]
    if not matches:
        return None
    matches.sort(key=lambda n: (_base_name(n) not in OPENAI_MODEL_NAMES, n.endswith("-quickgelu"), len(n), n))
    return matches[0]


#: The safetensors metadata key `pool.convert` writes the activation under ("true" / "false").
QUICK_GELU_METADATA = "pool.quick_gelu"
#: The metadata keys that give the attention heads per block (the weights cannot tell): ours, then
#: a transformers config's.
HEADS_METADATA = "pool.heads"
_HEADS_KEYS = (HEADS_METADATA, "hf.num_attention_heads")


def recorded_heads(metadata: Mapping[str, str]) -> str | None:
    """The attention heads per block a file's metadata records (as written), or None.

    Args:
        metadata: a checkpoint's metadata: `HEADS_METADATA` (ours) is read first, then a
            transformers folder's ``hf.num_attention_heads``.

    Returns:
        The recorded value as a string (not checked), or None when neither key is there.

    Example:
        >>> recorded_heads({"pool.heads": "12"}), recorded_heads({})
        ('12', None)
    """
    return next((metadata[k] for k in _HEADS_KEYS if k in metadata), None)


def default_quick_gelu(arch: VisionArch | str | None) -> bool:
    """The activation to use when the file records none: QuickGELU for OpenAI's shapes.

    An architecture (or open_clip name) of OpenAI's shapes means QuickGELU, as the published
    weights use it; a custom ViT too, as every checkpoint of this field derives from OpenAI's
    weights. An architecture with the shapes of a non-OpenAI config gets that config's activation.

    Args:
        arch: an architecture, an open_clip name (read with `arch_for_name`'s rules), or None
            (a custom ViT).

    Returns:
        True for QuickGELU, False for GELU.

    Raises:
        ConfigError: ``arch`` is a name that is no open_clip ViT config this loader can build.

    Example:
        >>> default_quick_gelu("ViT-B-32"), default_quick_gelu("ViT-B-32__pretrained__laion2b_s34b_b79k")
        (True, False)
    """
    if isinstance(arch, str):
        return bool(arch_for_name(arch).quick_gelu)
    name = name_for_arch(arch) if arch is not None else None
    return bool(arch_for_name(name).quick_gelu) if name else True


def recorded_quick_gelu(metadata: Mapping[str, str]) -> bool | None:
    """The activation a file records in its metadata, or None when it records none: a converted
    file's `QUICK_GELU_METADATA`, or a transformers folder's ``hidden_act`` (``quick_gelu``, or
    ``gelu``, exact like nn.GELU; transformers' default is ``quick_gelu``).

    Args:
        metadata: a checkpoint's metadata (`pool.checkpoint.Checkpoint.metadata`).

    Returns:
        True for QuickGELU, False for GELU, None when nothing is recorded.

    Raises:
        ArchitectureMismatchError: a transformers activation open_clip's ViT does not have.

    Example:
        >>> recorded_quick_gelu({"pool.quick_gelu": "false"}), recorded_quick_gelu({})
        (False, None)
        >>> recorded_quick_gelu({"hf.model_type": "clip_vision_model"})
        True
    """
    value = metadata.get(QUICK_GELU_METADATA)
    if value is not None:
        return value == "true"
    if "hf.model_type" not in metadata:
        return None
    act = metadata.get("hf.hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ArchitectureMismatchError(
            f"the transformers config says hidden_act={act!r}; open_clip's ViT uses quick_gelu or gelu (exact), "
            "so these weights would compute other features.")
    return act == "quick_gelu"


def infer_arch(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, Any] | None = None,
               *, source: str = "checkpoint") -> VisionArch:
    """Read the architecture off normalised CLIP keys (``visual.*``, ``token_embedding.weight``...).

    ``modules`` (from `pool.checkpoint.Checkpoint.modules`, keys without the ``model.`` prefix)
    supplies what shapes cannot: the attention head count and QuickGELU vs GELU. Without it the
    head count is ``width // 64`` and the activation unknown.

    Args:
        state_dict: tensors under open_clip CLIP keys (`pool.keys.to_clip_keys` of any layout);
            only their shapes are read, so meta tensors do.
        modules: a pickled module's records by CLIP path (`pool.keys.to_clip_modules`), or None.
        source: how error messages name the weights (the file, usually).

    Returns:
        The `VisionArch`; ``quick_gelu`` is None unless ``modules`` names the activation class.

    Raises:
        ArchitectureMismatchError: the tensors are no ViT image tower this loader can build (a
            key is missing, shapes disagree, a transformer block is missing, the head count does
            not divide the width, ...).

    Example:
        >>> import torch
        >>> shapes = {"visual.conv1.weight": (64, 3, 8, 8), "visual.positional_embedding": (17, 64),
        ...           "visual.proj": (64, 32), "visual.transformer.resblocks.0.mlp.c_fc.weight": (256, 64)}
        >>> weights = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
        >>> infer_arch(weights).describe()
        'patch 8, width 64, 1 layers, 32 px, embed 32'
    """
    def bad(why: str) -> ArchitectureMismatchError:
        return ArchitectureMismatchError(
            f"{source}: not a ViT image tower this loader can build: {why}. Expected an open_clip "
            "ViT CLIP image encoder (the file may be damaged or another architecture).")

    def shape(key: str, dims: int, *, required: bool = True) -> tuple[int, ...] | None:
        tensor = state_dict.get(key)
        if tensor is None:
            if required:
                raise ArchitectureMismatchError(
                    f"{source}: no ViT image tower found (missing {key!r}); expected an open_clip "
                    f"ViT CLIP image encoder. Keys seen: {', '.join(list(state_dict)[:6])} ...")
            return None
        size = tuple(getattr(tensor, "shape", ()))
        if len(size) != dims or any(not isinstance(d, int) or d < 1 for d in size):
            raise bad(f"{key} has shape {list(size)}, expected {dims} non-zero dimensions")
        return size

    conv = shape("visual.conv1.weight", 4)
    pos = shape("visual.positional_embedding", 2)
    proj = shape("visual.proj", 2)
    fc = shape("visual.transformer.resblocks.0.mlp.c_fc.weight", 2)
    assert conv is not None and pos is not None and proj is not None and fc is not None
    width, channels, patch, patch_w = conv
    if channels != 3 or patch != patch_w:
        raise bad(f"the patch embedding visual.conv1.weight has shape {list(conv)}, expected "
                  "[width, 3, patch, patch]")
    grid = math.isqrt(pos[0] - 1)
    if grid < 1 or grid * grid + 1 != pos[0]:
        raise bad(f"visual.positional_embedding has {pos[0]} rows, expected a square grid plus one")
    if pos[1] != width or fc[1] != width or proj[0] != width:
        raise bad(f"the tower's widths disagree (patch embedding {width}, positional embedding {pos[1]}, "
                  f"MLP input {fc[1]}, projection input {proj[0]})")
    blocks = set()
    for key in state_dict:
        if key.startswith("visual.transformer.resblocks."):
            index = key.split(".")[3]
            if not (index.isascii() and index.isdigit()) or len(index) > 6:
                raise bad(f"a transformer block key with index {printable(index[:20])!r}")
            blocks.add(int(index))
            if len(blocks) > MAX_LAYERS:
                raise bad(f"more than {MAX_LAYERS} transformer blocks")
    layers = len(blocks)
    if blocks != set(range(layers)):
        missing = min(set(range(max(blocks) + 1)) - blocks)
        raise bad(f"transformer blocks numbered up to {max(blocks)} but block {missing} is missing")
    for i in range(layers):  # every block holds its MLP weights: the block count is paid for in bytes
        if shape(f"visual.transformer.resblocks.{i}.mlp.c_fc.weight", 2) != fc:
            raise bad(f"block {i}'s MLP weight has another shape than block 0's {list(fc)}")
    heads, quick = max(1, width // 64), None
    if modules:
        attn = modules.get("visual.transformer.resblocks.0.attn")
        if attn is not None and "num_heads" in attn.attributes:
            num_heads = attn.attributes["num_heads"]
            if not (type(num_heads) is int and num_heads >= 1 and width % num_heads == 0):
                raise bad(f"the pickled attention module says num_heads={str(num_heads)[:20]}, which does not "
                          f"divide the width {width}")
            heads = num_heads
        types = {str(m.type).rsplit(".", 1)[-1] for m in modules.values()}
        if "QuickGELU" in types:
            quick = True
        elif "GELU" in types:
            quick = False
    if width % heads:
        raise bad(f"the width {width} does not split into {heads} attention heads")
    text = shape("token_embedding.weight", 2, required=False)
    ctx = shape("positional_embedding", 2, required=False)
    text_width = text[1] if text is not None else proj[1]
    if text_width % max(1, text_width // 64):
        raise bad(f"the text width {text_width} does not split into {text_width // 64} attention heads")
    return VisionArch(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
        mlp_ratio=fc[0] / width, embed_dim=proj[1], quick_gelu=quick,
        text_context_length=ctx[0] if ctx is not None else 77,
        text_vocab_size=text[0] if text is not None else 49408,
        text_width=text_width,
    )


def _label(arch: VisionArch) -> str:
    name = name_for_arch(arch)
    return f"{name} ({arch.describe()})" if name else f"a custom ViT ({arch.describe()})"


def check_arch(weights: VisionArch, configured: VisionArch, model_name: str, source: str) -> None:
    """Raise ArchitectureMismatchError when the weights are not the configured architecture.

    Only `VisionArch.shapes` are compared (not the activation, head count or text sizes).

    Args:
        weights: the architecture the weights have (`infer_arch`).
        configured: the architecture the configuration names (`arch_for_name`).
        model_name: the configured name, for the message.
        source: how the message names the weights (the file, usually).

    Raises:
        ArchitectureMismatchError: the shapes differ; the message describes both and says to fix
            or leave out ``model_name``.
    """
    if weights.shapes() == configured.shapes():
        return
    raise ArchitectureMismatchError(
        f"{source}: weights are {_label(replace(weights, quick_gelu=None))}; config says "
        f"{model_name} ({replace(configured, quick_gelu=None).describe()}). Set model_name to the "
        "weights' architecture, or leave it out to infer it from the weights.")


def build_clip(arch: VisionArch, *, device: str | torch.device = "meta", source: str | None = None) -> torch.nn.Module:
    """An open_clip ``CLIP`` for ``arch`` with the text transformer removed.

    On the meta device (the default) nothing is allocated or initialised: the caller assigns the
    real tensors with ``load_state_dict(..., assign=True)``. Shapes open_clip cannot build raise
    ArchitectureMismatchError (naming ``source``, the file the shapes came from, when given).

    Args:
        arch: the architecture to build.
        device: where to build it; ``"meta"`` (the default) copies a cached meta-device
            template's structure, any other device constructs (and initialises) a fresh model.
        source: the file the shapes came from, put before an error's message; None leaves the
            message as it is.

    Returns:
        The ``CLIP`` module, without its ``transformer`` (and causal ``attn_mask``).

    Raises:
        ArchitectureMismatchError: open_clip cannot build a ViT of these shapes.

    Example:
        >>> from pool.synth import TINY
        >>> model = build_clip(TINY)
        >>> model.visual.conv1.weight.is_meta, hasattr(model, "transformer")
        (True, False)
    """
    try:
        if torch.device(device).type == "meta":
            return _fresh_structure(_meta_template(arch))
        return _construct(arch, device)
    except ArchitectureMismatchError as exc:
        if source is None:
            raise
        raise ArchitectureMismatchError(f"{source}: {exc}") from None


def _fresh_structure(template: torch.nn.Module) -> torch.nn.Module:
    """A new module tree shaped like ``template`` (a meta-device model): every module object and
    every registry dict (parameters, buffers, submodules, hooks) is new, so assigning weights into
    the copy never touches the template; the meta tensors themselves and plain configuration
    attributes are shared (they are replaced, or never changed). ~30x cheaper than deepcopy."""
    clone = object.__new__(type(template))
    state = dict(template.__dict__)
    for key, value in state.items():
        if key == "_modules":
            state[key] = {name: None if child is None else _fresh_structure(child) for name, child in value.items()}
        elif isinstance(value, (dict, set)):
            state[key] = type(value)(value) if not isinstance(value, OrderedDict) else OrderedDict(value)
    clone.__dict__.update(state)
    return clone


@functools.lru_cache(maxsize=8)
def _meta_template(arch: VisionArch) -> torch.nn.Module:
    return _construct(arch, "meta")


def _construct(arch: VisionArch, device: str | torch.device) -> torch.nn.Module:
    from open_clip.model import CLIP

    try:
        with torch.device(device):
            model = CLIP(arch.embed_dim, arch.vision_cfg(), arch.text_cfg(),
                         quick_gelu=bool(arch.quick_gelu))
    except (AssertionError, ValueError) as exc:  # open_clip's (and torch.nn's) own shape checks
        raise ArchitectureMismatchError(
            f"open_clip cannot build a ViT of these shapes ({arch.describe()}): {printable(str(exc))[:200]}. "
            "The weights are no open_clip ViT image encoder.") from None
    del model.transformer
    if "attn_mask" in model._buffers:  # the text tower's causal mask: no text tower, no mask
        del model._buffers["attn_mask"]
        model.attn_mask = None
    return model
