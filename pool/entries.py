"""Pool entries: which configuration form an entry uses, and what it points at.

One entry of ``models:`` or ``classification_heads:`` can be:

* a string: the path of a checkpoint file (any container; a pickled encoder or head), or a
  Hugging Face hub id (``hf://org/name[@revision]``, or a bare ``org/name`` when no such local path
  exists) read from the local cache (`pool.hub`), in this form and in the two below;
* ``{model_name, pickle_path}`` or ``{model_name, state_dict_path}`` (``model_name`` optional:
  the architecture is read from the weights), with optional ``quick_gelu``, ``normalize``;
* a Hydra config with ``_target_`` (configs are trusted code: Hydra runs what it names);
* an ``nn.Module`` instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .containers.hf_folder import is_hf_folder, weights_file
from .errors import CheckpointError, ConfigError, printable
from .hub import HF_PREFIX, HubId, hub_cache_dir, model_path, parse_hub_id, placeholder, snapshot_folder
from .notfound import note_explained

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
        given: the checkpoint path as written (``~`` expanded) of a file entry, else None (also
            for an ``hf://`` id); `path` is where it is read from.
        model_name: the configured open_clip name, if any.
        options: the entry's options among ``quick_gelu``, ``normalize``, ``dtype``, ``device``
            and ``mmap``.
        config: the Hydra config or module instance, for those forms.
        hub: the Hugging Face hub id the file entry may name (`pool.hub.parse_hub_id`), else None.
    """

    name: str
    section: str  # "models" or "classification_heads"
    form: str
    given: Path | None = None
    model_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    config: Any = None  # the Hydra config or module instance
    hub: HubId | None = None

    @cached_property
    def _located(self) -> tuple[Path | None, str | None]:
        """`path` and `hub_source`, looked up once per entry (the first time either is asked for)."""
        return _locate(self.given, self.hub)

    @property
    def path(self) -> Path | None:
        """The checkpoint file (or transformers folder) of a file entry, else None.

        The path as written; for a hub id, its snapshot folder in the local Hugging Face cache,
        looked up when first asked for (nothing is downloaded). A hub id missing from the cache
        gives the place its snapshot would be, which every reader then reports as a
        `pool.errors.CheckpointNotFoundError` saying how to fetch it (`pool.notfound.note_explained`),
        as a missing local file is reported when it is read.
        """
        return self._located[0]

    @property
    def hub_source(self) -> str | None:
        """``hf://org/name@<commit>`` for an entry read from the hub cache (what a lock records), else None."""
        return self._located[1]

    @property
    def label(self) -> str:
        """``<section>.<name>``, as messages name the entry (``models.cars``)."""
        return f"{self.section}.{self.name}"

    @property
    def file_size(self) -> int:
        """The entry's file's bytes on disk (what sharding balances): a transformers folder's (a hub
        snapshot's) weights file's; 0 for an entry with no regular file (a Hydra or module entry,
        another folder, a missing file or hub model)."""
        try:
            path = self.path
            if path is not None and is_hf_folder(path):
                path = weights_file(path)
            return path.stat().st_size if path is not None and path.is_file() else 0
        except (OSError, CheckpointError):
            return 0


def _locate(given: Path | None, hub: HubId | None) -> tuple[Path | None, str | None]:
    """Where a file entry is read from, and its ``hf://org/name@<commit>`` when that is the hub cache.

    A bare ``org/name`` is the local path when one exists (file, folder or link); otherwise, as an
    ``hf://`` id always, it is looked up in the cache. A model missing there gives its placeholder
    path, with the not-found message noted for it (`pool.notfound.note_explained`).
    """
    if hub is None or (given is not None and os.path.lexists(given)):
        return given, None
    cache = hub_cache_dir()
    try:
        folder = snapshot_folder(hub, cache)
    except CheckpointError as exc:  # missing, or the cache unreadable: reported when the entry is read
        where = placeholder(hub, cache)
        message = exc.strerror or str(exc)
        if given is not None:
            message += (f" Nor is {printable(str(given))!r} a local path ({given.absolute()} does not exist); a bare "
                        "ORG/NAME is read as a local path when one exists, write hf://ORG/NAME for the hub alone.")
        note_explained(where, message)
        return where, None
    return model_path(folder), f"{HF_PREFIX}{hub.repo_id}@{folder.name}"


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

    Nothing is read or instantiated: the form is told from the configuration alone (a hub id is
    looked up in the local cache when the entry's `Entry.path` is first asked for).

    Args:
        name: the entry's name.
        config: an ``nn.Module``, a checkpoint path (string or `Path`), a mapping with
            ``_target_`` (Hydra), or a mapping with ``pickle_path`` or ``state_dict_path`` plus
            options (``model_name``, ``quick_gelu``, ``normalize``, ``dtype``, ``device``, ``mmap``).
        section: ``"models"`` (the default) or ``"classification_heads"``.

    Returns:
        The `Entry`.

    Raises:
        ConfigError: a file mapping has unknown keys, an ``hf://`` id is malformed, or the
            configuration is no entry form.

    Example:
        >>> entry = resolve_entry("cars", {"model_name": "ViT-B-32", "state_dict_path": "cars.pt"})
        >>> entry.label, entry.form, entry.model_name
        ('models.cars', 'state_dict_path', 'ViT-B-32')
    """
    if isinstance(config, nn.Module):
        return Entry(name, section, "module", config=config)
    if isinstance(config, (str, Path)):
        given, hub = _file_target(config)
        return Entry(name, section, "path", given=given, hub=hub)
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
            given, hub = _file_target(str(plain[form]))
            return Entry(name, section, form, given=given, hub=hub, model_name=plain.get("model_name"),
                         options=options)
    return None


def _file_target(config: str | Path) -> tuple[Path | None, HubId | None]:
    """A file entry's path as written and the hub id it may name: no path for ``hf://`` (always
    the hub), both for a bare ``org/name`` (`_locate` prefers an existing local path)."""
    hub = parse_hub_id(config) if isinstance(config, str) else None
    if hub is not None and hub.explicit:
        return None, hub
    return Path(config).expanduser(), hub
