"""The last step of every load: a module in the asked dtype on the asked device, moved only if needed.

``dtype`` names are read here (``"bf16"``, ``"torch.float16"``, ...); a dict ``map_location``
placed each tensor when the file was read, so the module is then not moved as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["DType", "place_module"]

#: A ``torch.dtype``, a name of one (``"bf16"``, ``"float16"``, ``"torch.float32"``) or None.
DType = torch.dtype | str | None
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


def _resolve_dtype(dtype: DType) -> torch.dtype | None:
    """``"bf16"``, ``"torch.bfloat16"`` or a torch.dtype -> torch.dtype (None stays None).

    Args:
        dtype: a ``torch.dtype``, a name of one, or None.

    Returns:
        The ``torch.dtype``, or None for None.

    Raises:
        ConfigError: the name is no supported dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def place_module(module: nn.Module, device: Any, dtype: DType) -> nn.Module:
    """The module in ``dtype`` on ``device``.

    A dict ``map_location`` placed each tensor when the file was read: the module is then not
    moved as a whole. A module already there (the tensors were read onto the device in the right
    dtype) is left as it is, without ``Module.to``'s walk.

    Args:
        module: the module to place.
        device: where it goes; None, or a dict ``map_location``, leaves it where it is.
        dtype: a ``torch.dtype`` or a name (``"bf16"``, ``"float16"``, ``"torch.float32"``); None keeps the tensors' dtypes.

    Returns:
        The module (the same object: ``Module.to`` moves in place).

    Raises:
        ConfigError: ``dtype`` is not supported.
    """
    dt = _resolve_dtype(dtype)
    if isinstance(device, Mapping):
        device = None
    if (device is not None or dt is not None) and not _placed(module, device, dt):
        module = module.to(device=device, dtype=dt)
    return module


def _placed(module: nn.Module, device: Any, dtype: torch.dtype | None) -> bool:
    """Whether every parameter and buffer is on ``device`` already and, if floating point, of
    ``dtype`` (what ``Module.to(device, dtype)`` would leave unchanged)."""
    try:
        target = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        return False  # Module.to reports it
    if target is not None and target.index is None and target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())
    for tensor in (*module.parameters(), *module.buffers()):
        if target is not None and tensor.device != target:
            return False
        if dtype is not None and (tensor.is_floating_point() or tensor.is_complex()) and tensor.dtype != dtype:
            return False
    return True
