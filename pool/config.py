"""Pool configs read and written: YAML files, DictConfigs, mappings and Hydra config names.

`read_config` turns what `OpenCLIPVisionModelPool.from_config` is given into the keyword arguments
of the pool (interpolations resolved, overrides applied, the data-only mode's checks made);
`pool_config` and `write_yaml` are the other way round (``config`` / ``to_yaml``). The pool
itself is built in `pool.modelpool`; this module never imports it.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, UnsupportedValueType
from torch import nn

from .configsafety import (
    HYDRA_KEYS,
    Redactor,
    check_data_only,
    env_secrets,
    load_yaml_config,
    raw_container,
    resolved_data,
)
from .entries import _OPTION_KEYS
from .errors import ConfigError, PoolError
from .notfound import note_config_file

__all__ = ["as_mapping", "check_keys", "check_entry_keys", "read_config", "read_yaml_pool", "pool_config",
           "write_yaml", "SECTIONS"]

log = logging.getLogger("pool.modelpool")  # the name its messages always had

#: The config sections that hold entries by name.
SECTIONS = ("models", "classification_heads", "train_datasets", "val_datasets", "test_datasets")
#: Every top-level key the pool reads; others are kept for interpolations.
_KNOWN_KEYS = (*SECTIONS, "device", "dtype", "cache_dir", "allow_globals")
#: Every key of a model or head entry given as a mapping (`pool.entries`), Hydra entries aside.
_ENTRY_KEYS = ("pickle_path", "state_dict_path", *sorted(_OPTION_KEYS))


def as_mapping(value: Any, section: str) -> dict[str, Any]:
    """A section's entries as a plain dict of name -> entry.

    Args:
        value: the section as given: a mapping, a DictConfig, or None (no entries).
        section: the section's name, for the message.

    Returns:
        The entries, names as strings, in their order.

    Raises:
        ConfigError: the section is no mapping.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): value[k] for k in value.keys()}
    raise ConfigError(f"{section}: expected a mapping of name -> entry, found {type(value).__name__}")


def check_keys(keys: list[str], *, where: str) -> None:
    """Refuse a top-level key that is a near miss of a known one.

    Extra keys are kept (a config may define ``model_dir`` for its interpolations), but one that is
    a near miss of a known key (``classification_head``, ``modles``) would silently drop a whole
    section.

    Args:
        keys: the top-level keys.
        where: how the message names the config.

    Raises:
        ConfigError: a key is a near miss, naming the key it was probably meant to be.
    """
    for key, close in _unknown_keys(keys, _KNOWN_KEYS):
        if close:
            raise ConfigError(f"{where}: unknown key {key!r}; did you mean {close!r}? (Known keys: "
                              f"{', '.join(_KNOWN_KEYS)}; other keys are kept only for interpolations.)")
        log.debug("%s: keeping extra key %r (usable in interpolations)", where, key)


def _near_miss(key: str, known: tuple[str, ...]) -> str | None:
    """The known key ``key`` is probably a typo of (``classification_head``, ``model_nme``), or None."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return close[0] if close else None


def _unknown_keys(keys: Iterable[Any], known: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    """Each key that is neither known nor private (``_...``), with the known key it is a near miss
    of (`_near_miss`), or None."""
    for key in (str(k) for k in keys):
        if key not in known and not key.startswith("_"):
            yield key, _near_miss(key, known)


def check_entry_keys(section: str, name: str, entry: Any, *, where: str) -> None:
    """Refuse a key of a model or head entry that is a near miss of an entry key (``model_nme``,
    ``pickle_pth``, ``normalise``), as `check_keys` does for top-level keys.

    Keys that are no near miss are left to `pool.entries.resolve_entry` (which refuses them at the
    load); entries that are no mapping, Hydra entries (``_target_``: their keys are the target's
    arguments) and keys starting with ``_`` are not checked.

    Args:
        section: ``"models"`` or ``"classification_heads"``.
        name: the entry's name.
        entry: its configuration, in any form.
        where: how the message names the config.

    Raises:
        ConfigError: a key is a near miss, naming the entry, the key and the one it was probably
            meant to be.
    """
    if not isinstance(entry, Mapping) or "_target_" in entry:  # a DictConfig is a Mapping
        return
    for key, close in _unknown_keys(entry.keys(), _ENTRY_KEYS):
        if close:
            raise ConfigError(f"{where}: {section}.{name}: unknown key {key!r}; did you mean {close!r}? "
                              f"(Known keys of an entry: {', '.join(_ENTRY_KEYS)}.)")


def _check_entries(config: Any, where: str) -> None:
    """`check_entry_keys` for every model and head of a config's sections."""
    for section in SECTIONS[:2]:
        entries = config.get(section) if hasattr(config, "get") else None
        if isinstance(entries, Mapping):
            for name in entries.keys():
                check_entry_keys(section, str(name), entries[name], where=where)


