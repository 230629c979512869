"""`OpenCLIPVisionModelPool`: named encoders, heads and datasets from one configuration.

The pool resolves each entry's form (`pool.entries`), asks the checkpoint reader for tensors and
builds `ImageEncoder` / `ClassificationHead` from them. It keeps no model alive: `named_models`
yields one at a time, so iterating 20 fine-tuned encoders holds one in memory.
"""

from __future__ import annotations

import copy
import difflib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .allowlist import parse_allow_globals
from .arch import VisionArch, arch_for_name, infer_arch
from .cache import resolve_cache_dir
from .checkpoint import Checkpoint, read_checkpoint
from .configsafety import (
    Redactor,
    check_data_only,
    env_secrets,
    load_yaml_config,
    raw_container,
    resolved_data,
)
from .data import load_dataset_entry
from .entries import Entry, is_special_name, plain_config, resolve_entry
from .errors import ArchitectureMismatchError, ConfigError, PoolError, amended
from .keys import key_mismatch, task_vector_pair, to_clip_keys
from .modeling import ClassificationHead, DType, ImageEncoder, check_head_fits, image_transforms, place_module
from .sharding import check_shard, shard_units

__all__ = ["OpenCLIPVisionModelPool"]

log = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"
MERGED = "_merged_"
_SECTIONS = ("models", "classification_heads", "train_datasets", "val_datasets", "test_datasets")


def _as_mapping(value: Any, section: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): value[k] for k in value.keys()}
    raise ConfigError(f"{section}: expected a mapping of name -> entry, found {type(value).__name__}")


def _with_entry(exc: PoolError, entry: Entry) -> PoolError:
    """A copy of ``exc`` (same type) whose message starts with the entry's name."""
    return amended(exc, prefix=f"pool entry {entry.label}: ")


