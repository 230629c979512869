"""Tensors made only when asked for: what a transformers-layout checkpoint's fused q/k/v and
transposed projections are for a reader that takes one key at a time (the task-vector atlas), so
that a mapped file's tensors are not copied whole into private memory up front.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["Deferred", "DeferredTensors", "meta_tensors"]


class Deferred:
    """A tensor of known shape and dtype, made by ``make()`` each time it is asked for.

    Args:
        make: builds the tensor (a ``torch.cat`` of mapped parts, a transpose).
        shape: its shape.
        dtype: its dtype.
    """

    def __init__(self, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.make, self.shape, self.dtype = make, torch.Size(shape), dtype

    def meta(self) -> torch.Tensor:
        """A meta tensor of its shape and dtype (no memory)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class DeferredTensors(Mapping[str, torch.Tensor]):
    """A state dict whose `Deferred` values are made on each lookup (and not kept).

    Args:
        items: tensors or `Deferred` values by key.
    """

    def __init__(self, items: Mapping[str, torch.Tensor | Deferred]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._items[key]
        return value.make() if isinstance(value, Deferred) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every key's meta tensor (shape and dtype), nothing made."""
        return {k: v.meta() if isinstance(v, Deferred) else torch.empty(v.shape, dtype=v.dtype, device="meta")
                for k, v in self._items.items()}


def meta_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's shapes and dtypes as meta tensors, without making any `Deferred` value.

    Args:
        state: a state dict, or `DeferredTensors`.

    Returns:
        Meta tensors by key.
    """
    if isinstance(state, DeferredTensors):
        return state.meta()
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