def read_config(config: Any, overrides: list[str] | None = None, *, instantiate: bool = True
                ) -> tuple[dict[str, Any], Redactor]:
    """What `OpenCLIPVisionModelPool.from_config` reads: the pool's keyword arguments.

    Args:
        config: a pool YAML file, a DictConfig or a mapping; with Hydra initialised, a config name
            that is no file (composed by Hydra, ``overrides`` relative to the pool).
        overrides: ``key=value`` strings applied before interpolations are resolved.
        instantiate: False for the data-only mode: Hydra keys and resolver calls are refused
            before anything is resolved (`pool.configsafety.check_data_only`).

    Returns:
        ``(values, redact)``: the top-level keys but Hydra's own (`pool.configsafety.HYDRA_KEYS`:
        ``_target_``, ``_recursive_``, ...), resolved, FusionBench's ``_usage_`` and ``_version_``
        included; and the `Redactor` of the values the config took from the environment.

    Raises:
        ConfigError: as `OpenCLIPVisionModelPool.from_config`.
    """
    if not instantiate and isinstance(config, (str, Path)) and not Path(config).expanduser().is_file():
        raise ConfigError(f"pool config not found: {Path(config).expanduser().absolute()} (the data-only mode "
                          "reads a YAML file or a mapping, never a Hydra config name, which Hydra composes "
                          "and resolves first)")
    config_name = "(mapping)"
    if _is_hydra_name(config):  # a config *name* (no extension), as FusionBench's CLI passes
        config_name = str(config)
        if overrides:  # each must land where the pool reads it, as for a file
            _check_overrides(_compose(config_name, None), overrides, config_name)
        config, overrides = _compose(config_name, overrides), None
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        config_name = str(path.absolute())
        config = _read_yaml(path)
    elif not isinstance(config, DictConfig):
        config = _from_mapping(config)
    if not isinstance(config, DictConfig):
        raise ConfigError(f"pool config {config_name}: the top level is a {type(config).__name__}; a pool "
                          "config is a mapping with models: and classification_heads: sections")
    if overrides:
        config = _apply_overrides(config, overrides, config_name)
    if not instantiate:  # what is checked is what is resolved: the raw data, cut from any parent
        raw = raw_container(config)
        check_data_only(raw, f"pool config {config_name}")
        config = OmegaConf.create(raw, flags={"allow_objects": True})
    config = _pool_section(config)
    check_keys([str(k) for k in config.keys()], where=f"pool config {config_name}")
    redact = Redactor(env_secrets(_root(config)))
    config = _resolve(config, config_name, redact, instantiate=instantiate)
    _check_entries(config, f"pool config {config_name}")
    return {str(k): config[k] for k in config.keys() if str(k) not in HYDRA_KEYS}, redact


def _is_program(config: Any) -> bool:
    """A FusionBench program file: the pool under a top-level ``modelpool:``, no ``models:`` of its own."""
    return "modelpool" in config and "models" not in config and isinstance(config.get("modelpool"), DictConfig)


def _pool_section(config: DictConfig) -> DictConfig:
    """The pool of a config: its ``modelpool:`` section in a FusionBench program file (its
    interpolations still reach the whole file), else the config itself."""
    return config.modelpool if _is_program(config) else config


