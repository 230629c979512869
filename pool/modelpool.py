"""`OpenCLIPVisionModelPool`: named encoders, heads and datasets from one configuration.

The pool resolves each entry's form (`pool.entries`), asks the checkpoint reader for tensors and
builds `ImageEncoder` / `ClassificationHead` from them. It keeps no model alive: `named_models`
yields one at a time, so iterating 20 fine-tuned encoders holds one in memory.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .arch import VisionArch, arch_for_name, infer_arch
from .checkpoint import Checkpoint, read_checkpoint
from .data import load_dataset_entry
from .entries import Entry, is_special_name, resolve_entry
from .errors import ArchitectureMismatchError, ConfigError, PoolError, amended
from .keys import to_clip_keys
from .modeling import ClassificationHead, DType, ImageEncoder, image_transforms, place_module

__all__ = ["OpenCLIPVisionModelPool"]

log = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"
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
    every load; each ``load_*`` call can override them.
    """

    def __init__(self, models: Any = None, classification_heads: Any = None, train_datasets: Any = None,
                 val_datasets: Any = None, test_datasets: Any = None, *, device: Any = None,
                 dtype: DType = None, **extra: Any) -> None:
        self._models = _as_mapping(models, "models")
        self._heads = _as_mapping(classification_heads, "classification_heads")
        self._datasets = {
            "train": _as_mapping(train_datasets, "train_datasets"),
            "val": _as_mapping(val_datasets, "val_datasets"),
            "test": _as_mapping(test_datasets, "test_datasets"),
        }
        self.device = device
        self.dtype = dtype
        _check_keys(list(extra), where="OpenCLIPVisionModelPool")
        self.extra = {k: v for k, v in extra.items() if not k.startswith("_")}
        self._processors: tuple[Any, Any] | None = None
        if not self._models:
            log.warning("the pool has no models")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> OpenCLIPVisionModelPool:
        """Build from a YAML path, a DictConfig or a mapping (OmegaConf interpolation applies)."""
        from omegaconf import DictConfig, OmegaConf

        config_name = "(mapping)"
        if isinstance(config, (str, Path)):
            path = Path(config).expanduser()
            config_name = str(path.absolute())
            if not path.is_file():
                raise ConfigError(f"pool config not found: {path.absolute()}")
            try:
                config = OmegaConf.load(path)
            except Exception as exc:  # YAML/OmegaConf errors: one clear message
                raise ConfigError(f"{path.absolute()}: not a valid YAML pool config: {exc}") from exc
        elif not isinstance(config, DictConfig):
            config = OmegaConf.create(dict(config))
        _check_keys([str(k) for k in config.keys()], where=f"pool config {config_name}")
        try:
            OmegaConf.resolve(config)
        except Exception as exc:  # interpolation errors
            raise ConfigError(f"pool config: cannot resolve interpolations: {exc}") from exc
        kwargs = {str(k): config[k] for k in config.keys() if not str(k).startswith("_")}
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- names -------------------------------------------------------------------------------------
    @property
    def all_model_names(self) -> list[str]:
        return list(self._models)

    @property
    def model_names(self) -> list[str]:
        """Regular model names (special names such as ``_pretrained_`` left out)."""
        return [n for n in self._models if not is_special_name(n)]

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._models

    @property
    def classification_head_names(self) -> list[str]:
        return list(self._heads)

    @property
    def train_dataset_names(self) -> list[str]:
        return list(self._datasets["train"])

    @property
    def val_dataset_names(self) -> list[str]:
        return list(self._datasets["val"])

    @property
    def test_dataset_names(self) -> list[str]:
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
        """Resolve a name (or an inline configuration) to its `Entry`."""
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
        """Read the checkpoint file an entry points at (raises with the entry's name)."""
        if entry.path is None:
            raise ConfigError(f"pool entry {entry.label} is a {entry.form} entry, not a file")
        try:
            return read_checkpoint(entry.path, map_location=device, mmap=entry.options.get("mmap"))
        except PoolError as exc:
            raise _with_entry(exc, entry) from exc

    # -- models ------------------------------------------------------------------------------------
    def load_model(self, name_or_config: Any, *, device: Any = None, dtype: DType = None,
                   map_location: Any = None) -> nn.Module:
        """Load one encoder by pool name (or from an inline configuration of any form).

        ``device`` (alias ``map_location``) and ``dtype`` override the entry's and the pool's.
        """
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

    def load_pretrained_model(self, **kwargs: Any) -> nn.Module:
        if not self.has_pretrained:
            raise ConfigError(f"the pool has no {PRETRAINED} model; models are: {', '.join(self._models)}")
        return self.load_model(PRETRAINED, **kwargs)

    def load_pretrained_or_first_model(self, **kwargs: Any) -> nn.Module:
        if self.has_pretrained:
            return self.load_pretrained_model(**kwargs)
        if not self.model_names:
            raise ConfigError("the pool has no models")
        return self.load_model(self.model_names[0], **kwargs)

    def models(self, **kwargs: Any) -> Iterator[nn.Module]:
        for _, model in self.named_models(**kwargs):
            yield model

    def named_models(self, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(name, encoder)`` for each regular model, loading one at a time."""
        for name in self.model_names:
            yield name, self.load_model(name, **kwargs)

    # -- heads -------------------------------------------------------------------------------------
    def load_classification_head(self, name_or_config: Any, *, device: Any = None,
                                 dtype: DType = None, map_location: Any = None) -> nn.Module:
        """Load one head by pool name (pickle path, {pickle_path/state_dict_path}, Hydra, instance)."""
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
        """The encoder and the head of the same name, checked to fit each other."""
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

    def load_train_dataset(self, name: str) -> Any:
        return self._load_dataset("train", name)

    def load_val_dataset(self, name: str) -> Any:
        return self._load_dataset("val", name)

    def load_test_dataset(self, name: str) -> Any:
        return self._load_dataset("test", name)

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
        """The architecture of the pretrained (or first) model, read without building it."""
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
        from hydra.utils import instantiate

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


def check_head_fits(encoder: nn.Module, head: nn.Module, name: str = "") -> None:
    """Raise ArchitectureMismatchError when a head's input size is not the encoder's output."""
    embed = getattr(encoder, "embed_dim", None)
    in_features = getattr(head, "in_features", None)
    if embed is not None and in_features is not None and embed != in_features:
        raise ArchitectureMismatchError(
            f"pool entry {name!r}: the classification head takes {in_features}-dim features but the "
            f"encoder produces {embed}-dim features; the head belongs to another architecture. Pair "
            "it with an encoder of that size or fix the config.")


def _first(*values: Any) -> Any:
    """The first value that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


_KNOWN_KEYS = (*_SECTIONS, "device", "dtype")


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



