"""`OpenCLIPVisionModelPool`: named encoders and heads loaded from one configuration.

The pool resolves each entry's form (`pool.entries`), asks the checkpoint reader for tensors and
builds `ImageEncoder` / `ClassificationHead` from them. It keeps no model alive: `named_models`
yields one at a time, so iterating 20 fine-tuned encoders holds one in memory. What it holds (its
tables, config and datasets) is `pool.tables.PoolTables`; its task vectors are `pool.task_vectors`'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .arch import VisionArch, arch_for_name, infer_arch
from .checkpoint import Checkpoint, read_checkpoint
from .entries import Entry
from .errors import ArchitectureMismatchError, ConfigError, PoolError, amended
from .keys import to_clip_keys
from .modeling import ClassificationHead, DType, ImageEncoder, check_head_fits, image_transforms, place_module
from .saving import save_module_weights
from .sharding import check_shard, shard_units
from .tables import PoolTables
from .task_vectors import PRETRAINED, task_vector

__all__ = ["OpenCLIPVisionModelPool"]

log = logging.getLogger(__name__)


def _with_entry(exc: PoolError, entry: Entry) -> PoolError:
    """A copy of ``exc`` (same type) whose message starts with the entry's name."""
    return amended(exc, prefix=f"pool entry {entry.label}: ")