def read_yaml_pool(path: str | Path, *, instantiate: bool = True) -> Any:
    """The pool section of a YAML file, for `OpenCLIPVisionModelPool.from_yaml`.

    A top-level ``modelpool:`` key, as in FusionBench's files, is entered when the file has no
    ``models:`` key of its own.

    Args:
        path: the YAML file (``~`` is expanded).
        instantiate: False for the data-only mode: the whole file is checked first.

    Returns:
        The DictConfig `read_config` takes.

    Raises:
        ConfigError: the file does not exist, is no valid YAML or is past the bounds; in the
            data-only mode, it has a Hydra key or a resolver call.
    """
    file = Path(path).expanduser()
    config = _read_yaml(file)
    if not instantiate:
        check_data_only(config, f"pool config {file.absolute()}")
    return _pool_section(config)


def pool_config(pool: Any, sections: Mapping[str, Mapping[str, Any]], null: Collection[str] = ()) -> Any:
    """A pool as a config (a DictConfig with ``_target_``), what `OpenCLIPVisionModelPool.config` is.

    Args:
        pool: the pool; its class is the ``_target_`` and its ``device``, ``dtype``,
            ``cache_dir``, ``allow_globals`` and ``extra`` (FusionBench's ``_usage_`` and
            ``_version_`` among them) are written when set.
        sections: its entries by section (`SECTIONS`); empty dataset sections are left out.
        null: the sections its config gave as null: each is written as null while it is empty.

    Returns:
        The DictConfig; module-instance entries are kept as objects (it cannot be written as YAML).
    """
    body: dict[str, Any] = {"_target_": f"{type(pool).__module__}.{type(pool).__qualname__}",
                            "_recursive_": False}  # Hydra must hand the entries over, not build them
    for section in SECTIONS:
        if sections[section] or section in SECTIONS[:2]:
            body[section] = dict(sections[section]) if sections[section] or section not in null else None
        elif section in null:
            body[section] = None
    for key in ("device", "dtype"):
        value = getattr(pool, key)
        if value is not None:
            body[key] = str(value).removeprefix("torch.")
    if pool.cache_dir is not None:
        body["cache_dir"] = pool.cache_dir if isinstance(pool.cache_dir, bool) else str(pool.cache_dir)
    if pool.allow_globals:
        body["allow_globals"] = sorted(pool.allow_globals)
    body.update(pool.extra)
    for key in ("_usage_", "_version_"):  # FusionBench's metadata, where its pool class keeps them
        if getattr(pool, key, None) is not None and key not in body:
            body[key] = getattr(pool, key)
    try:
        return OmegaConf.create(body)
    except UnsupportedValueType:  # module instances: kept as objects
        return OmegaConf.create(body, flags={"allow_objects": True})


def write_yaml(config: Any, sections: Mapping[str, Mapping[str, Any]], path: str | Path, *,
               resolve: bool = True) -> None:
    """Write a pool's config (`pool_config`) as YAML.

    Args:
        config: the pool's config.
        sections: its entries by section, to name the module instances YAML cannot hold.
        path: the file to write (``~`` is expanded).
        resolve: resolve interpolations before writing.

    Raises:
        ConfigError: a model or head is a module instance.
    """
    instances = [f"{section}.{name}" for section in ("models", "classification_heads")
                 for name, value in sections[section].items() if isinstance(value, nn.Module)]
    if instances:
        raise ConfigError(f"cannot write {', '.join(instances)} as YAML: module instances. Save them "
                          "with save_model and use the files' paths instead.")
    OmegaConf.save(config, Path(path).expanduser(), resolve=resolve)


def _read_yaml(path: Path) -> Any:
    """A pool YAML file read within bounds (`pool.configsafety.load_yaml_config`)."""
    if not path.is_file():
        raise ConfigError(f"pool config not found: {path.absolute()}")
    note_config_file(path)  # a not-found checkpoint message then says where a relative path exists
    return load_yaml_config(path)


def _from_mapping(config: Any) -> DictConfig:
    try:
        return OmegaConf.create(dict(config), flags={"allow_objects": True})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pool config: expected a mapping of sections, found "
                          f"{type(config).__name__}") from exc


def _is_hydra_name(config: Any) -> bool:
    """A string with no extension that names no file, while Hydra is initialised: a config name."""
    return (isinstance(config, (str, Path)) and not Path(config).suffix
            and not Path(config).expanduser().is_file() and _hydra_initialized())


