"""`ImageEncoder` and `ClassificationHead`: the task-arithmetic modules, rebuilt safely.

Both mirror the originals in ``src.modeling`` (attributes, forward, ``state_dict()`` keys) but are
built from weights: the CLIP is constructed on the meta device and the checkpoint's tensors are
assigned into it, so there is no download and no initialisation thrown away. The classes say what
they are; how a file becomes one is `pool.loading`'s pipeline, which every constructor here runs.
`check_head_fits` checks that a head takes what an encoder gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from typing import Any

import torch
from torch import nn

from .arch import VisionArch
from .arch import image_transforms as image_transforms  # re-exported: callers of the old home
from .checkpoint import Checkpoint
from .errors import ArchitectureMismatchError
from .loading import (
    encoder_from_checkpoint,
    encoder_from_state_dict,
    head_from_checkpoint,
    load_encoder,
    load_head,
)
from .placement import DType
from .placement import place_module as place_module  # re-exported: callers of the old home

__all__ = ["ImageEncoder", "ClassificationHead", "DType", "check_head_fits"]


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
        return encoder_from_state_dict(cls, state_dict, model_name=model_name, quick_gelu=quick_gelu,
                                       device=device, dtype=dtype, modules=modules, source=source, heads=heads)

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
        return encoder_from_checkpoint(cls, checkpoint, **kwargs)

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
        return load_encoder(cls, path, model_name=model_name, quick_gelu=quick_gelu, device=device, dtype=dtype,
                            mmap=mmap, map_location=map_location, cache_dir=cache_dir, allow_globals=allow_globals)


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
        return head_from_checkpoint(cls, checkpoint, normalize=normalize, device=device, dtype=dtype)

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
        return load_head(cls, path, normalize=normalize, device=device, dtype=dtype, map_location=map_location,
                         cache_dir=cache_dir, allow_globals=allow_globals)


def check_head_fits(encoder: nn.Module, head: nn.Module, name: str = "") -> None:
    """Raise ArchitectureMismatchError when a head's input size is not the encoder's output.

    Modules without ``embed_dim`` (the encoder) or ``in_features`` (the head) are not checked.

    Args:
        encoder: the image encoder (its ``embed_dim``).
        head: the classification head (its ``in_features``).
        name: the pool entry both belong to, for the message.

    Raises:
        ArchitectureMismatchError: the sizes differ: the head belongs to another architecture.
    """
    embed = getattr(encoder, "embed_dim", None)
    in_features = getattr(head, "in_features", None)
    if embed is not None and in_features is not None and embed != in_features:
        raise ArchitectureMismatchError(
            f"pool entry {name!r}: the classification head takes {in_features}-dim features but the "
            f"encoder produces {embed}-dim features; the head belongs to another architecture. Pair "
            "it with an encoder of that size or fix the config.")
