"""Hugging Face hub ids -> local snapshot folders, from the local cache only (never the network).

A pool entry may name a model by hub id: ``hf://org/name``, ``hf://org/name@revision`` (a branch,
tag or commit hash) or a bare ``org/name``. The id is looked up in the local Hugging Face cache
with huggingface_hub's own lookup (`huggingface_hub.snapshot_download` with
``local_files_only=True``, which reads ``refs/`` and ``snapshots/`` and makes no request), in the
cache folder the environment names when the lookup runs: ``HF_HUB_CACHE``, else
``$HF_HOME/hub``, else huggingface_hub's default. Nothing is ever downloaded: a model missing
from the cache is a `CheckpointNotFoundError` that says how to fetch it on a connected machine.

A bare ``org/name`` is a hub id only when no such local path exists (`pool.entries` decides, at
use time) and its name does not end like a checkpoint file (``ViT-B-32/zeroshot.pt`` is a path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import CheckpointNotFoundError, ConfigError, UnreadableCheckpointError, printable

__all__ = ["HF_PREFIX", "OPEN_CLIP_WEIGHTS", "HubId", "parse_hub_id", "hub_cache_dir", "snapshot_folder", "model_path", "placeholder",
           "missing_hub_message"]

#: the prefix that always means the hub
HF_PREFIX = "hf://"
#: a bare ``org/name`` ending so is a checkpoint file's path, never a hub id
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl", ".pickle", ".tar", ".zip")


@dataclass(frozen=True)
class HubId:
    """A model's hub id, as an entry names it.

    Attributes:
        repo_id: ``org/name``.
        revision: a branch, tag or commit hash; None for the default branch (``main``).
        explicit: written with ``hf://`` (always the hub), not as a bare ``org/name``.
    """

    repo_id: str
    revision: str | None = None
    explicit: bool = True

    @property
    def text(self) -> str:
        """``hf://org/name`` or ``hf://org/name@revision``, as messages name it."""
        return f"{HF_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def _valid_repo_id(text: str) -> bool:
    """Whether ``text`` is ``org/name`` by huggingface_hub's own rules (one ``/``, allowed characters)."""
    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_hub_id(text: str) -> HubId | None:
    """The hub id a path string of an entry names, if any (nothing is looked up).

    Args:
        text: the entry's path string.

    Returns:
        A `HubId` for ``hf://org/name[@revision]``; for a bare ``org/name`` that could be a repo id
        (and does not end like a checkpoint file), one with ``explicit`` False (the caller prefers
        a local path of that name); None for anything else.

    Raises:
        ConfigError: ``hf://`` followed by no valid ``org/name`` or an empty revision.

    Example:
        >>> parse_hub_id("hf://tanganke/clip-vit-base-patch32_sun397@main")
        HubId(repo_id='tanganke/clip-vit-base-patch32_sun397', revision='main', explicit=True)
        >>> parse_hub_id("openai/clip-vit-base-patch32").explicit, parse_hub_id("ViT-B-32/zeroshot.pt")
        (False, None)
    """
    if text.startswith(HF_PREFIX):
        repo_id, at, revision = text[len(HF_PREFIX):].partition("@")
        if not _valid_repo_id(repo_id) or (at and not revision.strip()):
            raise ConfigError(f"{printable(text)!r} is no hub id: write hf://ORG/NAME or hf://ORG/NAME@REVISION "
                              "(a branch, tag or commit hash), as in hf://openai/clip-vit-base-patch32.")
        return HubId(repo_id, revision or None, explicit=True)
    if _valid_repo_id(text) and not text.lower().endswith(_FILE_SUFFIXES):
        return HubId(text, None, explicit=False)
    return None


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder, from the environment now (huggingface_hub reads it at import).

    Returns:
        ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default (``~/.cache/huggingface/hub``).
    """
    for variable, below in (("HF_HUB_CACHE", ""), ("HF_HOME", "hub")):
        value = os.environ.get(variable)
        if value:
            return Path(os.path.expandvars(value)).expanduser() / below
    return Path(constants.HF_HUB_CACHE)  # the library's default (computed at its import)


def snapshot_folder(hub: HubId, cache_dir: Path | None = None) -> Path:
    """The local snapshot folder of a hub id, from the cache only.

    Args:
        hub: the id.
        cache_dir: the cache folder (None: `hub_cache_dir`).

    Returns:
        ``<cache>/models--org--name/snapshots/<commit>`` (its files are links into ``blobs/``).

    Raises:
        CheckpointNotFoundError: the model or the revision is not in the cache (the message says
            where it looked, what the cache holds of that model, and how to fetch it).
        UnreadableCheckpointError: the cache cannot be read (no permission, an I/O error).
    """
    # lazy: huggingface_hub's download module imports its HTTP stack (~0.2 s); only hub entries need it
    from huggingface_hub import snapshot_download

    cache = cache_dir if cache_dir is not None else hub_cache_dir()
    try:
        folder = snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True)
    except FileNotFoundError as exc:  # LocalEntryNotFoundError (and IncompleteSnapshotError) are ones
        raise CheckpointNotFoundError(2, missing_hub_message(hub, cache, exc), hub.text) from None
    except OSError as exc:  # the cache's refs or snapshots cannot be read (permissions, I/O)
        raise UnreadableCheckpointError.from_os_error(f"{hub.text} in the Hugging Face cache {cache}", exc) from None
    return Path(folder)


#: open_clip's own files in a hub repo (``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``, ``timm/...``), newest first
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def model_path(snapshot: Path) -> Path:
    """What pool reads in a snapshot: open_clip's own weights file when the repo has one
    (`OPEN_CLIP_WEIGHTS`, open_clip's CLIP keys, read like any state dict: ``timm/`` repos hold
    timm's ``config.json`` and ``model.safetensors`` beside it, which are not transformers'),
    else the folder (a transformers model: ``config.json`` and its weights; reading it says what
    is missing otherwise).

    Args:
        snapshot: a snapshot folder (`snapshot_folder`).

    Returns:
        The weights file in it, or the folder.
    """
    for name in OPEN_CLIP_WEIGHTS:
        if (snapshot / name).is_file():
            return snapshot / name
    return snapshot


def placeholder(hub: HubId, cache_dir: Path) -> Path:
    """Where a missing model's snapshot would be: what a missing hub entry's path is (nothing is there).

    Args:
        hub: the id.
        cache_dir: the cache folder looked in.

    Returns:
        ``<cache>/models--org--name/snapshots/<revision or main>``.
    """
    from huggingface_hub.file_download import repo_folder_name  # lazy, as in snapshot_folder

    return cache_dir / repo_folder_name(repo_id=hub.repo_id, repo_type="model") / "snapshots" / (hub.revision or "main")


def _cached_revisions(hub: HubId, cache: Path) -> str:
    """What the cache holds of ``hub``'s model, by huggingface_hub's own scan."""
    from huggingface_hub import scan_cache_dir  # lazy, as in snapshot_folder
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return "that folder does not exist"
    repo = next((r for r in info.repos if r.repo_id == hub.repo_id and r.repo_type == "model"), None)
    if repo is None:
        return f"it holds no {hub.repo_id}"
    held = sorted(f"{r.commit_hash[:12]}" + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                  for r in repo.revisions)
    return (f"it holds {hub.repo_id} at {', '.join(held) or 'no complete revision'}, not at "
            f"{hub.revision or 'main'}")


def missing_hub_message(hub: HubId, cache: Path, exc: BaseException | None = None) -> str:
    """The message for a hub id the local cache lacks: where pool looked, and how to fetch it.

    Args:
        hub: the id.
        cache: the cache folder looked in.
        exc: huggingface_hub's error, when it gave a reason beyond "not cached" (an incomplete snapshot).

    Returns:
        The id, the cache folder, what it holds of that model, that pool never downloads, and the
        ``hf download`` / ``huggingface-cli download`` command to run on a connected machine.
    """
    from huggingface_hub.file_download import repo_folder_name  # lazy, as in snapshot_folder

    revision = f" --revision {hub.revision}" if hub.revision else ""
    incomplete = f" huggingface_hub says: {exc}" if type(exc).__name__ == "IncompleteSnapshotError" else ""
    folder = repo_folder_name(repo_id=hub.repo_id, repo_type="model")
    return (f"{hub.text} is not in the local Hugging Face cache {cache} ({_cached_revisions(hub, cache)}).{incomplete} "
            "pool reads hub models from that cache only and never downloads. On a machine with network "
            f"access run `hf download {hub.repo_id}{revision}` (or `huggingface-cli download {hub.repo_id}{revision}`), "
            f"then copy the folder {folder} of its cache (~/.cache/huggingface/hub by default) into {cache}, "
            "or set HF_HUB_CACHE (or HF_HOME) to a copy of that cache.")
