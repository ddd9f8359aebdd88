"""Swap torch.nn normalization modules for normkit's (``convert``) and back (``to_torch``).

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, the replacement keeps the very same
Parameter and buffer objects (an optimizer built before the swap keeps working), the device,
dtype, ``requires_grad`` and train/eval mode. Only modules of exactly a mapped class are swapped:
a user's subclass of ``nn.BatchNorm2d`` may change behaviour and is left alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normkit_torch import _batchnorm as bn
from normkit_torch import _instancenorm as inorm
from normkit_torch import _normalization as norm
from normkit_torch import _sync

__all__ = ["convert", "to_torch", "constructor_kwargs"]


def _pairs() -> list[tuple[type, type]]:
    pairs: list[tuple[type, type]] = [
        (nn.BatchNorm1d, bn.BatchNorm1d),
        (nn.BatchNorm2d, bn.BatchNorm2d),
        (nn.BatchNorm3d, bn.BatchNorm3d),
        (nn.LazyBatchNorm1d, bn.LazyBatchNorm1d),
        (nn.LazyBatchNorm2d, bn.LazyBatchNorm2d),
        (nn.LazyBatchNorm3d, bn.LazyBatchNorm3d),
        (nn.SyncBatchNorm, _sync.SyncBatchNorm),
        (nn.InstanceNorm1d, inorm.InstanceNorm1d),
        (nn.InstanceNorm2d, inorm.InstanceNorm2d),
        (nn.InstanceNorm3d, inorm.InstanceNorm3d),
        (nn.LazyInstanceNorm1d, inorm.LazyInstanceNorm1d),
        (nn.LazyInstanceNorm2d, inorm.LazyInstanceNorm2d),
        (nn.LazyInstanceNorm3d, inorm.LazyInstanceNorm3d),
        (nn.LayerNorm, norm.LayerNorm),
        (nn.GroupNorm, norm.GroupNorm),
    ]
    if hasattr(nn, "RMSNorm"):
        pairs.append((nn.RMSNorm, norm.RMSNorm))
    return pairs


TO_NORMKIT: dict[type, type] = dict(_pairs())
TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in _pairs()}


def constructor_kwargs(module: nn.Module) -> dict[str, Any]:
    """The arguments that rebuild ``module``'s configuration (not its values), for any mapped class."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.modules.batchnorm._NormBase):
        kwargs: dict[str, Any] = {
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "track_running_stats": module.track_running_stats,
        }
        if not isinstance(module, nn.modules.lazy.LazyModuleMixin):
            kwargs["num_features"] = module.num_features
    elif isinstance(module, nn.LayerNorm):
        kwargs = {"normalized_shape": module.normalized_shape, "eps": module.eps,
                  "elementwise_affine": module.elementwise_affine}
    elif isinstance(module, nn.GroupNorm):
        kwargs = {"num_groups": module.num_groups, "num_channels": module.num_channels, "eps": module.eps,
                  "affine": module.affine}
    elif isinstance(module, norm._RMSNormBase):
        return {"normalized_shape": module.normalized_shape, "eps": module.eps,
                "elementwise_affine": module.elementwise_affine}
    else:
        raise TypeError(f"no normkit/torch twin for {type(module).__name__}")
    affine = kwargs.get("affine", kwargs.get("elementwise_affine"))
    if affine and not bias:
        kwargs["bias"] = False  # only passed when needed: older torch has no bias= on every class
    return kwargs


def _swap(module: nn.Module, target: type) -> nn.Module:
    """A ``target`` module holding ``module``'s own parameters and buffers, in its mode."""
    new = target(**constructor_kwargs(module), device="meta")
    for store in ("_parameters", "_buffers"):
        old_items, new_items = getattr(module, store), getattr(new, store)
        if list(old_items) != list(new_items):
            raise RuntimeError(
                f"cannot convert {type(module).__name__} to {target.__name__}: "
                f"{store[1:]} {list(old_items)} != {list(new_items)}"
            )
        for name, value in old_items.items():
            new_items[name] = value
        if store == "_buffers":
            new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.train(module.training)
    reset = getattr(new, "_normkit_reset_kernels", None)
    if reset is not None:  # made on "meta": choose the kernels for the device of the moved tensors
        reset()
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    if hasattr(module, "process_group") and hasattr(new, "process_group"):  # SyncBatchNorm both ways
        new.process_group = module.process_group
    return new


def _replace(module: nn.Module, mapping: dict[type, type], seen: dict[int, nn.Module], path: str) -> nn.Module:
    if id(module) in seen:
        return seen[id(module)]
    target = mapping.get(type(module))
    if target is not None:
        out = _swap(module, target)
    else:
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = _replace(child, mapping, seen, f"{path}.{name}" if path else name)
        out = module
    seen[id(module)] = out
    return out


def convert(module: nn.Module) -> nn.Module:
    """Replace every torch.nn normalization module in ``module`` by its normkit twin, in place; return the model.

    Swapped: BatchNorm1d/2d/3d, SyncBatchNorm (-> ``normkit_torch.SyncBatchNorm``, same process
    group, synchronized on any backend), InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm and the
    Lazy variants. As with ``convert_sync_batchnorm``, a root that is itself a normalization
    module cannot be swapped in place: use the returned module.
    """
    return _replace(module, TO_NORMKIT, {}, "")


def to_torch(module: nn.Module) -> nn.Module:
    """Replace every normkit module in ``module`` by its torch.nn twin, in place; return the model.

    ``normkit_torch.SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm`` (same process group).
    ``normkit_torch.BatchNorm`` (any rank, local statistics) has no torch twin and is left as it is.
    """
    return _replace(module, TO_TORCH, {}, "")
