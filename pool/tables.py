"""`PoolTables`: what a pool holds, by name, as configured: models, heads and datasets.

The base of `OpenCLIPVisionModelPool`: its construction (keyword arguments or a config read by
`pool.config`), the names of its entries, their resolution to `pool.entries.Entry` and
FusionBench's model-table and dataset API. Nothing here reads a checkpoint: loading models and
heads is `pool.modelpool`'s job; datasets are loaded by `pool.data`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .allowlist import parse_allow_globals
from .cache import resolve_cache_dir
from .config import (
    SECTIONS,
    as_mapping,
    check_entry_keys,
    check_keys,
    pool_config,
    read_config,
    read_yaml_pool,
    write_yaml,
)
from .configsafety import HYDRA_KEYS, Redactor
from .data import load_dataset_entry
from .entries import Entry, is_special_name, plain_config, resolve_entry
from .errors import CheckpointNotFoundError, ConfigError, PoolError
from .hub import HF_PREFIX
from .modeling import DType
from .notfound import missing_message
from .task_vectors import PRETRAINED

__all__ = ["PoolTables"]

log = logging.getLogger("pool.modelpool")  # the pool's own logger: verify filters its empty-pool warning

#: The name of a merged model (special: left out of `PoolTables.model_names`).
_MERGED = "_merged_"
_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # split -> how docstrings name it
_Pool = TypeVar("_Pool", bound="PoolTables")


def _names(split: str) -> property:
    """FusionBench's ``<split>_dataset_names`` property."""
    return property(lambda pool: list(pool._split(split)),
                    doc=f"Every {_SPLITS[split]} dataset name, in config order.")


def _has(split: str) -> property:
    """FusionBench's ``has_<split>_dataset`` property."""
    return property(lambda pool: bool(pool._split(split)),
                    doc=f"Whether the pool has any {_SPLITS[split]} dataset.")


