"""Split pool entries across processes: deterministic and balanced by file size.

`shard_units` assigns units (a model with its head, say) to ``world_size`` ranks: largest first,
each to the rank holding the fewest bytes so far (ties: the fewest units, then the lowest rank), so
every process computes the same split from the same config without talking to the others.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from .errors import ConfigError

__all__ = ["shard_units", "check_shard"]

U = TypeVar("U", bound=Hashable)


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Validate ``(rank, world_size)``.

    Args:
        shard: the pair to check.

    Returns:
        ``(rank, world_size)`` as integers.

    Raises:
        ConfigError: not two integers with ``0 <= rank < world_size``.
    """
    try:
        rank, world_size = shard
    except (TypeError, ValueError):
        raise ConfigError(f"shard {shard!r}: give (rank, world_size), e.g. (0, 2)") from None
    if not (type(rank) is int and type(world_size) is int and 0 <= rank < world_size):
        raise ConfigError(f"shard {shard!r}: need integers with 0 <= rank < world_size")
    return rank, world_size


def shard_units(units: Sequence[U], sizes: Sequence[int], rank: int, world_size: int) -> list[U]:
    """The units rank ``rank`` of ``world_size`` takes, in their original order.

    Args:
        units: what is split (kept together: pass a model and its head as one unit).
        sizes: each unit's bytes on disk (0 when unknown).
        rank, world_size: this process and the number of processes.

    Returns:
        This rank's units, in the order ``units`` has them.

    Example:
        >>> shard_units(["a", "b", "c", "d"], [40, 30, 20, 10], 0, 2), shard_units(["a", "b", "c", "d"], [40, 30, 20, 10], 1, 2)
        (['a', 'd'], ['b', 'c'])
    """
    rank, world_size = check_shard((rank, world_size))
    load, count = [0] * world_size, [0] * world_size
    owner: dict[int, int] = {}
    for index in sorted(range(len(units)), key=lambda i: (-sizes[i], i)):
        target = min(range(world_size), key=lambda r: (load[r], count[r], r))
        owner[index] = target
        load[target] += max(0, sizes[index])
        count[target] += 1
    return [unit for i, unit in enumerate(units) if owner[i] == rank]