def _hydra_initialized() -> bool:
    """Whether a Hydra app (FusionBench's CLI) is running, so that a config name can be composed."""
    if "hydra" not in sys.modules:  # never imported: no Hydra app can be running
        return False
    from hydra.core.global_hydra import GlobalHydra  # lazy: hydra takes ~0.2 s to import

    return GlobalHydra.instance().is_initialized()


def _compose(config_name: str, overrides: list[str] | None) -> Any:
    """The pool section of a Hydra config name, composed with ``overrides``."""
    groups = config_name.split("/")[:-1]
    try:  # overrides are relative to the pool, as for a file: the group path put before them,
        # and "++" (set, whether or not the key exists), as key=value does for a file
        from hydra import compose  # lazy: only a running Hydra app composes config names

        config = compose(config_name=config_name,
                         overrides=["++" + ".".join([*groups, o.lstrip("+")]) for o in (overrides or [])])
        for group in groups:
            config = config[group]
    except Exception as exc:  # Hydra's own exceptions: one clear message
        raise ConfigError(f"pool config {config_name!r}: Hydra could not compose it: {exc}") from exc
    return config


def _apply_overrides(config: DictConfig, overrides: list[str], config_name: str) -> DictConfig:
    """``key=value`` overrides merged into the config, as Hydra applies them: relative to the
    config (a FusionBench program file's root, so ``modelpool.model_dir=...``; else the pool's,
    so ``model_dir=...``). A key that is neither in the config nor one the pool reads is refused
    rather than added where nothing reads it; ``+key=value`` adds it."""
    bad = [o for o in overrides if not isinstance(o, str) or "=" not in o or not o.split("=", 1)[0].strip()]
    try:
        if bad:
            raise ValueError(f"{bad} are not key=value strings")
        _check_overrides(config, overrides, config_name)
        return OmegaConf.merge(config, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    except PoolError:
        raise
    except Exception as exc:  # a malformed override: one clear message
        raise ConfigError(f"pool config {config_name}: cannot apply overrides "
                          f"{list(overrides)}: {exc}") from exc


def _check_overrides(config: DictConfig, overrides: list[str], config_name: str) -> None:
    """`_check_override_target` for each ``key=value`` string (malformed ones are reported elsewhere)."""
    for override in overrides:
        if isinstance(override, str) and "=" in override:
            _check_override_target(config, override, config_name)


def _check_override_target(config: DictConfig, override: str, config_name: str) -> None:
    """ConfigError for an override whose first key the config lacks and nothing would read."""
    key = override.split("=", 1)[0].strip()
    top = key.lstrip("+").split(".", 1)[0]
    program = _is_program(config)
    if key.startswith("+") or top in config or (top in _KNOWN_KEYS and not program):
        return
    keys = ", ".join(str(k) for k in config.keys()) or "(none)"
    if program:
        hint = f"the pool is under modelpool:, so write 'modelpool.{override}'"
    elif top == "modelpool":
        hint = (f"overrides apply to the pool config itself, so drop the 'modelpool.' prefix: "
                f"'{override.split('.', 1)[1] if '.' in override else override}'")
    else:
        close = _near_miss(top, (*(str(k) for k in config.keys()), *_KNOWN_KEYS))
        hint = (f"did you mean {close!r}? " if close else "") + f"Write '+{override}' to add a new key"
    raise ConfigError(f"pool config {config_name}: the override {override!r} sets {top!r}, which the config "
                      f"does not have and the pool does not read (the config's keys: {keys}); {hint}.")


def _resolve(config: DictConfig, config_name: str, redact: Redactor, *, instantiate: bool) -> Any:
    """The config with its interpolations resolved; in the data-only mode, as plain data once (a
    resolved ``"${...}"`` stays text, never resolved again)."""
    try:
        if instantiate:
            OmegaConf.resolve(config)
            return config
        return resolved_data(config, f"pool config {config_name}")
    except PoolError:
        raise
    except Exception as exc:  # interpolation errors
        raise redact.error(ConfigError(f"pool config: cannot resolve interpolations: {exc}")) from exc


def _root(config: Any) -> Any:
    """The whole config a DictConfig belongs to (its interpolations may reach any of it)."""
    get_root = getattr(config, "_get_root", None)
    return get_root() if callable(get_root) else config
