"""Dataset entries: a ``datasets.load_dataset`` string, a local directory, or a Hydra config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["load_dataset_entry", "SPLITS"]

log = logging.getLogger(__name__)

#: The split each pool section asks for, with the names tried when the first is absent.
SPLITS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("offline", "connection", "couldn't reach", "could not reach",
                                   "max retries", "name resolution", "network", "timed out",
                                   "hf_hub_offline", "not found on the hub"))


def _load_string(spec: str, split: str, label: str) -> Any:
    import datasets  # heavy (about 2 s): imported when a string entry is loaded, not with the pool

    local = Path(spec).expanduser()
    candidates = SPLITS.get(split, (split,))
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            for name in candidates:
                if name in loaded:
                    return loaded[name]
            raise DatasetError(f"{label}: {local} has splits {list(loaded)}; none of {list(candidates)}.")
        return loaded
    last: Exception | None = None
    for name in candidates:
        try:
            return datasets.load_dataset(spec, split=name)
        except ValueError as exc:  # unknown split: try the next spelling
            last = exc
            if "split" not in str(exc).lower():
                break
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; classify below
            last = exc
            break
    assert last is not None
    if not local.exists():
        reason = "which could not be reached" if _is_offline_error(last) else "which failed"
        raise DatasetError(
            f"{label}: dataset {spec!r} is not a local directory ({local.absolute()} does not exist), "
            f"so datasets looked for it on the Hugging Face hub, {reason} "
            f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}). Download it "
            "where there is network (datasets.load_dataset(...).save_to_disk(DIR)) and point the "
            "config at DIR.") from last
    raise DatasetError(f"{label}: dataset {spec!r} (split {split!r}) could not be loaded: "
                       f"{type(last).__name__}: {last}") from last


def load_dataset_entry(config: Any, split: str, label: str) -> Any:
    """Load one dataset entry of a pool's ``train_datasets`` / ``val_datasets`` / ``test_datasets``.

    A string goes to `datasets.load_dataset(string, split=...)` (or `load_from_disk` for a saved
    directory), trying each name `SPLITS` gives the split (``val``: ``validation``, ``val``,
    ``valid``); a mapping (a DictConfig included) goes to Hydra ``instantiate``; any other value
    is taken to be a dataset already and returned as it is.

    Args:
        config: the entry: a hub name or local path, a Hydra config, or a dataset object.
        split: the section's split: ``"train"``, ``"val"`` or ``"test"``.
        label: how messages name the entry (``train_datasets.cars``).

    Returns:
        The dataset: the split asked for (a directory saved as one dataset is returned whole),
        what Hydra built, or ``config`` itself.

    Raises:
        DatasetError: a saved directory has none of the split's names, the hub could not be
            reached (offline) for a name that is no local directory, the load failed, or Hydra's
            ``instantiate`` failed.

    Example:
        >>> from pool.data import load_dataset_entry
        >>> train = load_dataset_entry("~/data/cars", "train", "train_datasets.cars")  # doctest: +SKIP
    """
    if isinstance(config, (str, Path)):
        return _load_string(str(config), split, label)
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        try:
            from hydra.utils import (
                instantiate,  # lazy: hydra takes ~0.2 s to import; only Hydra entries need it
            )

            return instantiate(config)
        except Exception as exc:  # report with the entry's name
            raise DatasetError(f"{label}: instantiating {dict(config)!r} failed: {exc}") from exc
    return config  # an already-built dataset object
