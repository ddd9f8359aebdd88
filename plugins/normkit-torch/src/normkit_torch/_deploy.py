"""normkit modules in PyTorch's graph tools: torch.fx tracing and torch.ao.quantization's fusers.

Both look modules up by exact type (``type(m) is nn.BatchNorm2d``), so a normkit module meets
them as its torch.nn twin: a torch.nn module of the same configuration and mode holding the very
same Parameter and buffer objects (``torch_twin``; training it trains the normkit module).

torch.fx: a symbolic trace records a normkit module that has a twin (BatchNorm1d/2d/3d,
InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm) as one call of that twin, placed at
``<path>.torch_twin`` in the GraphModule (whose state_dict keys gain that level), so
``torch.fx.experimental.optimization.fuse`` and FX quantization (``prepare_fx``) treat it as
torch.nn's. Every other normkit module (SyncBatchNorm, the frozen and renorm modules, the scalers,
an uninitialized Lazy module, a batch norm with ``virtual_batch_size``) is a leaf at its own path:
the GraphModule calls the module itself.

Eager-mode fusion (``fuse_modules``, ``fuse_modules_qat``): ``register_fusers`` adds every
torch.nn pattern with a batch norm (conv-bn, conv-bn-relu, linear-bn, bn-relu, convtranspose-bn)
for normkit's BatchNorm1d/2d/3d to torch's fuser table, each fusing the twin; it runs when
``normkit_torch``'s batch-norm module is imported.

TorchScript: the modules without a torch.nn twin compile their forward to the ``scripted_*``
functions here (torch operators; the family modules compile to ``torch.nn.functional``):
frozen batch norm is torch's inference batch norm, batch renorm runs inference only (its
training step raises), the scalers apply their fitted statistics.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit_torch._twins import TO_TORCH, swap

__all__ = [
    "TraceableLazy",
    "torch_twin",
    "is_traced",
    "traced_call",
    "register_fusers",
    "scripted_frozen_batch_norm",
    "scripted_batch_renorm",
    "scripted_standardize",
    "scripted_min_max_scale",
]

TWIN_ATTRIBUTE = "torch_twin"


def torch_twin(module: nn.Module) -> nn.Module:
    """The torch.nn module of ``module``'s class, configuration and mode holding the same Parameters and buffers."""
    target = TO_TORCH.get(type(module))
    if target is None:
        raise TypeError(f"{type(module).__name__} has no torch.nn twin")
    if getattr(module, "virtual_batch_size", None) is not None:
        raise TypeError(
            f"{type(module).__name__}(virtual_batch_size={module.virtual_batch_size}) has no torch.nn twin: torch.nn "
            "has no ghost batch norm"
        )
    return swap(module, target)


def _has_twin(module: nn.Module) -> bool:
    """The module is of a class offering ``torch_twin`` (the family; not SyncBatchNorm, whose twin cannot
    synchronize on CPU, nor a user's subclass ``convert`` mixed in) and is initialized (a Lazy twin would
    materialize Parameters of its own)."""
    if type(module) not in TO_TORCH or not isinstance(getattr(type(module), TWIN_ATTRIBUTE, None), property):
        return False
    if getattr(module, "virtual_batch_size", None) is not None:  # ghost batch norm: torch.nn has none
        return False
    return not (isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params())


def is_traced(input: Any) -> bool:
    """True when ``input`` is a torch.fx Proxy: a symbolic trace is calling the module."""
    return isinstance(input, torch.fx.Proxy)