def _first(*values: Any) -> Any:
    """The first value that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


def _no_task_vector(name: str, problem: str) -> ArchitectureMismatchError:
    return ArchitectureMismatchError(f"pool entry models.{name}: no task vector against "
                                     f"{PRETRAINED}: {problem}")


class OpenCLIPVisionModelPool(PoolTables):
    """A pool of OpenCLIP image encoders, classification heads and datasets.

    Build it from keyword arguments (``models=..., classification_heads=..., train_datasets=...``,
    each described in `pool.tables.PoolTables`) or from a YAML file / DictConfig with
    `from_config`. ``device`` and ``dtype`` set defaults for every load; each ``load_*`` call can
    override them. Nothing is read until something is loaded.

    Example:
        >>> from pool import OpenCLIPVisionModelPool
        >>> pool = OpenCLIPVisionModelPool(
        ...     models={"_pretrained_": "ViT-B-32/zeroshot.pt", "cars": "ViT-B-32/Cars/finetuned.pt"},
        ...     classification_heads={"cars": "ViT-B-32/head_Cars.pt"})
        >>> pool.model_names, pool.all_model_names, pool.has_pretrained, len(pool)
        (['cars'], ['_pretrained_', 'cars'], True, 1)
        >>> encoder, head = pool.load_model_and_head("cars")  # doctest: +SKIP
    """

    def __repr__(self) -> str:
        return (f"OpenCLIPVisionModelPool(models={self.all_model_names}, "
                f"classification_heads={self.classification_head_names})")

    #: called with ``(entry, checkpoint)`` after each `read_entry` (`observing_reads`)
    _read_observer: Callable[[Entry, Checkpoint], None] | None = None

    @contextlib.contextmanager
    def observing_reads(self, observer: Callable[[Entry, Checkpoint], None]) -> Iterator[None]:
        """Call ``observer(entry, checkpoint)`` after each `read_entry` while the block runs: what a
        load read (the globals a file names) is then known without reading the file again.

        Args:
            observer: called with the entry and the `pool.checkpoint.Checkpoint` read.
        """
        previous, self._read_observer = self._read_observer, observer
        try:
            yield
        finally:
            self._read_observer = previous

    # -- entries -----------------------------------------------------------------------------------
    def read_entry(self, entry: Entry, *, device: Any = None, mmap: bool | None = None) -> Checkpoint:
        """Read the checkpoint file an entry points at (raises with the entry's name).

        Args:
            entry: a file entry (`entry`).
            device: where the tensors go, in any form `pool.checkpoint.read_checkpoint` takes
                (None: the CPU).
            mmap: map the tensors from the file (`pool.checkpoint.read_checkpoint`); None: the
                entry's ``mmap`` option decides.

        Returns:
            The `pool.checkpoint.Checkpoint`.

        Raises:
            ConfigError: the entry is a Hydra or module entry (no file), or ``device`` is no device.
            CheckpointError: the file cannot be used (missing, unsafe, corrupt: the subclasses of
                `pool.checkpoint.read_checkpoint`), the message starting with the entry's name.
        """
        if entry.path is None:
            raise ConfigError(f"pool entry {entry.label} is a {entry.form} entry, not a file")
        try:
            mapped = entry.options.get("mmap") if mmap is None else mmap
            ckpt = read_checkpoint(entry.path, map_location=device, mmap=mapped,
                                   cache_dir=self.cache_dir, allow_globals=self.allow_globals)
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc
        if self._read_observer is not None:
            self._read_observer(entry, ckpt)
        return ckpt

    def _load_args(self, method: str, name_or_config: Any, section: str, device: Any, dtype: DType,
                   map_location: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Entry, Any, DType]:
        """A load's entry, device and dtype: the call's, else the entry's, else the pool's.

        ``map_location`` is the device and ``torch_dtype`` the dtype when those are None; other
        arguments (FusionBench passes some) are ignored with a debug log.
        """
        dtype = _first(dtype, kwargs.pop("torch_dtype", None))
        self._ignored(method, args, kwargs)
        entry = self.entry(name_or_config, section)
        device = _first(device, map_location, entry.options.get("device"), self.device)
        return entry, device, _first(dtype, entry.options.get("dtype"), self.dtype)

    def _module(self, entry: Entry, device: Any, dtype: DType) -> nn.Module:
        """A module or Hydra entry's module, moved to ``device`` and ``dtype``."""
        module = entry.config if entry.form == "module" else self._instantiate(entry)
        return place_module(module, device, dtype)

    # -- models ------------------------------------------------------------------------------------
    def load_model(self, name_or_config: Any, *args: Any, device: Any = None, dtype: DType = None,
                   map_location: Any = None, **kwargs: Any) -> nn.Module:
        """Load one encoder by pool name (or from an inline configuration of any form).

        ``device`` (alias ``map_location``) and ``dtype`` (alias ``torch_dtype``) override the
        entry's and the pool's. Other positional and keyword arguments (FusionBench passes some,
        such as ``weights_only``) do not change how a checkpoint is read: they are ignored, with
        a debug log.

        Args:
            name_or_config: a model name of the pool, a checkpoint path, or an inline entry
                configuration (see `entry`).
            *args: ignored.
            device: where the model goes (None: the entry's ``device``, else the pool's).
            dtype: a ``torch.dtype`` or a name such as ``"bf16"`` (None: the entry's, else the
                pool's, else the checkpoint's).
            map_location: used when ``device`` is None, in any form
                `pool.checkpoint.read_checkpoint` takes.
            **kwargs: ``torch_dtype`` is an alias of ``dtype``; the others are ignored.

        Returns:
            An `ImageEncoder` for a file entry; for a Hydra or module entry, the module it gives,
            moved to ``device`` and ``dtype``.

        Raises:
            ConfigError: the name is unknown, the entry is malformed, its ``model_name``,
                ``dtype`` or ``device`` is not supported, or Hydra cannot instantiate it.
            CheckpointError: the file cannot be used: `pool.errors.CheckpointNotFoundError`,
                `UnsafeCheckpointError`, `CorruptCheckpointError`, ...
            ArchitectureMismatchError: the weights are no ViT image tower, or not the one the
                entry's ``model_name`` names.

        Example:
            >>> pool = OpenCLIPVisionModelPool.from_config("pool.yaml")  # doctest: +SKIP
            >>> encoder = pool.load_model("cars", device="cuda", dtype="bf16")  # doctest: +SKIP
            >>> encoder = pool.load_model("ViT-B-32/Cars/finetuned.pt")  # doctest: +SKIP
        """
        entry, device, dtype = self._load_args("load_model", name_or_config, "models", device, dtype,
                                               map_location, args, kwargs)
        start = time.perf_counter()
        if entry.form in ("module", "hydra"):
            model = self._module(entry, device, dtype)
        else:
            ckpt = self.read_entry(entry, device=device)
            try:
                model = ImageEncoder.from_checkpoint(
                    ckpt, model_name=entry.model_name, quick_gelu=entry.options.get("quick_gelu"),
                    device=device, dtype=dtype, source=f"{ckpt.path} (pool entry {entry.label})")
            except ArchitectureMismatchError:
                raise
            except PoolError as exc:
                raise _with_entry(exc, entry) from exc
        log.info("loaded %s (%s) in %.3f s", entry.label, entry.form, time.perf_counter() - start)
        return model

    def load_pretrained_model(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Load the ``_pretrained_`` model (the base of every task vector).

        Args:
            *args: passed to `load_model` (which ignores them).
            **kwargs: `load_model`'s keyword arguments (``device``, ``dtype``, ...).

        Returns:
            The pre-trained encoder.

        Raises:
            ConfigError: the pool has no ``_pretrained_`` model, or as `load_model`.
            CheckpointError: as `load_model`.
            ArchitectureMismatchError: as `load_model`.

        Example:
            >>> pretrained = pool.load_pretrained_model(device="cuda")  # doctest: +SKIP
        """
        if not self.has_pretrained:
            raise ConfigError(f"the pool has no {PRETRAINED} model; models are: {', '.join(self._models)}")
        return self.load_model(PRETRAINED, *args, **kwargs)

    def load_pretrained_or_first_model(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Load ``_pretrained_``, or the first regular model when the pool has none.

        Args:
            *args: passed to `load_model` (which ignores them).
            **kwargs: `load_model`'s keyword arguments.

        Returns:
            The encoder.

        Raises:
            ConfigError: the pool has no ``_pretrained_`` and no regular model, or as `load_model`.
            CheckpointError: as `load_model`.
            ArchitectureMismatchError: as `load_model`.
        """
        if self.has_pretrained:
            return self.load_pretrained_model(*args, **kwargs)
        if not self.model_names:
            raise ConfigError("the pool has no models")
        return self.load_model(self.model_names[0], *args, **kwargs)

    def models(self, **kwargs: Any) -> Iterator[nn.Module]:
        """Each regular model in order, loaded one at a time (`named_models` without the names).

        Args:
            **kwargs: `load_model`'s keyword arguments.

        Yields:
            Each encoder; it is loaded when the iteration reaches it (errors as `load_model`).
        """
        for _, model in self.named_models(**kwargs):
            yield model

    def named_models(self, shard: tuple[int, int] | None = None, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(name, encoder)`` for each regular model, loading one at a time.

        Only the model being yielded is held: iterating 20 fine-tuned encoders holds one in
        memory (unless the caller keeps them). ``_pretrained_`` and other special names are left
        out.

        Args:
            shard: ``(rank, world_size)``: only this process's share of the models, for a job
                split across processes (torchrun's ``RANK`` and ``WORLD_SIZE``); deterministic and
                balanced by file size (`pool.sharding.shard_units`), so the shards of all ranks
                cover every model exactly once. None: every model.
            **kwargs: `load_model`'s keyword arguments (``device``, ``dtype``, ...).

        Yields:
            ``(name, encoder)``, in config order; an entry's errors (as `load_model`) are raised
            when the iteration reaches it.

        Raises:
            ConfigError: ``shard`` is not ``(rank, world_size)`` with ``0 <= rank < world_size``.

        Example:
            >>> for name, encoder in pool.named_models(device="cuda"):  # doctest: +SKIP
            ...     print(name, encoder.embed_dim)
            cars 512
            dtd 512
            >>> rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # doctest: +SKIP
            >>> mine = [name for name, _ in pool.named_models(shard=(rank, world))]  # doctest: +SKIP
        """
        names = self.model_names
        if shard is not None:
            rank, world_size = check_shard(shard)
            names = shard_units(names, [self._file_size(n) for n in names], rank, world_size)
        for name in names:
            yield name, self.load_model(name, **kwargs)

    def _file_size(self, name: str) -> int:
        try:
            return self.entry(name).file_size
        except PoolError:  # an entry that cannot be resolved weighs nothing; loading it reports why
            return 0

    def load_pretrained_model_and_task_vectors(self, **kwargs: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
        """The ``_pretrained_`` encoder and, for each regular model in order, its task vector.

        A task vector is ``finetuned - pretrained`` for every floating-point tensor (other tensors
        as the fine-tuned model has them; `pool.task_vectors.task_vector`); the fine-tuned models are
        loaded one at a time.

        Args:
            **kwargs: `load_model`'s keyword arguments.

        Returns:
            ``(pretrained, vectors)``: the encoder and one state dict of differences per regular
            model, in `model_names` order.

        Raises:
            ConfigError: the pool has no ``_pretrained_``.
        """
        pretrained = self.load_pretrained_model(**kwargs)
        base = pretrained.state_dict()
        vectors = [task_vector(model.state_dict(), base, functools.partial(_no_task_vector, name))
                   for name, model in self.named_models(**kwargs)]
        return pretrained, vectors

    def save_model(self, model: nn.Module, path: str | Path, *args: Any, **kwargs: Any) -> Path:
        """Save a model's weights (a merged encoder, say) so that every form of the pool loads it.

        Safetensors by default (with the encoder's architecture and activation, or a head's
        ``normalize`` flag, in its metadata); a torch zip state dict when ``path`` ends in
        ``.pt``, ``.pth`` or ``.bin``. Written atomically and read back before it replaces
        anything; never a pickled module. A new file gets the mode ``open`` would give it
        (``0666 & ~umask``), a replaced one keeps its own. Extra arguments (FusionBench passes
        some) are ignored.

        Args:
            model: the module to save: an `ImageEncoder`, a `ClassificationHead` or any module.
            path: the file to write (its folder must exist).
            *args: ignored.
            **kwargs: ignored (logged at debug level).

        Returns:
            The path written.

        Raises:
            ConfigError: ``path`` is a folder or its folder does not exist, or a ``.pt`` / ``.pth``
                / ``.bin`` file could not carry the model's activation, head count or a head's
                ``normalize=False`` (safetensors records them).
            CorruptCheckpointError: the written file did not read back identical (nothing is
                replaced).

        Example:
            >>> pool.save_model(merged, "merged.safetensors")  # doctest: +SKIP
            PosixPath('merged.safetensors')
        """
        self._ignored("save_model", args, {})
        return save_module_weights(model, path, **kwargs)

    # -- heads -------------------------------------------------------------------------------------
    def load_classification_head(self, name_or_config: Any, *args: Any, device: Any = None,
                                 dtype: DType = None, map_location: Any = None, **kwargs: Any) -> nn.Module:
        """Load one head by pool name (pickle path, {pickle_path/state_dict_path}, Hydra, instance).

        Extra positional and keyword arguments are ignored with a debug log, as in `load_model`.

        Args:
            name_or_config: a head name of the pool, a checkpoint path, or an inline entry
                configuration (see `entry`).
            *args: ignored.
            device: where the head goes (None: the entry's ``device``, else the pool's).
            dtype: a ``torch.dtype`` or a name (None: the entry's, else the pool's, else the file's).
            map_location: used when ``device`` is None, as in `load_model`.
            **kwargs: ``torch_dtype`` is an alias of ``dtype``; the others are ignored.

        Returns:
            A `ClassificationHead` for a file entry (its ``normalize`` option, else the flag the
            file stored); for a Hydra or module entry, the module it gives.

        Raises:
            ConfigError: the name is unknown, the entry is malformed, ``dtype`` or ``device`` is
                not supported, or Hydra cannot instantiate it.
            CheckpointError: the file cannot be used, or holds no classification head.
            ArchitectureMismatchError: the head's tensors are empty, not floating point or
                inconsistent.

        Example:
            >>> head = pool.load_classification_head("cars")  # doctest: +SKIP
            >>> logits = head(encoder(images))  # doctest: +SKIP
        """
        entry, device, dtype = self._load_args("load_classification_head", name_or_config, "classification_heads",
                                               device, dtype, map_location, args, kwargs)
        if entry.form in ("module", "hydra"):
            return self._module(entry, device, dtype)
        ckpt = self.read_entry(entry, device=device)
        try:
            return ClassificationHead.from_checkpoint(ckpt, normalize=entry.options.get("normalize"),
                                                      device=device, dtype=dtype)
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc

    def load_model_and_head(self, name: str, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
        """The encoder and the head of the same name, checked to fit each other.

        Args:
            name: the name of both the model and the head.
            **kwargs: the keyword arguments of `load_model` and `load_classification_head`.

        Returns:
            ``(encoder, head)``.

        Raises:
            ArchitectureMismatchError: the head's input size is not the encoder's output size,
                or as `load_model`.
            ConfigError: as `load_model` and `load_classification_head`.
            CheckpointError: as `load_model` and `load_classification_head`.
        """
        encoder = self.load_model(name, **kwargs)
        head = self.load_classification_head(name, **kwargs)
        check_head_fits(encoder, head, name)
        return encoder, head

    # -- processors --------------------------------------------------------------------------------
    @property
    def train_processor(self) -> Any:
        """open_clip's training transform for the pool's architecture (no weights loaded)."""
        return self._get_processors()[0]

    @property
    def test_processor(self) -> Any:
        """open_clip's evaluation transform for the pool's architecture (no weights loaded)."""
        return self._get_processors()[1]

    def architecture(self) -> VisionArch:
        """The architecture of the pretrained (or first) model; for file entries, without building it.

        An entry's ``model_name`` gives it without reading anything; else the file's tensor
        shapes do (the file is read, no model is built). A Hydra or module entry is loaded to ask
        its ``arch``.

        Returns:
            The `VisionArch` (from the shapes alone, the head count is ``width // 64`` and the
            activation None).

        Raises:
            ConfigError: the pool has no models, its ``model_name`` is unknown, or a Hydra or
                module entry has no ``arch``.
            CheckpointError: the file cannot be used.
            ArchitectureMismatchError: the file holds no ViT image tower.

        Example:
            >>> entry = {"model_name": "ViT-B-32", "pickle_path": "zeroshot.pt"}
            >>> OpenCLIPVisionModelPool(models={"_pretrained_": entry}).architecture().describe()
            'patch 32, width 768, 12 layers, 224 px, embed 512, QuickGELU'
        """
        name = PRETRAINED if self.has_pretrained else (self.model_names or [None])[0]
        if name is None:
            raise ConfigError("the pool has no models, so it has no architecture")
        entry = self.entry(name)
        if entry.model_name:
            return arch_for_name(entry.model_name)
        if entry.path is not None:
            ckpt = self.read_entry(entry)
            return infer_arch(to_clip_keys(ckpt.state_dict), None, source=str(entry.path))
        arch = getattr(self.load_model(name), "arch", None)
        if arch is None:
            raise ConfigError(f"pool entry {entry.label}: cannot tell its architecture")
        return arch

    def _get_processors(self) -> tuple[Any, Any]:
        if self._processors is None:
            self._processors = image_transforms(self.architecture())
        return self._processors

    # -- helpers -----------------------------------------------------------------------------------
    def _instantiate(self, entry: Entry) -> Any:
        if not self.instantiate:
            raise ConfigError(f"pool entry {entry.label}: a Hydra entry (_target_), but the pool was built in the "
                              "data-only mode (instantiate=False), which runs nothing a config names. Give a "
                              "checkpoint path instead, or build the pool with instantiate=True for a trusted "
                              "config.")
        try:
            from hydra.utils import (
                instantiate,  # lazy: hydra takes ~0.2 s to import; only Hydra entries need it
            )

            return instantiate(entry.config)
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc
        except Exception as exc:  # Hydra wraps errors: report with the entry name
            cause = exc.__cause__ if isinstance(exc.__cause__, PoolError) else None
            if cause is not None:
                raise _with_entry(cause, entry) from exc
            raise ConfigError(f"pool entry {entry.label}: Hydra could not instantiate "
                              f"{entry.config.get('_target_')!r}: {exc}") from exc