class OpenCLIPVisionModelPool:
    """A pool of OpenCLIP image encoders, classification heads and datasets.

    Build it from keyword arguments (``models=..., classification_heads=..., train_datasets=...``)
    or from a YAML file / DictConfig with `from_config`. ``device`` and ``dtype`` set defaults for
    every load; each ``load_*`` call can override them. Nothing is read until something is loaded.

    Args:
        models: name -> entry, in any form `pool.entries` reads: a checkpoint path,
            ``{model_name, pickle_path}``, ``{model_name, state_dict_path}``, a Hydra config or an
            ``nn.Module``. ``_pretrained_`` names the pre-trained model.
        classification_heads: name -> entry, in the same forms; a head pairs with the model of
            the same name.
        train_datasets: name -> dataset entry (`pool.data.load_dataset_entry`).
        val_datasets: name -> dataset entry.
        test_datasets: name -> dataset entry.
        device: the device of every load whose call and entry name none (None: the CPU).
        dtype: the dtype of every load whose call and entry name none (None: the checkpoint's).
        cache_dir: the conversion cache of every file load (`pool.cache`): pickled checkpoints
            are kept there as safetensors after their first read. None (the default) uses
            ``$OPENCLIP_POOL_CACHE_DIR`` when set; False turns the cache off.
        allow_globals: exact ``module.name`` globals every file load accepts besides pool's
            allowlist (`pool.allowlist`); each stays an inert record in pool, and the verify report
            lists those a file named.
        **extra: other keys, kept in ``extra`` (a config's ``model_dir`` for its interpolations);
            keys starting with ``_`` are dropped.

    Raises:
        ConfigError: a section is not a mapping, or an extra key is a near miss of a known one
            (``classification_head``, ``modles``), which would silently drop a whole section.

    Example:
        >>> from pool import OpenCLIPVisionModelPool
        >>> pool = OpenCLIPVisionModelPool(
        ...     models={"_pretrained_": "ViT-B-32/zeroshot.pt", "cars": "ViT-B-32/Cars/finetuned.pt"},
        ...     classification_heads={"cars": "ViT-B-32/head_Cars.pt"})
        >>> pool.model_names, pool.all_model_names, pool.has_pretrained, len(pool)
        (['cars'], ['_pretrained_', 'cars'], True, 1)
        >>> encoder, head = pool.load_model_and_head("cars")  # doctest: +SKIP
    """

    def __init__(self, models: Any = None, classification_heads: Any = None, train_datasets: Any = None,
                 val_datasets: Any = None, test_datasets: Any = None, *, device: Any = None,
                 dtype: DType = None, cache_dir: Any = None, allow_globals: Any = None, **extra: Any) -> None:
        self._models = _as_mapping(models, "models")
        self._heads = _as_mapping(classification_heads, "classification_heads")
        self._datasets = {
            "train": _as_mapping(train_datasets, "train_datasets"),
            "val": _as_mapping(val_datasets, "val_datasets"),
            "test": _as_mapping(test_datasets, "test_datasets"),
        }
        self.device = device
        self.dtype = dtype
        resolve_cache_dir(cache_dir)  # a bad value is a ConfigError now, not at the first load
        self.cache_dir = cache_dir
        self.allow_globals = parse_allow_globals(allow_globals)
        _check_keys(list(extra), where="OpenCLIPVisionModelPool")
        self.extra = {k: v for k, v in extra.items() if not k.startswith("_")}
        self._processors: tuple[Any, Any] | None = None
        self._redact = Redactor()  # from_config fills it with the config's environment values
        self.instantiate = True  # from_config(instantiate=False) turns Hydra entries off
        if not self._models:
            log.warning("the pool has no models")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, overrides: list[str] | None = None, *, instantiate: bool = True,
                    **kwargs: Any) -> OpenCLIPVisionModelPool:
        """Build from a YAML path, a DictConfig or a mapping (OmegaConf interpolation applies).

        ``instantiate=True`` (the default) treats the config as trusted code, as Hydra does: a
        ``_target_`` entry runs what it names and resolvers such as ``${oc.env:...}`` apply.
        ``instantiate=False`` is the data-only mode for configs from outside (a pull request's):
        Hydra's keys (``_target_``, ``_args_``, ``_partial_``, ...) anywhere and every resolver
        call are refused before anything is resolved; plain ``${a.b}`` references still work
        (`pool.configsafety.check_data_only`). In both modes a YAML file is read within bounds
        (`pool.configsafety.load_yaml_config`), and values taken from the environment are kept
        out of messages and reports (`redact`).

        ``overrides`` are ``key=value`` strings applied to the config first (``["device=cuda",
        "models.cars=cars.pt"]``), as in FusionBench's ``from_config(config_name, overrides)``; a
        config *name* that is no file is composed by Hydra when Hydra is initialised (as
        FusionBench's CLI does). ``kwargs`` replace top-level keys.

        Args:
            config: a pool YAML file (``~`` is expanded), a DictConfig or a mapping; with Hydra
                initialised, a config name that is no file. Keys starting with ``_`` (such as
                ``_target_``) are left out.
            overrides: ``key=value`` strings applied to the config before its interpolations are
                resolved; None applies none.
            instantiate: False for the data-only mode (above); True (the default) trusts the config.
            **kwargs: values that replace top-level keys after resolution (``device="cuda"``).

        Returns:
            The pool.

        Raises:
            ConfigError: the file does not exist, is no valid YAML or is past the bounds, an
                override is no ``key=value`` string or cannot be applied, a key is a near miss of a
                known one, an interpolation cannot be resolved, or a section is not a mapping; in the
                data-only mode also a Hydra key, a resolver call, or a Hydra config name.

        Example:
            >>> config = {"model_dir": "/ckpt", "models": {"_pretrained_": "${model_dir}/zeroshot.pt"}}
            >>> pool = OpenCLIPVisionModelPool.from_config(config, overrides=["models.cars=/ckpt/cars.pt"])
            >>> pool.all_model_names, str(pool.entry("_pretrained_").path)
            (['_pretrained_', 'cars'], '/ckpt/zeroshot.pt')
            >>> pool = OpenCLIPVisionModelPool.from_config("pool.yaml", device="cuda")  # doctest: +SKIP
        """
        from omegaconf import DictConfig, OmegaConf

        config_name = "(mapping)"
        if not instantiate and isinstance(config, (str, Path)) and not Path(config).expanduser().is_file():
            raise ConfigError(f"pool config not found: {Path(config).expanduser().absolute()} (the data-only mode "
                              "reads a YAML file or a mapping, never a Hydra config name, which Hydra composes "
                              "and resolves first)")
        if (isinstance(config, (str, Path)) and not Path(config).suffix and not Path(config).expanduser().is_file()
                and _hydra_ready()):  # a config *name* (no extension), as FusionBench's CLI passes
            from hydra import compose

            config_name = str(config)
            groups = config_name.split("/")[:-1]
            try:  # overrides are relative to the pool, as for a file: the group path put before them,
                # and "++" (set, whether or not the key exists), as key=value does for a file
                config = compose(config_name=config_name,
                                 overrides=["++" + ".".join([*groups, o.lstrip("+")]) for o in (overrides or [])])
                for group in groups:
                    config = config[group]
            except Exception as exc:  # Hydra's own exceptions: one clear message
                raise ConfigError(f"pool config {config_name!r}: Hydra could not compose it: {exc}") from exc
            overrides = None
        if isinstance(config, (str, Path)):
            path = Path(config).expanduser()
            config_name = str(path.absolute())
            if not path.is_file():
                raise ConfigError(f"pool config not found: {path.absolute()}")
            config = load_yaml_config(path)
        elif not isinstance(config, DictConfig):
            try:
                config = OmegaConf.create(dict(config), flags={"allow_objects": True})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"pool config: expected a mapping of sections, found "
                                  f"{type(config).__name__}") from exc
        if not isinstance(config, DictConfig):
            raise ConfigError(f"pool config {config_name}: the top level is a {type(config).__name__}; a pool "
                              "config is a mapping with models: and classification_heads: sections")
        if overrides:
            bad = [o for o in overrides if not isinstance(o, str) or "=" not in o or not o.split("=", 1)[0].strip()]
            try:
                if bad:
                    raise ValueError(f"{bad} are not key=value strings")
                config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
            except Exception as exc:  # a malformed override: one clear message
                raise ConfigError(f"pool config {config_name}: cannot apply overrides {list(overrides)}: {exc}") from exc
        if not instantiate:  # what is checked is what is resolved: the raw data, cut from any parent
            raw = raw_container(config)
            check_data_only(raw, f"pool config {config_name}")
            config = OmegaConf.create(raw, flags={"allow_objects": True})
        _check_keys([str(k) for k in config.keys()], where=f"pool config {config_name}")
        redact = Redactor(env_secrets(_root(config)))
        try:
            if instantiate:
                OmegaConf.resolve(config)
            else:  # resolved once into plain data: a resolved "${...}" stays text, never resolved again
                config = resolved_data(config, f"pool config {config_name}")
        except PoolError:
            raise
        except Exception as exc:  # interpolation errors
            raise redact.error(ConfigError(f"pool config: cannot resolve interpolations: {exc}")) from exc
        values = {str(k): config[k] for k in config.keys() if not str(k).startswith("_")}
        values.update(kwargs)
        try:
            pool = cls(**values)
        except PoolError as exc:
            raise redact.error(exc) from exc
        pool._redact, pool.instantiate = redact, instantiate
        return pool

    @classmethod
    def from_yaml(cls, path: str | Path, *, instantiate: bool = True) -> OpenCLIPVisionModelPool:
        """Read a pool written by `to_yaml` (or any pool YAML; a top-level ``modelpool:`` key is entered).

        A top-level ``modelpool:`` key, as in FusionBench's files, is entered when the file has
        no ``models:`` key of its own.

        Args:
            path: the YAML file (``~`` is expanded).
            instantiate: False for `from_config`'s data-only mode (the whole file is checked).

        Returns:
            The pool, as `from_config` builds it.

        Raises:
            ConfigError: the file does not exist, or as `from_config`.

        Example:
            >>> pool.to_yaml("pool.yaml")  # doctest: +SKIP
            >>> OpenCLIPVisionModelPool.from_yaml("pool.yaml").model_names  # doctest: +SKIP
            ['cars', 'dtd']
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"pool config not found: {file.absolute()}")
        config = load_yaml_config(file)
        if not instantiate:
            check_data_only(config, f"pool config {file.absolute()}")
        if "modelpool" in config and "models" not in config:
            config = config.modelpool
        return cls.from_config(config, instantiate=instantiate)

    @property
    def config(self) -> Any:
        """The pool as a config (a DictConfig with ``_target_``): what `to_yaml` writes and
        `from_config` / Hydra's ``instantiate`` read back. Module-instance entries are included as
        objects (such a config cannot be written as YAML)."""
        from omegaconf import OmegaConf

        body: dict[str, Any] = {"_target_": f"{type(self).__module__}.{type(self).__qualname__}",
                                "_recursive_": False,  # Hydra must hand the entries over, not build them
                                "models": dict(self._models), "classification_heads": dict(self._heads)}
        for split in ("train", "val", "test"):
            if self._datasets[split]:
                body[f"{split}_datasets"] = dict(self._datasets[split])
        for key in ("device", "dtype"):
            value = getattr(self, key)
            if value is not None:
                body[key] = str(value).removeprefix("torch.")
        if self.cache_dir is not None:
            body["cache_dir"] = self.cache_dir if isinstance(self.cache_dir, bool) else str(self.cache_dir)
        if self.allow_globals:
            body["allow_globals"] = sorted(self.allow_globals)
        body.update(self.extra)
        from omegaconf import UnsupportedValueType

        try:
            return OmegaConf.create(body)
        except UnsupportedValueType:  # module instances: kept as objects
            return OmegaConf.create(body, flags={"allow_objects": True})

    def to_yaml(self, path: str | Path, resolve: bool = True) -> None:
        """Write `config` as YAML (``from_yaml`` reads it back, heads and datasets included).

        Args:
            path: the file to write (``~`` is expanded).
            resolve: resolve interpolations before writing (the default).

        Raises:
            ConfigError: a model or head is a module instance, which YAML cannot hold.
        """
        from omegaconf import OmegaConf

        instances = [f"{section}.{name}" for section, table in (("models", self._models),
                                                                ("classification_heads", self._heads))
                     for name, value in table.items() if isinstance(value, nn.Module)]
        if instances:
            raise ConfigError(f"cannot write {', '.join(instances)} as YAML: module instances. Save them "
                              "with save_model and use the files' paths instead.")
        OmegaConf.save(self.config, Path(path).expanduser(), resolve=resolve)

    def _table(self, section: str, name: str) -> Any:
        table = self._models if section == "models" else self._heads
        if name not in table:
            raise ConfigError(f"unknown {section} entry {name!r}; the pool's {section} are: "
                              f"{', '.join(table) or '(none)'}")
        return table[name]

    # -- names -------------------------------------------------------------------------------------
    @property
    def all_model_names(self) -> list[str]:
        """Every model name in config order, special names such as ``_pretrained_`` included."""
        return list(self._models)

    @property
    def model_names(self) -> list[str]:
        """Regular model names (special names such as ``_pretrained_`` left out).

        Example:
            >>> OpenCLIPVisionModelPool(models={"_pretrained_": "a.pt", "cars": "b.pt"}).model_names
            ['cars']
        """
        return [n for n in self._models if not is_special_name(n)]

    @property
    def has_pretrained(self) -> bool:
        """Whether the pool has a ``_pretrained_`` model."""
        return PRETRAINED in self._models

    @property
    def classification_head_names(self) -> list[str]:
        """Every classification head name, in config order."""
        return list(self._heads)

    @property
    def train_dataset_names(self) -> list[str]:
        """Every train dataset name, in config order."""
        return list(self._datasets["train"])

    @property
    def val_dataset_names(self) -> list[str]:
        """Every validation dataset name, in config order."""
        return list(self._datasets["val"])

    @property
    def test_dataset_names(self) -> list[str]:
        """Every test dataset name, in config order."""
        return list(self._datasets["test"])

    def __len__(self) -> int:
        return len(self.model_names)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __repr__(self) -> str:
        return (f"OpenCLIPVisionModelPool(models={self.all_model_names}, "
                f"classification_heads={self.classification_head_names})")

    # -- entries -----------------------------------------------------------------------------------
    def entry(self, name_or_config: Any, section: str = "models") -> Entry:
        """Resolve a name (or an inline configuration) to its `Entry`.

        Args:
            name_or_config: a name in ``section``; else the path of an existing checkpoint file
                (the entry is named after the file); else an inline configuration of any entry
                form (named by its ``name`` attribute, or ``<inline>``).
            section: ``"models"`` (the default) or ``"classification_heads"``.

        Returns:
            The resolved `Entry`: its form, file and options. Nothing is read.

        Raises:
            ConfigError: the name is neither in the section nor an existing file, or the
                configuration is no entry form.
        """
        table = self._models if section == "models" else self._heads
        if isinstance(name_or_config, str) and name_or_config in table:
            return resolve_entry(name_or_config, table[name_or_config], section)
        if isinstance(name_or_config, str):
            if Path(name_or_config).expanduser().is_file():
                return resolve_entry(Path(name_or_config).name, name_or_config, section)
            kind = "model" if section == "models" else "classification head"
            raise ConfigError(
                f"unknown {kind} {name_or_config!r}; the pool's {section} are: "
                f"{', '.join(table) or '(none)'}. Use one of those names, or a path to a checkpoint file.")
        return resolve_entry(getattr(name_or_config, "name", "<inline>"), name_or_config, section)

    def read_entry(self, entry: Entry, *, device: Any = None) -> Checkpoint:
        """Read the checkpoint file an entry points at (raises with the entry's name).

        Args:
            entry: a file entry (`entry`).
            device: where the tensors go, in any form `pool.checkpoint.read_checkpoint` takes
                (None: the CPU); the entry's ``mmap`` option applies.

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
            return read_checkpoint(entry.path, map_location=device, mmap=entry.options.get("mmap"),
                                   cache_dir=self.cache_dir, allow_globals=self.allow_globals)
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc

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
        dtype = _first(dtype, kwargs.pop("torch_dtype", None))
        _ignored("load_model", args, kwargs)
        entry = self.entry(name_or_config, "models")
        device = _first(device, map_location, entry.options.get("device"), self.device)
        dtype = _first(dtype, entry.options.get("dtype"), self.dtype)
        start = time.perf_counter()
        if entry.form == "module":
            model = entry.config
            model = place_module(model, device, dtype)
        elif entry.form == "hydra":
            model = self._instantiate(entry)
            model = place_module(model, device, dtype)
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
        as the fine-tuned model has them); the fine-tuned models are loaded one at a time.

        Args:
            **kwargs: `load_model`'s keyword arguments.

        Returns:
            ``(pretrained, vectors)``: the encoder and one state dict of differences per regular
            model, in `model_names` order.

        Raises:
            ConfigError: the pool has no ``_pretrained_``.
            ArchitectureMismatchError: a model does not line up with ``_pretrained_`` key for key.
        """
        pretrained = self.load_pretrained_model(**kwargs)
        base = pretrained.state_dict()
        vectors = []
        for name, model in self.named_models(**kwargs):
            state, against = task_vector_pair(model.state_dict(), base)
            problem = key_mismatch(state, against, PRETRAINED)
            if problem:
                raise ArchitectureMismatchError(f"pool entry models.{name}: no task vector against "
                                                f"{PRETRAINED}: {problem}")
            vectors.append({k: (v - against[k]) if v.is_floating_point() else v for k, v in state.items()})
        return pretrained, vectors

    def save_model(self, model: nn.Module, path: str | Path, *args: Any, **kwargs: Any) -> Path:
        """Save a model's weights (a merged encoder, say) so that every form of the pool loads it.

        Safetensors by default (with the encoder's architecture and activation, or a head's
        ``normalize`` flag, in its metadata); a torch zip state dict when ``path`` ends in
        ``.pt``, ``.pth`` or ``.bin``. Written atomically and read back before it replaces
        anything; never a pickled module. Extra arguments (FusionBench passes some) are ignored.

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
        from .saving import save_module_weights

        _ignored("save_model", args, {})
        return save_module_weights(model, path, **kwargs)

    def add_model(self, name: str, model_or_config: Any) -> None:
        """Add a model under a new name: any entry form, or a module instance.

        Args:
            name: the new model's name (``_merged_`` for a merged model, say).
            model_or_config: an entry in any form `entry` resolves, or an ``nn.Module``.

        Raises:
            ConfigError: the name is taken, or the configuration is no entry form.
        """
        if name in self._models:
            raise ConfigError(f"the pool already has a model named {name!r}; models are: "
                              f"{', '.join(self._models)}")
        resolve_entry(name, model_or_config, "models")  # refuses what no form reads
        self._models[name] = model_or_config
        self._processors = None

    def get_model_config(self, name: str, return_copy: bool = True) -> Any:
        """The configuration of a model as written (a path string, a mapping, or a module).

        Args:
            name: the model's name.
            return_copy: return a deep copy (the default) rather than the pool's own mapping.

        Returns:
            The entry: a path string, a plain dict (interpolations resolved), or the module itself.

        Raises:
            ConfigError: the pool has no model of that name.
        """
        value = self._table("models", name)
        if isinstance(value, nn.Module):
            return value
        plain = plain_config(value)
        return copy.deepcopy(plain) if return_copy else plain

    def get_model_path(self, name: str) -> str:
        """The checkpoint file a model is read from.

        Args:
            name: the model's name.

        Returns:
            The file's path (``~`` expanded), as a string.

        Raises:
            ConfigError: unknown name, or a Hydra / module entry (no file).
        """
        self._table("models", name)
        entry = self.entry(name, "models")
        if entry.path is None:
            raise ConfigError(f"pool entry {entry.label} is a {entry.form} entry: it has no checkpoint file")
        return str(entry.path)

    @staticmethod
    def is_special_model(name: str) -> bool:
        """``_pretrained_``, ``_merged_`` and other ``_name_`` entries are special.

        Special models are left out of `model_names` (and so of `named_models`).

        Args:
            name: a model name.

        Returns:
            Whether the name is special.

        Example:
            >>> [OpenCLIPVisionModelPool.is_special_model(n) for n in ("_merged_", "_pretrained_", "cars")]
            [True, True, False]
        """
        return is_special_name(name)

    @property
    def has_instance_models(self) -> bool:
        """Whether a model is a module instance (algorithms may then change it in place)."""
        return any(isinstance(v, nn.Module) for v in self._models.values())

    @property
    def has_merged(self) -> bool:
        """Whether the pool has a ``_merged_`` model."""
        return MERGED in self._models

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
        dtype = _first(dtype, kwargs.pop("torch_dtype", None))
        _ignored("load_classification_head", args, kwargs)
        entry = self.entry(name_or_config, "classification_heads")
        device = _first(device, map_location, entry.options.get("device"), self.device)
        dtype = _first(dtype, entry.options.get("dtype"), self.dtype)
        if entry.form == "module":
            head = entry.config
        elif entry.form == "hydra":
            head = self._instantiate(entry)
        else:
            ckpt = self.read_entry(entry, device=device)
            try:
                return ClassificationHead.from_checkpoint(ckpt, normalize=entry.options.get("normalize"),
                                                          device=device, dtype=dtype)
            except PoolError as exc:
                raise _with_entry(exc, entry) from exc
        head = place_module(head, device, dtype)
        return head

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

    # -- datasets ----------------------------------------------------------------------------------
    def _load_dataset(self, split: str, name: str) -> Any:
        table = self._datasets[split]
        if name not in table:
            raise ConfigError(f"unknown {split} dataset {name!r}; the pool's {split}_datasets are: "
                              f"{', '.join(table) or '(none)'}")
        return load_dataset_entry(table[name], split, f"{split}_datasets.{name}")

    def load_train_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Load one train dataset by name (`pool.data.load_dataset_entry`, split ``train``).

        Args:
            name: the dataset's name in ``train_datasets``.
            *args: ignored (FusionBench passes some).
            **kwargs: ignored.

        Returns:
            The dataset.

        Raises:
            ConfigError: the pool has no train dataset of that name.
            DatasetError: the dataset cannot be loaded (offline hub, missing split, ...).

        Example:
            >>> train = pool.load_train_dataset("cars")  # doctest: +SKIP
        """
        _ignored("load_train_dataset", args, kwargs)
        return self._load_dataset("train", name)

    def load_val_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Load one validation dataset by name (split ``validation``, ``val`` or ``valid``).

        Args:
            name: the dataset's name in ``val_datasets``.
            *args: ignored (FusionBench passes some).
            **kwargs: ignored.

        Returns:
            The dataset.

        Raises:
            ConfigError: the pool has no validation dataset of that name.
            DatasetError: the dataset cannot be loaded.

        Example:
            >>> val = pool.load_val_dataset("cars")  # doctest: +SKIP
        """
        _ignored("load_val_dataset", args, kwargs)
        return self._load_dataset("val", name)

    def load_test_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Load one test dataset by name (split ``test``).

        Args:
            name: the dataset's name in ``test_datasets``.
            *args: ignored (FusionBench passes some).
            **kwargs: ignored.

        Returns:
            The dataset.

        Raises:
            ConfigError: the pool has no test dataset of that name.
            DatasetError: the dataset cannot be loaded.

        Example:
            >>> test = pool.load_test_dataset("cars")  # doctest: +SKIP
        """
        _ignored("load_test_dataset", args, kwargs)
        return self._load_dataset("test", name)

    def train_datasets(self) -> Iterator[Any]:
        """Each train dataset in order, loaded one at a time.

        Yields:
            Each dataset (errors as `load_train_dataset`, when the iteration reaches it).
        """
        for name in self.train_dataset_names:
            yield self.load_train_dataset(name)

    def val_datasets(self) -> Iterator[Any]:
        """Each validation dataset in order, loaded one at a time.

        Yields:
            Each dataset (errors as `load_val_dataset`, when the iteration reaches it).
        """
        for name in self.val_dataset_names:
            yield self.load_val_dataset(name)

    def test_datasets(self) -> Iterator[Any]:
        """Each test dataset in order, loaded one at a time.

        Yields:
            Each dataset (errors as `load_test_dataset`, when the iteration reaches it).
        """
        for name in self.test_dataset_names:
            yield self.load_test_dataset(name)

    @property
    def has_train_dataset(self) -> bool:
        """Whether the pool has any train dataset."""
        return bool(self._datasets["train"])

    @property
    def has_val_dataset(self) -> bool:
        """Whether the pool has any validation dataset."""
        return bool(self._datasets["val"])

    @property
    def has_test_dataset(self) -> bool:
        """Whether the pool has any test dataset."""
        return bool(self._datasets["test"])

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

    def redact(self, text: str) -> str:
        """``text`` with every value the config took from the environment (``${oc.env:NAME}``)
        shown as that interpolation instead, so that reports never print a secret.

        Args:
            text: a message, path or report line.

        Returns:
            The text, environment values replaced (unchanged for a pool built without a config).

        Example:
            >>> pool.redact("not found: /srv/private/x.pt")  # doctest: +SKIP
            'not found: ${oc.env:ROOT}/x.pt'
        """
        return self._redact(text)

    # -- helpers -----------------------------------------------------------------------------------
    def _instantiate(self, entry: Entry) -> Any:
        from hydra.utils import instantiate

        if not self.instantiate:
            raise ConfigError(f"pool entry {entry.label}: a Hydra entry (_target_), but the pool was built in the "
                              "data-only mode (instantiate=False), which runs nothing a config names. Give a "
                              "checkpoint path instead, or build the pool with instantiate=True for a trusted "
                              "config.")
        try:
            return instantiate(entry.config)
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc
        except Exception as exc:  # Hydra wraps errors: report with the entry name
            cause = exc.__cause__ if isinstance(exc.__cause__, PoolError) else None
            if cause is not None:
                raise _with_entry(cause, entry) from exc
            raise ConfigError(f"pool entry {entry.label}: Hydra could not instantiate "
                              f"{entry.config.get('_target_')!r}: {exc}") from exc


def _root(config: Any) -> Any:
    """The whole config a DictConfig belongs to (its interpolations may reach any of it)."""
    get_root = getattr(config, "_get_root", None)
    return get_root() if callable(get_root) else config


def _hydra_ready() -> bool:
    try:
        from hydra.core.global_hydra import GlobalHydra
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return False
    return GlobalHydra.instance().is_initialized()


def _ignored(method: str, args: tuple, kwargs: dict[str, Any]) -> None:
    if args or kwargs:
        log.debug("%s: ignoring arguments %s %s (they do not change how pool reads a checkpoint)",
                  method, args, sorted(kwargs))


def _first(*values: Any) -> Any:
    """The first value that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


_KNOWN_KEYS = (*_SECTIONS, "device", "dtype", "cache_dir", "allow_globals")


def _check_keys(keys: list[str], *, where: str) -> None:
    """Extra keys are kept (a config may define ``model_dir`` for its interpolations), but one that
    is a near miss of a known key (``classification_head``, ``modles``) would silently drop a
    whole section: refuse it, naming the key and the one it was probably meant to be."""
    for key in keys:
        if key in _KNOWN_KEYS or key.startswith("_"):
            continue
        close = difflib.get_close_matches(key, _KNOWN_KEYS, n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{where}: unknown key {key!r}; did you mean {close[0]!r}? (Known keys: "
                              f"{', '.join(_KNOWN_KEYS)}; other keys are kept only for interpolations.)")
        log.debug("%s: keeping extra key %r (usable in interpolations)", where, key)



