"""Weights into a meta-device model: the checkpoint's tensors become its parameters and buffers.

The model was built on the meta device (`pool.arch.build_clip`), so nothing is copied or
initialised; the tensors are checked to fit key for key and shape for shape first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import ArchitectureMismatchError, printable
from .keys import TEXT_SIDE_KEYS, key_mismatch

__all__ = ["assign"]


def assign(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Assign checkpoint tensors into a meta-device CLIP; drop text-side parts the file lacks.

    The tensors become the model's parameters and buffers as they are (not copied). Where no
    module loads its own way, they are set in one walk (what ``load_state_dict(assign=True)``
    does, without its walks); else torch's ``load_state_dict`` does it.

    Args:
        model: a CLIP built on the meta device (`pool.arch.build_clip`).
        sd: the weights under open_clip CLIP keys (`pool.keys.to_clip_keys`).
        source: how error messages name the weights (the file, usually).

    Returns:
        ``model``, its tensors those of ``sd``.

    Raises:
        ArchitectureMismatchError: the weights are not all floating point, or do not fit the
            model key for key and shape for shape.
    """
    modules, want = _drop_missing_text_side(model, sd)
    _check_floating_point(sd, source)
    plain = not any(_loads_its_own_way(m) for m in modules.values())
    if not plain:  # a module with state-dict hooks of its own: its state_dict() is what counts
        want = model.state_dict(keep_vars=True)
    problem = key_mismatch(sd, want, "the architecture")
    if problem:
        raise ArchitectureMismatchError(
            f"{source}: the weights do not fit the architecture: {problem}. Is this an open_clip ViT "
            "image encoder, and is model_name right?")
    if not plain:
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        _set_tensors(modules, want, sd)
    leftover = [f"{path}.{name}".lstrip(".") for path, m in modules.items()
                for name, t in (*m._parameters.items(), *m._buffers.items()) if t is not None and t.is_meta]
    if leftover:
        raise ArchitectureMismatchError(f"{source}: no weights for {leftover[:5]}")
    return model


def _drop_missing_text_side(model: nn.Module, sd: Mapping[str, torch.Tensor]
                            ) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Remove the text-side parts (`pool.keys.TEXT_SIDE_KEYS`) the file lacks; then `_walk`."""
    modules, want = _walk(model)
    for key in TEXT_SIDE_KEYS:
        if key in sd or key not in want:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner and not any(k.startswith(owner + ".") for k in sd):
            delattr(model, owner)  # e.g. no ln_final.* at all: drop the whole module
        else:
            del (model.get_submodule(owner) if owner else model)._parameters[leaf]
        modules, want = _walk(model)  # (rare: a file without some of the text side)
    return modules, want


def _check_floating_point(sd: Mapping[str, torch.Tensor], source: str) -> None:
    not_float = [k for k, t in sd.items() if not t.is_floating_point()]
    if not_float:
        raise ArchitectureMismatchError(
            f"{source}: the weights are not all floating point ({printable(not_float[0])} is "
            f"{sd[not_float[0]].dtype}); an image encoder's are. The file is damaged or holds something else.")


def _set_tensors(modules: Mapping[str, nn.Module], want: Mapping[str, torch.Tensor],
                 sd: Mapping[str, torch.Tensor]) -> None:
    """What ``load_state_dict(assign=True)`` does for plain modules, without its walks (the keys
    were matched already)."""
    for key, tensor in sd.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=want[key].requires_grad))
        else:
            setattr(module, leaf, tensor)  # a persistent buffer (key_mismatch matched the keys)


def _loads_its_own_way(module: nn.Module) -> bool:
    """Whether state_dict() or load_state_dict() would run code of the module's own (hooks, or an
    overridden ``_load_from_state_dict``); open_clip's ViT modules have none."""
    return bool(type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
                or type(module)._save_to_state_dict is not nn.Module._save_to_state_dict
                or module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks
                or module._state_dict_hooks or getattr(module, "_state_dict_pre_hooks", None))


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """The modules by path, and the tensors ``state_dict()`` would name (parameters and persistent
    buffers; for modules without state-dict hooks, which `assign` checks before relying on it)."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared submodule under each of its paths
    tensors: dict[str, torch.Tensor] = {}
    for path, module in modules.items():
        prefix = path + "." if path else ""
        for name, param in module._parameters.items():
            if param is not None:
                tensors[prefix + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[prefix + name] = buffer
    return modules, tensors
