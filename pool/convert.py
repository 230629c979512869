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
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arch import default_quick_gelu, name_for_arch
from .checkpoint import Checkpoint, read_checkpoint
from .containers.hf_folder import CONFIG, is_hf_folder, weights_file
from .errors import CheckpointError, DestinationExistsError, PoolError
from .keys import checkpoint_kind as _kind_of
from .modeling import ClassificationHead, ImageEncoder
from .saving import module_payload
from .writer import compare_tensors, tensor_difference, write_checked

__all__ = ["ConvertResult", "DestinationExistsError", "TreePlan", "convert_file", "convert_to_hf", "plan_tree",
           "convert_tree", "sha256_file", "checkpoint_kind"]

log = logging.getLogger(__name__)

TREE_CONFIG = "pool.safetensors.yaml"
_CONFIG_HEADER = "# written by `openclip-pool convert --tree`"


@dataclass
class ConvertResult:
    """What one conversion did (``convert`` prints it; ``as_dict`` is its JSON form).

    Attributes:
        source: the checkpoint converted.
        destination: the safetensors file.
        kind: ``"encoder"`` or ``"head"`` (empty when the conversion failed before telling).
        ok: whether the destination now holds the source's tensors.
        status: ``"converted"``, ``"up to date"``, ``"same tensors"`` or ``"failed"``.
        error: why it failed, or None.
        model_name: an encoder's open_clip name (None for a custom ViT).
        architecture: an encoder's description, or a head's ``<classes> classes x <dim>``.
        quick_gelu: an encoder's activation, as recorded in the file's metadata.
        normalize: a head's ``normalize`` flag.
        classes: a head's classes.
        tensors: the tensors written (or found).
        bytes: the destination's size.
        source_sha256: the source's sha256, recorded in the destination's metadata.
        seconds: how long the conversion took.
    """

    source: Path
    destination: Path
    kind: str = ""
    ok: bool = False
    status: str = ""  # "converted", "up to date", "same tensors", "failed"
    error: str | None = None
    model_name: str | None = None
    architecture: str | None = None
    quick_gelu: bool | None = None
    normalize: bool | None = None
    classes: int | None = None
    tensors: int = 0
    bytes: int = 0
    source_sha256: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every field, paths as strings.

        Returns:
            A new dict of the fields.
        """
        out = dict(self.__dict__)
        out["source"], out["destination"] = str(self.source), str(self.destination)
        return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read ``chunk`` bytes at a time (of a transformers model
    folder: of its config.json then its weights file).

    Args:
        path: the file, or a transformers model folder.
        chunk: bytes per read (default 1 MiB).

    Returns:
        The hex digest.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` when it does not exist).
        CorruptCheckpointError: a transformers folder holds only a sharded model.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     sha256_file(f.name)[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    folder = Path(path)
    # a transformers folder: its config and its weights file, in that order
    files = [folder / CONFIG, weights_file(folder)] if is_hf_folder(folder) else [folder]
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_kind(ckpt: Checkpoint) -> str:
    """``encoder``, ``head`` or ``unknown``: `pool.keys.checkpoint_kind` of the file's tensors.

    Args:
        ckpt: a checkpoint read with `pool.checkpoint.read_checkpoint`.

    Returns:
        ``"encoder"``, ``"head"`` or ``"unknown"``.

    Example:
        >>> from pool.checkpoint import read_checkpoint
        >>> checkpoint_kind(read_checkpoint("head_Cars.pt"))  # doctest: +SKIP
        'head'
    """
    return _kind_of(ckpt.state_dict)


def _encoder_payload(ckpt: Checkpoint, model_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertResult]:
    encoder = ImageEncoder.from_checkpoint(ckpt, model_name=model_name)
    arch = encoder.arch
    res = ConvertResult(ckpt.path, ckpt.path, "encoder", model_name=name_for_arch(arch),
                        architecture=arch.describe(), quick_gelu=arch.quick_gelu)
    return *module_payload(encoder), res


def _head_payload(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertResult]:
    head = ClassificationHead.from_checkpoint(ckpt)  # validates shapes, resolves normalize
    classes, dim = (int(x) for x in head.weight.shape)
    res = ConvertResult(ckpt.path, ckpt.path, "head", normalize=head.normalize, classes=classes,
                        architecture=f"{classes} classes x {dim}")
    return *module_payload(head), res


def convert_file(source: str | Path, destination: str | Path, *, force: bool = False,
                 model_name: str | None = None, source_sha256: str | None = None,
                 keep_current: bool = False) -> ConvertResult:
    """Convert one checkpoint (encoder or head) to safetensors; see the module docstring.

    ``keep_current``: an existing destination converted earlier from the same source bytes (its
    ``pool.source_sha256``) is read back and compared instead of rewritten (status "up to date");
    one that holds exactly the tensors this conversion would write is kept too ("same tensors");
    any other raises DestinationExistsError.

    Args:
        source: the checkpoint to convert (any container; ``~`` is expanded). It is read with
            the restricted reader and never written to.
        destination: the safetensors file to write; its folder must exist.
        force: replace an existing destination.
        model_name: an open_clip name to check an encoder's weights against; None infers the
            architecture from them.
        source_sha256: the source's sha256 when already known (`plan_tree` computes it); None
            computes it.
        keep_current: keep an existing destination that already holds the source's tensors,
            as described above.

    Returns:
        The `ConvertResult`, ``ok`` True and ``status`` ``"converted"``, ``"up to date"`` or
        ``"same tensors"``.

    Raises:
        DestinationExistsError: the destination exists (without ``force``, or with
            ``keep_current`` but other tensors), is a directory or the source itself, or its
            folder does not exist.
        CheckpointNotFoundError: the source does not exist.
        UnsafeCheckpointError: the source names a global that could run code.
        CorruptCheckpointError: the source is damaged, or the file written (or kept) does not
            read back bit for bit as meant (nothing is replaced).
        CheckpointError: the source is neither an image encoder nor a classification head, or
            cannot be used otherwise.
        ArchitectureMismatchError: an encoder's weights are no ViT image tower this loader
            builds, or not the one ``model_name`` names; a head's tensors are inconsistent.
        ConfigError: ``model_name`` is no open_clip ViT config this loader can build.

    Example:
        >>> from pool.convert import convert_file
        >>> result = convert_file("ViT-B-32/Cars/finetuned.pt", "cars.safetensors")  # doctest: +SKIP
        >>> result.status, result.kind, result.model_name  # doctest: +SKIP
        ('converted', 'encoder', 'ViT-B-32')
    """

    from . import __version__

    start = time.perf_counter()
    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    if dst.is_dir():
        raise DestinationExistsError(f"{dst} is a directory; give the destination file name.")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise DestinationExistsError(f"{dst} is the source itself; the source is never overwritten.")
    if dst.exists() and not force and not keep_current:
        raise DestinationExistsError(
            f"{dst} exists; refusing to overwrite it. Pass --force to replace it, or choose another "
            "destination.")
    if not dst.parent.is_dir():
        raise DestinationExistsError(f"{dst.parent} is not an existing folder; create it first.")
    ckpt = read_checkpoint(src, cache_dir=False)
    digest = source_sha256 or sha256_file(src)
    tensors, meta, res = _payload(ckpt, model_name)
    meta.update({"format": "pt", "pool.source_sha256": digest, "pool.source_name": src.name,
                 "pool.source_container": ckpt.container, "pool.writer": f"openclip-pool {__version__}"})
    res.source, res.destination, res.source_sha256 = src, dst, digest
    res.tensors = len(tensors)
    if dst.exists() and not force:
        if _stored_source_sha(dst) == digest:
            compare_tensors(read_checkpoint(dst, mmap=False, cache_dir=False).state_dict, tensors,
                            f"{dst} (converted earlier from {src}; pass --force to rewrite it)")
            res.status = "up to date"
        else:
            difference = _existing_difference(dst, tensors)
            if difference is not None:
                raise DestinationExistsError(
                    f"{dst} exists and does not hold {src}'s tensors ({difference}); refusing to "
                    "overwrite it. Pass --force to replace it.")
            res.status = "same tensors"
        res.ok, res.bytes = True, dst.stat().st_size
        res.seconds = time.perf_counter() - start
        return res
    res.bytes = write_checked(tensors, meta, dst)
    res.ok, res.status = True, "converted"
    res.seconds = time.perf_counter() - start
    log.info("converted %s -> %s (%d tensors) in %.3f s", src, dst, res.tensors, res.seconds)
    return res


def convert_to_hf(source: str | Path, destination: str | Path, *, force: bool = False,
                  model_name: str | None = None) -> ConvertResult:
    """Write an encoder checkpoint (any form pool reads) as a transformers
    ``CLIPVisionModelWithProjection`` folder (`pool.hf.write_hf_folder`): ``config.json`` with
    the activation (``quick_gelu`` for OpenAI-derived weights), ``model.safetensors`` and
    ``preprocessor_config.json``. The weights are read back from the folder by pool's own reader
    and compared bit for bit with the encoder's; the source is never modified.

    Args:
        source: an encoder checkpoint (a head has no transformers counterpart).
        destination: the folder to write (created; an existing non-empty folder needs ``force``).
        force: write into an existing, non-empty folder.
        model_name: an open_clip name to check the weights against.

    Returns:
        The `ConvertResult` (``kind="encoder"``, ``status="converted"``).

    Raises:
        DestinationExistsError: the destination is a file, or a non-empty folder without ``force``.
        CheckpointError: the source is no encoder, or cannot be read.
    """
    from .hf import to_hf, write_hf_folder
    from .keys import to_clip_keys

    start = time.perf_counter()
    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DestinationExistsError(f"{dst} is, holds or lies inside the source {src}; the source is never "
                                     "overwritten. Choose another folder.")
    if dst.exists() and not dst.is_dir():
        raise DestinationExistsError(f"{dst} is a file; --to hf writes a folder (config.json, model.safetensors, "
                                     "preprocessor_config.json). Give a folder name.")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise DestinationExistsError(f"{dst} exists and is not empty; refusing to write into it. Pass --force, "
                                     "or choose a new folder.")
    ckpt = read_checkpoint(src, cache_dir=False)
    digest = sha256_file(src)
    if checkpoint_kind(ckpt) != "encoder":
        raise CheckpointError(f"{src}: not an image encoder; only encoders have a transformers counterpart "
                              "(CLIPVisionModelWithProjection).")
    encoder = ImageEncoder.from_checkpoint(ckpt, model_name=model_name)
    write_hf_folder(encoder, dst)
    expected = to_hf(to_clip_keys(encoder.state_dict()))
    compare_tensors(read_checkpoint(dst / "model.safetensors", mmap=False, cache_dir=False).state_dict,
                    {k: v.detach().contiguous().cpu() for k, v in expected.items()}, str(dst / "model.safetensors"))
    arch = encoder.arch
    res = ConvertResult(src, dst, "encoder", ok=True, status="converted", model_name=name_for_arch(arch),
                        architecture=arch.describe(), quick_gelu=arch.quick_gelu, tensors=len(expected),
                        bytes=sum(p.stat().st_size for p in dst.iterdir() if p.is_file()),
                        source_sha256=digest, seconds=time.perf_counter() - start)
    log.info("converted %s -> %s (transformers folder) in %.3f s", src, dst, res.seconds)
    return res


# -- trees ----------------------------------------------------------------------------------------
@dataclass
class TreeItem:
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


def _payload(ckpt: Checkpoint, model_name: str | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, str], ConvertResult]:
    """The tensors (contiguous, unshared), metadata and result a conversion of ``ckpt`` writes."""
    kind = checkpoint_kind(ckpt)
    if kind == "encoder":
        tensors, meta, res = _encoder_payload(ckpt, model_name)
    elif kind == "head":
        tensors, meta, res = _head_payload(ckpt)
    else:
        raise CheckpointError(
            f"{ckpt.path}: neither an image encoder (no visual.conv1.weight) nor a classification head "
            f"(weight [classes, dim] and bias); it holds {', '.join(list(ckpt.state_dict)[:5])} ... "
            "`python -m pool inspect` shows what it is.")
    return tensors, meta, res


def _existing_difference(destination: Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """None when ``destination`` already holds exactly ``tensors``, else how it differs."""
    try:
        held = read_checkpoint(destination, mmap=False, cache_dir=False).state_dict
    except PoolError as exc:
        return f"it cannot be read: {exc}"
    return tensor_difference(held, tensors)


def _stored_source_sha(path: Path) -> str | None:
    try:
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("pool.source_sha256")
    except Exception:  # noqa: BLE001 - not ours / unreadable: treated as a foreign file
        return None


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
    groups: set[Path] = set()
    for item in items:
        if item.source.name == "zeroshot.pt":
            item.group, item.role, item.name = item.source.parent, "model", "_pretrained_"
        elif item.source.name == "finetuned.pt" and item.source.parent != root:
            item.group, item.role, item.name = item.source.parent.parent, "model", item.source.parent.name.lower()
        if item.group is not None:
            groups.add(item.group)
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
    seen: dict[tuple[Path, str, str], Path] = {}
    for item in items:
        if item.role is None:
            continue
        key = (item.group, item.role, item.name)
        if key in seen:
            raise CheckpointError(f"{item.source} and {seen[key]} would both be {item.role} {item.name!r} "
                                  f"of {item.group}; rename one of them.")
        seen[key] = item.source
    configs = ({next(iter(groups)): root / TREE_CONFIG} if len(groups) == 1
               else {g: g / TREE_CONFIG for g in sorted(groups)})
    existing: list[str] = []
    for item in items:
        if item.destination.exists():
            item.sha256 = sha256_file(item.source)
            if _stored_source_sha(item.destination) == item.sha256:
                item.up_to_date = True
            elif not force:
                difference = _planned_difference(item)
                if difference is None:
                    item.up_to_date = True  # holds the very tensors: kept, reported "same tensors"
                else:
                    existing.append(f"{item.destination} ({difference})")
    for config in configs.values():
        if config.exists() and not force and not config.read_text(errors="replace").startswith(_CONFIG_HEADER):
            existing.append(str(config))
    if existing:
        raise DestinationExistsError(
            f"refusing to overwrite {len(existing)} existing file(s) that this tree's conversion "
            f"would write: {', '.join(existing)}. Nothing was written. Pass --force to replace them.")
    return TreePlan(root, items, configs, unplaced)


def _planned_difference(item: TreeItem) -> str | None:
    try:
        tensors, _, _ = _payload(read_checkpoint(item.source, cache_dir=False))
    except PoolError:
        return "its source cannot be converted"  # convert_tree reports the source's own error
    return _existing_difference(item.destination, tensors)


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
    entry: dict[str, Any] = {"state_dict_path": str(res.destination.absolute())}
    if res.model_name:
        entry["model_name"] = res.model_name
    if res.quick_gelu is not None and res.quick_gelu != default_quick_gelu(res.model_name):
        # Said in the config too: a kept file written by another tool may lack our metadata.
        entry["quick_gelu"] = res.quick_gelu
    return entry


def _write_config(config: Path, group: Path, members: Iterable[TreeItem], by_source: dict[Path, ConvertResult]) -> None:
    from omegaconf import OmegaConf

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
    fd, tmp = tempfile.mkstemp(dir=config.parent, prefix=f".{config.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, config)
