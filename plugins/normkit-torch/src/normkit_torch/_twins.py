"""Twins: each normkit module class and the torch.nn class with its arguments, parameters and buffers.

The modules that define normkit's classes register their pairs as they define them (``register``), so the
torch.fx/fuser support (``_deploy``) and ``convert``/``to_torch`` (``_convert``) read one table without
importing the classes. ``constructor_kwargs`` reads a module's configuration and ``swap`` rebuilds it as its
twin holding the very same Parameter and buffer objects. Imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import init
from torch.nn.parameter import Parameter

__all__ = ["TO_NORMKIT", "TO_TORCH", "register", "constructor_kwargs", "swap", "RMSNormBase"]

TO_NORMKIT: dict[type, type] = {}  # torch.nn class -> normkit class
TO_TORCH: dict[type, type] = {}  # normkit class -> torch.nn class


def register(pairs: dict[type, type]) -> None:
    """Record ``{torch.nn class: normkit class}`` pairs (called by the module that defines the normkit classes)."""
    TO_NORMKIT.update(pairs)
    TO_TORCH.update({ours: theirs for theirs, ours in pairs.items()})


if hasattr(nn, "RMSNorm"):
    RMSNormBase = nn.RMSNorm
else:  # torch < 2.4 has no nn.RMSNorm: the same arguments, parameters and repr, written out

    class RMSNormBase(nn.Module):  # type: ignore[no-redef]
        __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

        def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                     device=None, dtype=None) -> None:
            super().__init__()
            if isinstance(normalized_shape, int):
                normalized_shape = (normalized_shape,)
            self.normalized_shape = tuple(normalized_shape)
            self.eps = eps
            self.elementwise_affine = elementwise_affine
            if elementwise_affine:
                self.weight = Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("weight", None)
            self.reset_parameters()

        def reset_parameters(self) -> None:
            if self.elementwise_affine:
                init.ones_(self.weight)

        def extra_repr(self) -> str:
            return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


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
    elif isinstance(module, RMSNormBase):
        return {"normalized_shape": module.normalized_shape, "eps": module.eps,
                "elementwise_affine": module.elementwise_affine}
    else:
        raise TypeError(f"no normkit/torch twin for {type(module).__name__}")
    affine = kwargs.get("affine", kwargs.get("elementwise_affine"))
    if affine and not bias:
        kwargs["bias"] = False  # only passed when needed: older torch has no bias= on every class
    return kwargs


def swap(module: nn.Module, target: type) -> nn.Module:
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
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    if hasattr(module, "process_group") and hasattr(new, "process_group"):  # SyncBatchNorm both ways
        new.process_group = module.process_group
    return new
