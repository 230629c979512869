"""Pool entries: which configuration form an entry uses, and what it points at.

One entry of ``models:`` or ``classification_heads:`` can be:

* a string: the path of a checkpoint file (any container; a pickled encoder or head);
* ``{model_name, pickle_path}`` or ``{model_name, state_dict_path}`` (``model_name`` optional:
  the architecture is read from the weights), with optional ``quick_gelu``, ``normalize``;
* a Hydra config with ``_target_`` (configs are trusted code: Hydra runs what it names);
* an ``nn.Module`` instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import ConfigError

__all__ = ["Entry", "resolve_entry", "is_special_name"]

_OPTION_KEYS = {"model_name", "quick_gelu", "normalize", "dtype", "device", "mmap"}


def is_special_name(name: str) -> bool:
    """Whether a name is special (``_pretrained_`` and the like): kept out of `model_names`.

    Args:
        name: an entry name.

    Returns:
        True for a name of more than two characters that starts and ends with ``_``.

    Example:
        >>> is_special_name("_pretrained_"), is_special_name("cars"), is_special_name("__")
        (True, False, False)
    """
    return len(name) > 2 and name.startswith("_") and name.endswith("_")


@dataclass(frozen=True)
class Entry:
    """A resolved pool entry: its form, file (if any) and options.

    Attributes:
        name: the entry's name in its section.
        section: ``"models"`` or ``"classification_heads"``.
        form: ``"path"``, ``"pickle_path"``, ``"state_dict_path"``, ``"hydra"`` or ``"module"``.
        path: the checkpoint file (``~`` expanded) of a file entry, else None.
        model_name: the configured open_clip name, if any.
        options: the entry's options among ``quick_gelu``, ``normalize``, ``dtype``, ``device``
            and ``mmap``.
        config: the Hydra config or module instance, for those forms.
    """

    name: str
    section: str  # "models" or "classification_heads"
    form: str
    path: Path | None = None
    model_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    config: Any = None  # the Hydra config or module instance

    @property
    def label(self) -> str:
        """``<section>.<name>``, as messages name the entry (``models.cars``)."""
        return f"{self.section}.{self.name}"

    @property
    def file_size(self) -> int:
        """The entry's file's bytes on disk (what sharding balances); 0 for an entry with no
        regular file (a Hydra or module entry, a folder, a missing file)."""
        try:
            return self.path.stat().st_size if self.path is not None and self.path.is_file() else 0
        except OSError:
            return 0


def plain_config(config: Any) -> Any:
    """DictConfig -> dict with interpolations resolved; other values unchanged."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _flag(value: Any, where: str) -> bool:
    """A boolean option as YAML or an interpolation may spell it (``true``, ``"false"``, ``1``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{where}: {value!r} is not true or false")


def resolve_entry(name: str, config: Any, section: str = "models") -> Entry:
    """Classify one entry's configuration into an `Entry`.

    Nothing is read or instantiated: the form is told from the configuration alone.

    Args:
        name: the entry's name.
        config: an ``nn.Module``, a checkpoint path (string or `Path`), a mapping with
            ``_target_`` (Hydra), or a mapping with ``pickle_path`` or ``state_dict_path`` plus
            options (``model_name``, ``quick_gelu``, ``normalize``, ``dtype``, ``device``, ``mmap``).
        section: ``"models"`` (the default) or ``"classification_heads"``.

    Returns:
        The `Entry`.

    Raises:
        ConfigError: a file mapping has unknown keys, or the configuration is no entry form.

    Example:
        >>> entry = resolve_entry("cars", {"model_name": "ViT-B-32", "state_dict_path": "cars.pt"})
        >>> entry.label, entry.form, entry.model_name
        ('models.cars', 'state_dict_path', 'ViT-B-32')
    """
    if isinstance(config, nn.Module):
        return Entry(name, section, "module", config=config)
    if isinstance(config, (str, Path)):
        return Entry(name, section, "path", path=Path(config).expanduser())
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        if "_target_" in config:
            return Entry(name, section, "hydra", config=config)
        entry = _file_entry(name, section, plain_config(config))
        if entry is not None:
            return entry
    raise ConfigError(
        f"{section}.{name}: cannot tell how to load {config!r}. Give a checkpoint path string, "
        "{model_name, pickle_path}, {model_name, state_dict_path}, a Hydra config with _target_, "
        "or an nn.Module instance.")


def _file_entry(name: str, section: str, plain: Mapping[str, Any]) -> Entry | None:
    """A ``{pickle_path | state_dict_path, options...}`` mapping's `Entry`; None when it names neither."""
    options = {k: v for k, v in plain.items() if k in _OPTION_KEYS and k != "model_name"}
    for flag in ("quick_gelu", "normalize", "mmap"):
        if options.get(flag) is not None:
            options[flag] = _flag(options[flag], f"{section}.{name}.{flag}")
    model_name = plain.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise ConfigError(f"{section}.{name}.model_name: {model_name!r} is not an open_clip model name "
                          "(a string such as ViT-B-32)")
    for form in ("pickle_path", "state_dict_path"):
        if plain.get(form):
            unknown = set(plain) - _OPTION_KEYS - {form}
            if unknown:
                raise ConfigError(
                    f"{section}.{name}: unknown keys {sorted(unknown)}; a {form} entry takes "
                    f"{form} plus any of {sorted(_OPTION_KEYS)}.")
            return Entry(name, section, form, path=Path(str(plain[form])).expanduser(),
                         model_name=plain.get("model_name"), options=options)
    return None