def traced_call(module: nn.Module, input: Any) -> Any:
    """Record ``module(input)`` in the running torch.fx trace as one ``call_module`` node (see the module docstring)."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if _has_twin(module):
        path = f"{path}.{TWIN_ATTRIBUTE}" if path else TWIN_ATTRIBUTE
    return tracer.create_proxy("call_module", path, (input,), {})


class TraceableLazy:
    """Mixed into the Lazy modules: torch.fx calls a module it traces through with its hooks, and the hook that
    infers the parameters cannot read a Proxy; it waits for real input, and the module records itself as a leaf
    (``traced_call``), as torch.nn's Lazy modules are leaves."""

    def _infer_parameters(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if any(isinstance(a, torch.fx.Proxy) for a in args):
            return None
        return super()._infer_parameters(module, args, kwargs)  # type: ignore[misc]


def _with_twins(fuser: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def fuse(is_qat: bool, *modules: nn.Module) -> nn.Module:
        ghost = [m for m in modules if getattr(m, "virtual_batch_size", None) is not None]
        if is_qat and ghost:
            raise TypeError(
                f"fuse_modules_qat: {type(ghost[0]).__name__}(virtual_batch_size={ghost[0].virtual_batch_size}) "
                "cannot be fused for quantization-aware training: torch's fused batch-norm modules have no ghost "
                "batch norm (fuse_modules in eval mode folds it, as inference does not use virtual batches)"
            )
        return fuser(is_qat, *(torch_twin(m) if _has_twin(m) else m for m in modules))

    fuse.__name__ = fuse.__qualname__ = getattr(fuser, "__name__", "fuse")
    fuse.__doc__ = f"torch's {fuse.__name__} on the torch.nn twins of normkit modules."
    return fuse


def register_fusers(normkit_types: dict[type, type]) -> None:
    """Add each torch fuser pattern holding a key of ``normkit_types`` (torch.nn class -> normkit class)
    with the normkit class in its place, fusing the twins; torch's own patterns are left as they are."""
    from torch.ao.quantization import fuser_method_mappings

    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, fuser in list(table.items()):
        if not any(t in normkit_types for t in pattern):
            continue
        ours = tuple(normkit_types.get(t, t) for t in pattern)
        table.setdefault(ours, _with_twins(fuser))


def _twin_property(self: nn.Module) -> nn.Module:
    try:
        return torch_twin(self)
    except TypeError as e:  # no twin: no such attribute (getattr(module, "torch_twin", None) is None)
        raise AttributeError(str(e)) from None


TWIN_PROPERTY = property(
    _twin_property,
    doc="The torch.nn twin of this module: same class, configuration and mode, the same Parameter and buffer "
    "objects (a new module on each access). What torch.fx graphs and torch's fusers hold in its place.",
)


# ---------------------------------------------------------------- TorchScript forwards of the twin-less modules


def scripted_frozen_batch_norm(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                               eps: float) -> Tensor:
    """FrozenBatchNorm* in TorchScript: torch's inference batch norm with the frozen values."""
    return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)


def scripted_batch_renorm(input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, training: bool) -> Tensor:
    """BatchRenorm* in TorchScript: inference with the running statistics; the training step is Python only."""
    if training:
        raise RuntimeError(
            "BatchRenorm: a TorchScript module runs inference only (call .eval() before scripting or running it); "
            "its training step (r and d from the renorm statistics) runs in Python"
        )
    return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)


def _feature_shape(ndim: int, axis: int) -> List[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _require_fitted(count: Tensor, owner: str) -> None:
    if int(count) == 0:
        raise RuntimeError(
            owner + " is not fitted: call .fit(data) before scripting, or load a state_dict saved after fitting"
        )


def scripted_standardize(x: Tensor, mean: Tensor, std: Tensor, axis: int, count: Tensor) -> Tensor:
    """Standardize in TorchScript: ``(x - mean) / std`` per feature along ``axis`` (a zero std counts as 1)."""
    _require_fitted(count, "Standardize")
    shape = _feature_shape(x.dim(), axis)
    std = torch.where(std == 0, torch.ones_like(std), std)
    return (x - mean.reshape(shape)) / std.reshape(shape)


def scripted_min_max_scale(x: Tensor, data_min: Tensor, data_max: Tensor, low: float, high: float, axis: int,
                           count: Tensor) -> Tensor:
    """MinMaxScale in TorchScript: ``low + (x - data_min) / (data_max - data_min) * (high - low)`` per feature
    (a constant feature maps to ``low``); without the eager path's power-of-two guard against overflow."""
    _require_fitted(count, "MinMaxScale")
    shape = _feature_shape(x.dim(), axis)
    width = data_max - data_min
    width = torch.where(width == 0, torch.ones_like(width), width)
    y = (x - data_min.reshape(shape)) / width.reshape(shape)
    if high - low != 1.0:
        y = y * (high - low)
    if low != 0.0:
        y = y + low
    return y
