"""What a conversion-cache entry holds besides tensors (`pool.cache`): a `Checkpoint`'s container,
root type, wrapper, key order, module records and globals, written as safetensors string metadata
and read back, checked, as untrusted input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cache_layout import CACHEABLE
from .containers.base import Checkpoint
from .records import ModuleInfo
from .unpickler import GlobalName

__all__ = ["checkpoint_metadata", "checkpoint_from"]

#: The prefix of every metadata key an entry carries.
_META = "pool.cache."
_META_KEYS = frozenset(f"{_META}{k}" for k in ("container", "root_type", "wrapper", "keys", "modules", "globals"))


# Module attributes are None, bools, ints, floats, strings and tuples of them (pool.records): a JSON
# array can only be a tuple, so tuples are written as arrays and every array read back is a tuple.
def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if type(value) is list else value


def _order(keys: list[str]) -> list[int]:
    """The key order as positions in the sorted keys (an entry stores its tensors sorted)."""
    rank = {key: i for i, key in enumerate(sorted(keys))}
    return [rank[key] for key in keys]


def checkpoint_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """What ``ckpt`` carries besides tensors, as an entry's string metadata.

    Args:
        ckpt: the checkpoint read from the source.

    Returns:
        ``pool.cache.*`` keys: container, root type, wrapper, key order, module records, globals.
    """
    kinds: dict[str, int] = {}  # the distinct (class, attributes): a ViT's blocks repeat a few of them
    paths = {}
    for path, info in ckpt.modules.items():
        kind = json.dumps([info.type, info.attributes], separators=(",", ":"))
        paths[path] = kinds.setdefault(kind, len(kinds))
    modules = {"kinds": [json.loads(kind) for kind in kinds], "paths": paths}
    return {
        f"{_META}container": ckpt.container,
        f"{_META}root_type": ckpt.root_type,
        f"{_META}wrapper": ckpt.wrapper or "",
        f"{_META}keys": json.dumps(_order(list(ckpt.state_dict)), separators=(",", ":")),  # safetensors sorts them
        f"{_META}modules": json.dumps(modules, separators=(",", ":")),
        f"{_META}globals": json.dumps([[g.module, g.name, g.unsafe] for g in ckpt.globals], separators=(",", ":")),
    }


def checkpoint_from(entry: Checkpoint, path: Path) -> Checkpoint:
    """The checkpoint an entry holds, labelled with the path the caller gave.

    Args:
        entry: the entry as read (its tensors and metadata).
        path: the path that labels the checkpoint.

    Returns:
        The `Checkpoint`, ``cache_entry`` naming the entry.

    Raises:
        ValueError: (or any other exception: the entry is untrusted input) it is not what
            `checkpoint_metadata` wrote.
    """
    meta = entry.metadata
    if set(meta) != _META_KEYS or meta[f"{_META}container"] not in CACHEABLE:
        raise ValueError(f"its metadata is not a cache entry's ({sorted(meta)[:8]})")
    table = json.loads(meta[f"{_META}modules"])
    kinds = [(str(kind), {str(name): _tuples(value) for name, value in attributes.items()})
             for kind, attributes in table["kinds"]]
    modules = {}
    for name, i in table["paths"].items():
        kind, attributes = kinds[i]
        modules[str(name)] = ModuleInfo(kind, dict(attributes))
    found = [GlobalName(str(m), str(n), bool(u)) for m, n, u in json.loads(meta[f"{_META}globals"])]
    if any(g.unsafe for g in found):
        raise ValueError("it lists an unsafe global")
    tensors = entry.state_dict
    ranks = sorted(tensors)
    order = json.loads(meta[f"{_META}keys"])
    if not isinstance(order, list) or sorted(order) != list(range(len(ranks))):
        raise ValueError("its key order does not match its tensors")
    return Checkpoint(path, meta[f"{_META}container"], {ranks[i]: tensors[ranks[i]] for i in order},
                      meta[f"{_META}root_type"],
                      modules=modules, globals=found, wrapper=meta[f"{_META}wrapper"] or None,
                      cache_entry=entry.path)
