"""Convert checkpoints to safetensors: one file, or a whole task-arithmetic tree plus its config.

What ``python -m pool convert`` runs. Every conversion:

* reads the source with the restricted reader (an unsafe source is refused, nothing runs) and
  never writes to it;
* writes encoders with `ImageEncoder` state-dict keys (``model.visual...``) and heads as
  ``weight`` / ``bias``, with metadata: ``format=pt``, ``pool.kind``, the architecture
  (``pool.architecture`` description and ``pool.model_name``), ``pool.quick_gelu``, the source's
  sha256, file name and container, and a head's ``normalize`` flag (the key `ClassificationHead`
  reads back);
* writes to a temporary file in the destination's folder, reads it back and compares every tensor
  bit for bit with what was meant to be written, and only then renames it into place;
* refuses an existing destination unless ``force``. In a tree, a destination converted earlier
  from the same source bytes, or one that already holds exactly the tensors a conversion would
  write (say, a safetensors copy written by another tool), counts as up to date and is kept.

This module converts whole trees (`plan_tree`, `convert_tree`) and is the conversions' public
face; one file is `pool.convert_single`, a transformers folder `pool.hf_export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .arch import default_quick_gelu
from .checkpoint import read_checkpoint
from .convert_single import (
    ConvertResult,
    conversion_payload,
    convert_file,
    existing_difference,
    sha256_file,
    stored_source_sha,
)
from .errors import CheckpointError, DestinationExistsError, PoolError
from .hf_export import convert_to_hf
from .writer import write_bytes_atomic

__all__ = ["ConvertResult", "DestinationExistsError", "TreePlan", "convert_file", "convert_to_hf", "plan_tree",
           "convert_tree", "sha256_file"]

_TREE_CONFIG = "pool.safetensors.yaml"
_CONFIG_HEADER = "# written by `openclip-pool convert --tree`"


@dataclass
class TreeItem:
    """One ``.pt`` file of a tree: where its safetensors goes and what a config calls it."""

    source: Path
    destination: Path
    group: Path | None = None  # the architecture folder whose config lists it
    role: str | None = None  # "model" or "head"
    name: str | None = None  # the pool name (None: converted, not in a config)
    sha256: str = ""
    up_to_date: bool = False


@dataclass
class TreePlan:
    """What `plan_tree` found: each file to convert and the configs to write (`convert_tree` runs it).

    Attributes:
        root: the tree's root.
        items: each ``.pt`` file found: its destination, the group (architecture folder) and
            role (``model`` / ``head``) and pool name a config gives it, whether it is up to date.
        configs: each group's config file (``root/pool.safetensors.yaml`` for a single group,
            else one in each group's folder).
        unplaced: the ``.pt`` files converted but named in no config.
    """

    root: Path
    items: list[TreeItem]
    configs: dict[Path, Path] = field(default_factory=dict)  # group -> config path
    unplaced: list[Path] = field(default_factory=list)


def plan_tree(root: str | Path, *, force: bool = False) -> TreePlan:
    """Find every ``.pt`` under root, where its safetensors goes and which config names it.

    Layout: ``<group>/zeroshot.pt`` -> ``_pretrained_``; ``<group>/<Task>/finetuned.pt`` -> ``task``
    (lower-cased); ``<group>/head_<Task>.pt`` -> head ``task`` (a head one level above a single
    group belongs to it). Other ``.pt`` files are converted but named in no config. Raises
    DestinationExistsError listing every destination that exists (unless ``force``) before
    anything is written; a destination converted earlier from the same source bytes, or that
    already holds exactly the tensors its conversion would write, is not listed: it is kept.

    Args:
        root: the tree's root folder (``~`` is expanded); hidden files and folders are skipped.
        force: plan to replace existing destinations and configs instead of refusing them.

    Returns:
        The `TreePlan`; nothing has been written.

    Raises:
        DestinationExistsError: ``root`` is no folder, or (without ``force``) destinations or
            configs that a conversion would replace exist (all listed). A config this command
            wrote earlier is not counted.
        CheckpointError: there is no ``.pt`` file under ``root``, or two files would get the
            same role and name in one group.

    Example:
        >>> from pool.convert import convert_tree, plan_tree
        >>> plan = plan_tree("checkpoints/")  # doctest: +SKIP
        >>> results, configs = convert_tree(plan)  # doctest: +SKIP
        >>> all(r.ok for r in results), configs  # doctest: +SKIP
        (True, [PosixPath('checkpoints/pool.safetensors.yaml')])
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DestinationExistsError(f"{root} is not a folder; --tree takes the checkpoint tree's root.")
    sources = sorted(p for p in root.rglob("*.pt") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not sources:
        raise CheckpointError(f"{root}: no .pt files under it; nothing to convert.")
    items = [TreeItem(p, p.with_suffix(".safetensors")) for p in sources]
    groups = _place_models(items, root)
    unplaced = _place_heads(items, groups)
    _refuse_duplicates(items)
    configs = ({next(iter(groups)): root / _TREE_CONFIG} if len(groups) == 1
               else {g: g / _TREE_CONFIG for g in sorted(groups)})
    existing = _existing_destinations(items, force)
    existing += [str(config) for config in configs.values() if _config_in_the_way(config, force)]
    if existing:
        raise DestinationExistsError(
            f"refusing to overwrite {len(existing)} existing file(s) that this tree's conversion "
            f"would write: {', '.join(existing)}. Nothing was written. Pass --force to replace them.")
    return TreePlan(root, items, configs, unplaced)


def _place_models(items: list[TreeItem], root: Path) -> set[Path]:
    """Give ``zeroshot.pt`` and ``<Task>/finetuned.pt`` their group, role and name; the groups found."""
    groups: set[Path] = set()
    for item in items:
        if item.source.name == "zeroshot.pt":
            item.group, item.role, item.name = item.source.parent, "model", "_pretrained_"
        elif item.source.name == "finetuned.pt" and item.source.parent != root:
            item.group, item.role, item.name = item.source.parent.parent, "model", item.source.parent.name.lower()
        if item.group is not None:
            groups.add(item.group)
    return groups


def _place_heads(items: list[TreeItem], groups: set[Path]) -> list[Path]:
    """Give ``head_<Task>.pt`` its group (its folder's, or the single group below it), role and
    name; the files left named in no config."""
    unplaced: list[Path] = []
    for item in items:
        stem = item.source.stem
        if item.role is None and stem.startswith("head_") and len(stem) > 5:
            group = item.source.parent
            if group not in groups:
                below = [g for g in groups if g.parent == group]
                group = below[0] if len(below) == 1 else None
            if group is not None:
                item.group, item.role, item.name = group, "head", stem[5:].lower()
        if item.role is None:
            unplaced.append(item.source)
    return unplaced


def _refuse_duplicates(items: list[TreeItem]) -> None:
    """CheckpointError when two files would get the same role and name in one group."""
    seen: dict[tuple[Path, str, str], Path] = {}
    for item in items:
        if item.role is None:
            continue
        key = (item.group, item.role, item.name)
        if key in seen:
            raise CheckpointError(f"{item.source} and {seen[key]} would both be {item.role} {item.name!r} "
                                  f"of {item.group}; rename one of them.")
        seen[key] = item.source


def _existing_destinations(items: list[TreeItem], force: bool) -> list[str]:
    """The destinations a conversion would replace, each with how it differs; those converted
    earlier from the same source bytes, or holding the very tensors, are marked up to date instead."""
    existing: list[str] = []
    for item in items:
        if item.destination.exists():
            item.sha256 = sha256_file(item.source)
            if stored_source_sha(item.destination) == item.sha256:
                item.up_to_date = True
            elif not force:
                difference = _planned_difference(item)
                if difference is None:
                    item.up_to_date = True  # holds the very tensors: kept, reported "same tensors"
                else:
                    existing.append(f"{item.destination} ({difference})")
    return existing


def _config_in_the_way(config: Path, force: bool) -> bool:
    """Whether writing ``config`` would replace a file this command did not write."""
    return config.exists() and not force and not config.read_text(errors="replace").startswith(_CONFIG_HEADER)


def _planned_difference(item: TreeItem) -> str | None:
    """How an existing destination differs from what converting its source would write."""
    try:
        tensors, _, _ = conversion_payload(read_checkpoint(item.source, cache_dir=False))
    except PoolError:
        return "its source cannot be converted"  # convert_tree reports the source's own error
    return existing_difference(item.destination, tensors)


def convert_tree(plan: TreePlan, *, force: bool = False,
                 progress: Callable[[TreeItem], None] | None = None) -> tuple[list[ConvertResult], list[Path]]:
    """Convert every planned file; write the config(s) only if every file converted.

    Returns the per-file results and the configs written. A file that fails is recorded (status
    ``"failed"``, with its error) and the others go on; files the plan found up to date are read
    back and kept.

    Args:
        plan: what `plan_tree` returned.
        force: replace every destination, up to date or not.
        progress: called with each `TreeItem` before it is converted; None for silence.

    Returns:
        ``(results, configs)``: one `ConvertResult` per planned file, in order, and the config
        files written (none when a file failed).

    Raises:
        CheckpointError: a file named like an encoder (``zeroshot.pt``, ``finetuned.pt``) holds a
            head, or one named like a head holds an encoder; raised while writing the configs.

    Example:
        >>> from pool.convert import convert_tree, plan_tree
        >>> results, configs = convert_tree(plan_tree("checkpoints/"))  # doctest: +SKIP
        >>> [r.status for r in results if not r.ok]  # doctest: +SKIP
        []
    """
    results: list[ConvertResult] = []
    for item in plan.items:
        if progress:
            progress(item)
        try:
            res = convert_file(item.source, item.destination, force=force,
                               source_sha256=item.sha256 or None, keep_current=item.up_to_date)
        except PoolError as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            res = ConvertResult(item.source, item.destination, ok=False, status="failed", error=message)
        results.append(res)
    if not all(r.ok for r in results):
        return results, []
    by_source = {r.source: r for r in results}
    written = []
    for group, config in plan.configs.items():
        members = [i for i in plan.items if i.group == group and i.role]
        _write_config(config, group, members, by_source)
        written.append(config)
    return results, written


def _model_entry(res: ConvertResult) -> dict[str, Any]:
    """A model's entry in the tree's config."""
    entry: dict[str, Any] = {"state_dict_path": str(res.destination.absolute())}
    if res.model_name:
        entry["model_name"] = res.model_name
    if res.quick_gelu is not None and res.quick_gelu != default_quick_gelu(res.model_name):
        # Said in the config too: a kept file written by another tool may lack our metadata.
        entry["quick_gelu"] = res.quick_gelu
    return entry


def _write_config(config: Path, group: Path, members: Iterable[TreeItem], by_source: dict[Path, ConvertResult]) -> None:
    """Write one group's pool config (atomically), checking each file holds what its name says."""
    members = list(members)
    models: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    for item in sorted(members, key=lambda i: (i.name != "_pretrained_", i.name or "")):
        res = by_source[item.source]
        if item.role == "model":
            if res.kind != "encoder":
                raise CheckpointError(f"{item.source}: named like an encoder but holds a {res.kind}")
            models[item.name] = _model_entry(res)
        else:
            if res.kind != "head":
                raise CheckpointError(f"{item.source}: named like a head but holds a {res.kind}")
            heads[item.name] = str(res.destination.absolute())
    body = OmegaConf.to_yaml(OmegaConf.create({"models": models, "classification_heads": heads}))
    text = (f"{_CONFIG_HEADER} from the .pt files under {group.absolute()}\n"
            "# safetensors copies, bit-identical tensors; `python -m pool verify` this file to check them.\n"
            + body)
    write_bytes_atomic(config, text.encode("utf-8"))  # shared like its files (`written_mode`)
