"""Task vectors: ``finetuned - pretrained`` over the tensors two encoders share.

One place opens a task vector (restricts both state dicts to the keys compared and checks they
line up key for key and shape for shape) for the pool (`OpenCLIPVisionModelPool.
load_pretrained_model_and_task_vectors`) and for verify (its L2 norm per fine-tuned model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .keys import key_mismatch, task_vector_pair

__all__ = ["PRETRAINED", "task_vector", "task_vector_norm"]

#: The pool's name for the pre-trained model, the base every task vector is taken against.
PRETRAINED = "_pretrained_"

State = Mapping[str, torch.Tensor]


def _aligned(finetuned: State, pretrained: State, refuse: Callable[[str], Exception]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The two state dicts a task vector is taken over, checked to line up.

    Args:
        finetuned: the fine-tuned encoder's state dict.
        pretrained: the ``_pretrained_`` encoder's state dict.
        refuse: builds the exception raised with the reason they do not line up (the pool and
            verify report it differently).

    Returns:
        ``(finetuned, pretrained)`` restricted to the keys compared (`pool.keys.task_vector_pair`).

    Raises:
        Exception: ``refuse(reason)`` when a key is missing on one side or a shape differs.
    """
    state, base = task_vector_pair(finetuned, pretrained)
    problem = key_mismatch(state, base, PRETRAINED)
    if problem:
        raise refuse(problem)
    return state, base


def task_vector(finetuned: State, pretrained: State, refuse: Callable[[str], Exception]
                ) -> dict[str, torch.Tensor]:
    """``finetuned - pretrained`` for every floating-point tensor; other tensors as ``finetuned`` has them.

    Args:
        finetuned: the fine-tuned encoder's state dict.
        pretrained: the ``_pretrained_`` encoder's state dict.
        refuse: builds the exception raised with the reason the two do not line up (a key missing
            on one side, a shape that differs); the pool and verify report it differently.

    Returns:
        The task vector, a state dict with the keys compared (`pool.keys.task_vector_pair`).

    Example:
        >>> print(task_vector({"w": torch.ones(2)}, {"w": torch.zeros(2)}, ValueError))
        {'w': tensor([1., 1.])}
    """
    state, base = _aligned(finetuned, pretrained, refuse)
    return {k: (v - base[k]) if v.is_floating_point() else v for k, v in state.items()}


def task_vector_norm(finetuned: State, pretrained: State, refuse: Callable[[str], Exception]
                     ) -> tuple[float, int]:
    """The L2 norm of the task vector without building it: each float tensor's norm is taken in
    float64 and the squares summed (so a bf16 model's norm does not overflow or round away).

    Args:
        finetuned, pretrained, refuse: as `task_vector`.

    Returns:
        ``(norm, tensors)``: the norm and how many floating-point tensors it covers.

    Example:
        >>> task_vector_norm({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, ValueError)
        (5.0, 1)
    """
    state, base = _aligned(finetuned, pretrained, refuse)
    total = 0.0
    count = 0
    with torch.no_grad():
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            diff = v - base[k].to(device=v.device, dtype=v.dtype)
            total += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            count += 1
    return math.sqrt(total), count
