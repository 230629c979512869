"""``pool.lock``: what each entry of a pool was when someone approved it (``python -m pool lock``),
and the check that it still is (``verify --locked``, ``pytest --openclip-pool-locked``).

A lock file is JSON, indented, keys sorted, one object per entry under ``entries`` (keyed by the
entry's label), with nothing that changes between two runs over the same files (no time, no
version), so it diffs well and is byte-identical when written twice. Per entry: ``path`` (relative
to the lock file's folder when the file lies under it), ``form``, ``size``, ``sha256``,
``container``, ``architecture``, ``globals`` (every global the file names: the allowlist's
verdict on it) and ``tensors`` (their count and a sha256 over names, dtypes, shapes and bytes in sorted
key order: `tensors_digest`). The file's sha256 comes from verify's integrity pass
(`pool.integrity.check_integrity` with ``digest=True``), the rest from the entry's load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, LockMismatchError, printable
from .writer import write_bytes_atomic

__all__ = ["LOCK_NAME", "LOCK_SCHEMA", "LOCK_SCHEMA_VERSION", "PoolLock", "default_lock_path", "tensors_digest",
           "render_lock", "write_lock"]

LOCK_NAME = "pool.lock"
LOCK_SCHEMA = "openclip-pool/lock"
LOCK_SCHEMA_VERSION = 1

#: The fields compared, in the order a drift names them.
_FIELDS = ("path", "form", "size", "sha256", "container", "architecture", "globals", "tensors")
_SHORT = 12


def default_lock_path(config: str | Path) -> Path:
    """Where the lock file of a config lives by default: ``pool.lock`` beside it.

    Args:
        config: the pool config file.

    Returns:
        The lock file's path.
    """
    return Path(config).expanduser().absolute().parent / LOCK_NAME


def tensors_digest(module: torch.nn.Module) -> dict[str, Any]:
    """A digest of a module's tensors: sha256 over each name, dtype, shape and bytes, in sorted
    key order (the state dict's; tensors on an accelerator are copied to the CPU).

    Args:
        module: the loaded encoder or head.

    Returns:
        ``{"count": tensors, "sha256": hex digest}``.
    """
    state = module.state_dict()
    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        sha.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        flat = tensor.cpu().contiguous().reshape(-1)
        if flat.numel():
            sha.update(memoryview(flat.view(torch.uint8).numpy()))
    return {"count": len(state), "sha256": sha.hexdigest()}


def render_lock(config: str, entries: dict[str, dict[str, Any]]) -> str:
    """The lock file's text: stable (sorted keys, two-space indent, a final newline).

    Args:
        config: the config's file name (what the lock was written for).
        entries: each entry's record, by label.

    Returns:
        The JSON text.
    """
    data = {"schema": LOCK_SCHEMA, "schema_version": LOCK_SCHEMA_VERSION, "config": config, "entries": entries}
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def write_lock(path: Path, text: str) -> None:
    """Write the lock file atomically (`pool.writer.write_bytes_atomic`).

    Args:
        path: the lock file.
        text: its text (`render_lock`).
    """
    write_bytes_atomic(path, text.encode("ascii"))


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:_SHORT]
    return printable(json.dumps(value, sort_keys=True)) if not isinstance(value, str) else printable(value)


def _changes(locked: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between an entry's locked record and its record now, in words."""
    out = []
    for key in _FIELDS:
        old, new = locked.get(key), now.get(key)
        if old == new:
            continue
        if key == "tensors":
            old_t, new_t = old or {}, new or {}
            out.append(f"tensors digest changed ({old_t.get('count')} tensors {_short(old_t.get('sha256'))} -> "
                       f"{new_t.get('count')} tensors {_short(new_t.get('sha256'))})")
        elif key == "globals":
            before, after = dict(old or {}), dict(new or {})
            diff = sorted(f"+{n} ({v})" for n, v in after.items() if before.get(n) != v)
            diff += sorted(f"-{n}" for n in before if n not in after)
            out.append(f"globals changed ({', '.join(map(printable, diff))})")
        else:
            out.append(f"{key} changed ({_short(old)} -> {_short(new)})")
    return out


@dataclass
class PoolLock:
    """A lock file read back, and the checks against it.

    Attributes:
        path: the lock file.
        config: the config ``verify`` was given (named in the fix each message gives).
        entries: each locked entry's record, by label.
    """

    path: Path
    config: str
    entries: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, path: str | Path, config: str | Path) -> PoolLock:
        """Read a lock file.

        Args:
            path: the lock file.
            config: the pool config it is checked against.

        Returns:
            The `PoolLock`.

        Raises:
            ConfigError: the file is missing, no lock file of a version this pool reads, or was
                written for a config of another name.
        """
        p = Path(path).expanduser().absolute()
        fix = f"write it with `python -m pool lock {config}`"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"lock file not found: {p}; {fix} (--locked checks every entry against it).") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: not a readable lock file ({exc}); {fix}.") from None
        if not isinstance(data, dict) or data.get("schema") != LOCK_SCHEMA or \
                not isinstance(data.get("entries"), dict) or data.get("schema_version") != LOCK_SCHEMA_VERSION:
            raise ConfigError(f"{p}: not an openclip-pool lock file of version {LOCK_SCHEMA_VERSION}; {fix}.")
        name = Path(str(config)).name
        if data.get("config") not in (None, name):
            raise ConfigError(f"{p} was written for {printable(str(data['config']))}, not {name}: pass the lock "
                              f"of this config with --lock PATH, or {fix}.")
        return cls(p, str(config), data["entries"])

    @property
    def fix(self) -> str:
        """The command that approves the files as they are now."""
        return f"`python -m pool lock {self.config}`"

    def check(self, label: str, record: dict[str, Any]) -> None:
        """Check one entry's record now against its locked one.

        Args:
            label: the entry (``models.cars``).
            record: its record now (the fields `render_lock` writes).

        Raises:
            LockMismatchError: the entry is not in the lock, or its file or tensors drifted (every
                field that changed is named, with the fix).
        """
        locked = self.entries.get(label)
        if locked is None:
            raise LockMismatchError(f"{label} is in the config but not in the lock file {self.path}; if it is "
                                    f"meant, approve it with {self.fix}.")
        changes = _changes(locked, record)
        if changes:
            raise LockMismatchError(f"{label} drifted from the lock file {self.path}: {'; '.join(changes)}. If "
                                    f"the new file is meant, approve it with {self.fix}.")

    def orphans(self, labels: list[str]) -> list[tuple[str, LockMismatchError]]:
        """The locked entries the config no longer has, each with its failure.

        Args:
            labels: every entry label of the config.

        Returns:
            ``(label, error)`` per locked entry not in ``labels``, sorted.
        """
        known = set(labels)
        return [(label, LockMismatchError(
                    f"{printable(label)} is in the lock file {self.path} but not in the config; if it was "
                    f"removed on purpose, approve that with {self.fix}."))
                for label in sorted(self.entries) if label not in known]