class PoolTables:
    """A pool's models, classification heads and datasets by name, and its load defaults.

    Build it from keyword arguments or from a YAML file / DictConfig with `from_config`. Nothing
    is read until something is loaded (`pool.OpenCLIPVisionModelPool` loads).

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
        **extra: other keys, kept in ``extra`` (a config's ``model_dir`` for its interpolations,
            FusionBench's ``_usage_`` and ``_version_``) and written back by `config`; Hydra's
            own keys (``_target_``, ``_recursive_``, ...) are dropped.

    Raises:
        ConfigError: a section is not a mapping, an extra key is a near miss of a known one
            (``classification_head``, ``modles``), which would silently drop a whole section, or
            a key of a model or head entry is a near miss of an entry key (``model_nme``,
            ``pickle_pth``, ``normalise``).
    """

    def __init__(self, models: Any = None, classification_heads: Any = None, train_datasets: Any = None,
                 val_datasets: Any = None, test_datasets: Any = None, *, device: Any = None,
                 dtype: DType = None, cache_dir: Any = None, allow_globals: Any = None, **extra: Any) -> None:
        self._models = as_mapping(models, "models")
        self._heads = as_mapping(classification_heads, "classification_heads")
        self._datasets = {
            "train": as_mapping(train_datasets, "train_datasets"),
            "val": as_mapping(val_datasets, "val_datasets"),
            "test": as_mapping(test_datasets, "test_datasets"),
        }
        self.device = device
        self.dtype = dtype
        resolve_cache_dir(cache_dir)  # a bad value is a ConfigError now, not at the first load
        self.cache_dir = cache_dir
        self.allow_globals = parse_allow_globals(allow_globals)
        check_keys(list(extra), where="OpenCLIPVisionModelPool")
        for section, table in (("models", self._models), ("classification_heads", self._heads)):
            for name, value in table.items():
                check_entry_keys(section, name, value, where="OpenCLIPVisionModelPool")
        self.extra = {k: v for k, v in extra.items() if k not in HYDRA_KEYS}
        self._null_sections: frozenset[str] = frozenset()  # from_config: the sections its config gave as null
        self._processors: tuple[Any, Any] | None = None  # open_clip's transforms, until the models change
        self._redact = Redactor()  # from_config fills it with the config's environment values
        self.instantiate = True  # from_config(instantiate=False) turns Hydra entries off
        if not self._models:
            log.warning("the pool has no models")

    # -- construction and config (read and written by pool.config) ---------------------------------
    @classmethod
    def from_config(cls: type[_Pool], config: Any, overrides: list[str] | None = None, *,
                    instantiate: bool = True, **kwargs: Any) -> _Pool:
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
        FusionBench's CLI does). They are relative to the config given: the pool's keys, or in a
        FusionBench program file (the pool under ``modelpool:``, which is entered) the file's, so
        ``modelpool.model_dir=...``. An override of a key the config lacks and the pool does not
        read is refused, naming the keys there are (``+key=value`` adds one). ``kwargs`` replace
        top-level keys.

        Args:
            config: a pool YAML file (``~`` is expanded), a DictConfig or a mapping; with Hydra
                initialised, a config name that is no file. Hydra's own keys (``_target_``,
                ``_recursive_``, ...) are left out; other keys starting with ``_`` (FusionBench's
                ``_usage_``, ``_version_``) are kept and written back by `config`.
            overrides: ``key=value`` strings applied to the config before its interpolations are
                resolved; None applies none.
            instantiate: False for the data-only mode (above); True (the default) trusts the config.
            **kwargs: values that replace top-level keys after resolution (``device="cuda"``).

        Returns:
            The pool (of the class it is called on).

        Raises:
            ConfigError: the file does not exist, is no valid YAML or is past the bounds, an
                override is no ``key=value`` string or cannot be applied, a key is a near miss of a
                known one, an interpolation cannot be resolved, or a section is not a mapping; in the
                data-only mode also a Hydra key, a resolver call, or a Hydra config name.

        Example:
            >>> from pool import OpenCLIPVisionModelPool
            >>> config = {"model_dir": "/ckpt", "models": {"_pretrained_": "${model_dir}/zeroshot.pt"}}
            >>> pool = OpenCLIPVisionModelPool.from_config(config, overrides=["models.cars=/ckpt/cars.pt"])
            >>> pool.all_model_names, str(pool.entry("_pretrained_").path)
            (['_pretrained_', 'cars'], '/ckpt/zeroshot.pt')
            >>> pool = OpenCLIPVisionModelPool.from_config("pool.yaml", device="cuda")  # doctest: +SKIP
        """
        values, redact = read_config(config, overrides, instantiate=instantiate)
        values.update(kwargs)
        try:
            pool = cls(**values)
        except PoolError as exc:
            raise redact.error(exc) from exc
        pool._redact, pool.instantiate = redact, instantiate
        pool._null_sections = frozenset(s for s in SECTIONS if s in values and values[s] is None)
        return pool

    @classmethod
    def from_yaml(cls: type[_Pool], path: str | Path, *, instantiate: bool = True) -> _Pool:
        """Read a pool written by `to_yaml` (or any pool YAML; a top-level ``modelpool:`` key is entered).

        A top-level ``modelpool:`` key, as in FusionBench's files, is entered when the file has
        no ``models:`` key of its own (`pool.config.read_yaml_pool`).

        Args:
            path: the YAML file (``~`` is expanded).
            instantiate: False for `from_config`'s data-only mode (the whole file is checked).

        Returns:
            The pool, as `from_config` builds it.

        Raises:
            ConfigError: the file does not exist, or as `from_config`.
        """
        return cls.from_config(read_yaml_pool(path, instantiate=instantiate), instantiate=instantiate)

    @property
    def config(self) -> Any:
        """The pool as a config (a DictConfig with ``_target_``): what `to_yaml` writes and
        `from_config` / Hydra's ``instantiate`` read back. Module-instance entries are included as
        objects (such a config cannot be written as YAML). Keys starting with ``_`` other than
        Hydra's (FusionBench's ``_usage_``, ``_version_``) and the sections that `from_config`'s
        config gave as null (while still empty) are written back as they were."""
        return pool_config(self, self._sections(), null=self._null_sections)

    def to_yaml(self, path: str | Path, resolve: bool = True) -> None:
        """Write `config` as YAML (``from_yaml`` reads it back, heads and datasets included).

        Args:
            path: the file to write (``~`` is expanded).
            resolve: resolve interpolations before writing (the default).

        Raises:
            ConfigError: a model or head is a module instance, which YAML cannot hold.
        """
        write_yaml(self.config, self._sections(), path, resolve=resolve)

    def _sections(self) -> dict[str, dict[str, Any]]:
        return {"models": self._models, "classification_heads": self._heads,
                **{f"{split}_datasets": table for split, table in self._datasets.items()}}

    def redact(self, text: str) -> str:
        """``text`` with every value the config took from the environment (``${oc.env:NAME}``)
        shown as that interpolation instead, so that reports never print a secret.

        Args:
            text: a message, path or report line.

        Returns:
            The text, environment values replaced (unchanged for a pool built without a config).
        """
        return self._redact(text)

    # -- names -------------------------------------------------------------------------------------
    @property
    def all_model_names(self) -> list[str]:
        """Every model name in config order, special names such as ``_pretrained_`` included."""
        return list(self._models)

    @property
    def model_names(self) -> list[str]:
        """Regular model names (special names such as ``_pretrained_`` left out).

        Example:
            >>> PoolTables(models={"_pretrained_": "a.pt", "cars": "b.pt"}).model_names
            ['cars']
        """
        return [n for n in self._models if not is_special_name(n)]

    @property
    def has_pretrained(self) -> bool:
        """Whether the pool has a ``_pretrained_`` model."""
        return PRETRAINED in self._models

    @property
    def has_merged(self) -> bool:
        """Whether the pool has a ``_merged_`` model."""
        return _MERGED in self._models

    @property
    def has_instance_models(self) -> bool:
        """Whether a model is a module instance (algorithms may then change it in place)."""
        return any(isinstance(v, nn.Module) for v in self._models.values())

    @property
    def classification_head_names(self) -> list[str]:
        """Every classification head name, in config order."""
        return list(self._heads)

    @staticmethod
    def is_special_model(name: str) -> bool:
        """``_pretrained_``, ``_merged_`` and other ``_name_`` entries are special.

        Special models are left out of `model_names` (and so of the pool's ``named_models``).

        Args:
            name: a model name.

        Returns:
            Whether the name is special.

        Example:
            >>> [PoolTables.is_special_model(n) for n in ("_merged_", "_pretrained_", "cars")]
            [True, True, False]
        """
        return is_special_name(name)

    def __len__(self) -> int:
        return len(self.model_names)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    # -- entries -----------------------------------------------------------------------------------
    def entry(self, name_or_config: Any, section: str = "models") -> Entry:
        """Resolve a name (or an inline configuration) to its `Entry`.

        Args:
            name_or_config: a name in ``section``; else the path of an existing checkpoint file
                (the entry is named after the file) or an ``hf://`` hub id (named by it); else an
                inline configuration of any entry form (named by its ``name`` attribute, or ``<inline>``).
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
            if name_or_config.startswith(HF_PREFIX):  # a hub id is always an entry (looked up when read)
                return resolve_entry(name_or_config, name_or_config, section)
            kind = "model" if section == "models" else "classification head"
            raise ConfigError(
                f"unknown {kind} {name_or_config!r}; the pool's {section} are: "
                f"{', '.join(table) or '(none)'}. Use one of those names, or a path to a checkpoint file.")
        return resolve_entry(getattr(name_or_config, "name", "<inline>"), name_or_config, section)

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
        check_entry_keys("models", name, model_or_config, where="add_model")
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
        value = self._model_entry(name)
        if isinstance(value, nn.Module):
            return value
        plain = plain_config(value)
        return copy.deepcopy(plain) if return_copy else plain

    def get_model_path(self, name: str) -> str:
        """The checkpoint file a model is read from.

        Args:
            name: the model's name.

        Returns:
            The file's path (``~`` expanded), as a string; for a hub id, its snapshot folder in the
            local Hugging Face cache.

        Raises:
            ConfigError: unknown name, or a Hydra / module entry (no file).
            CheckpointNotFoundError: a hub id missing from the local cache (the message says how to
                fetch it); a missing local file is returned as written, and fails when read.
        """
        self._model_entry(name)
        entry = self.entry(name, "models")
        if entry.path is None:
            raise ConfigError(f"pool entry {entry.label} is a {entry.form} entry: it has no checkpoint file")
        if entry.hub is not None and entry.hub_source is None and not entry.path.exists():
            raise CheckpointNotFoundError(2, f"pool entry {entry.label}: {missing_message(entry.path)}", str(entry.path))
        return str(entry.path)

    def _model_entry(self, name: str) -> Any:
        if name not in self._models:
            raise ConfigError(f"unknown models entry {name!r}; the pool's models are: "
                              f"{', '.join(self._models) or '(none)'}")
        return self._models[name]

    # -- datasets ----------------------------------------------------------------------------------
    def load_dataset(self, split: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """Load one dataset of a split by name (`pool.data.load_dataset_entry`).

        FusionBench's ``load_train_dataset(name)``, ``load_val_dataset(name)`` and
        ``load_test_dataset(name)`` are this method with the split given.

        Args:
            split: ``"train"``, ``"val"`` (split ``validation``, ``val`` or ``valid``) or ``"test"``.
            name: the dataset's name in that split's section (``train_datasets``, ...).
            *args: ignored (FusionBench passes some).
            **kwargs: ignored.

        Returns:
            The dataset.

        Raises:
            ConfigError: the split is unknown, or the pool has no dataset of that name in it.
            DatasetError: the dataset cannot be loaded (offline hub, missing split, ...).

        Example:
            >>> train = pool.load_dataset("train", "cars")  # doctest: +SKIP
        """
        self._ignored(f"load_{split}_dataset", args, kwargs)
        table = self._split(split)
        if name not in table:
            raise ConfigError(f"unknown {split} dataset {name!r}; the pool's {split}_datasets are: "
                              f"{', '.join(table) or '(none)'}")
        return load_dataset_entry(table[name], split, f"{split}_datasets.{name}")

    def datasets(self, split: str) -> Iterator[Any]:
        """Each dataset of a split in order, loaded one at a time.

        FusionBench's ``train_datasets()``, ``val_datasets()`` and ``test_datasets()`` are this
        method with the split given.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Yields:
            Each dataset (errors as `load_dataset`, when the iteration reaches it).
        """
        self._split(split)  # an unknown split fails here, before anything is loaded
        load = getattr(self, f"load_{split}_dataset")  # FusionBench's per-split loader, overridable
        for name in list(self._split(split)):
            yield load(name)

    @staticmethod
    def _ignored(method: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Log (debug) the arguments a FusionBench call passes that change nothing here."""
        if args or kwargs:
            log.debug("%s: ignoring arguments %s %s (they do not change how pool reads a checkpoint)",
                      method, args, sorted(kwargs))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._datasets:
            raise ConfigError(f"unknown dataset split {split!r}; the splits are: {', '.join(_SPLITS)}")
        return self._datasets[split]

    # FusionBench's names, one split each: real methods, so that a subclass may override one
    def load_train_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """One train dataset by name (`load_dataset` with ``split="train"``)."""
        return self.load_dataset("train", name, *args, **kwargs)

    def load_val_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """One validation dataset by name (`load_dataset` with ``split="val"``)."""
        return self.load_dataset("val", name, *args, **kwargs)

    def load_test_dataset(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """One test dataset by name (`load_dataset` with ``split="test"``)."""
        return self.load_dataset("test", name, *args, **kwargs)

    def train_datasets(self) -> Iterator[Any]:
        """Each train dataset in order, one at a time, through `load_train_dataset`."""
        return self.datasets("train")

    def val_datasets(self) -> Iterator[Any]:
        """Each validation dataset in order, one at a time, through `load_val_dataset`."""
        return self.datasets("val")

    def test_datasets(self) -> Iterator[Any]:
        """Each test dataset in order, one at a time, through `load_test_dataset`."""
        return self.datasets("test")

    train_dataset_names = _names("train")
    val_dataset_names = _names("val")
    test_dataset_names = _names("test")
    has_train_dataset = _has("train")
    has_val_dataset = _has("val")
    has_test_dataset = _has("test")
