"""Frozen batch norm for fine-tuning: fixed statistics and affine, as buffers; ``freeze`` / ``unfreeze``.

    y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias      (always; no mode, no update)

torchvision's ``FrozenBatchNorm2d`` semantics, in 1, 2, 3 and any dimensions, with torch.nn's eps
default (1e-5) and the application step of the core (``normkit.normalize``: centred before scaling,
so float32 data at offset 1e4 keeps its accuracy). Buffers ``weight, bias, running_mean,
running_var`` have BatchNorm*d's names: a BatchNorm*d ``state_dict`` loads (``num_batches_tracked``
is accepted and dropped) and a frozen one loads into BatchNorm*d. Gradients reach the input only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from array_api_compat import torch as xp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit_torch import _batchnorm, _deploy

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "unfreeze",
    "is_batch_norm",
]


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine over input of any rank >= 2 (channels on axis 1)."""

    _dims: tuple[int, ...] = ()  # accepted input ranks; () means any rank >= 2
    if TYPE_CHECKING:  # not at run time: TorchScript cannot resolve these postponed (string) annotations
        weight: Tensor
        bias: Tensor
        running_mean: Tensor
        running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        if self._dims and input.dim() not in self._dims:
            wanted = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm*d checkpoint's counter: not state here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: torch's inference batch norm (normkit_torch._deploy)
            return _deploy.scripted_frozen_batch_norm(input, self.running_mean, self.running_var, self.weight,
                                                      self.bias, self.eps)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_input_dim(input)
        return normkit.normalize(
            input, self.running_mean.detach(), self.running_var.detach(), self.weight.detach(), self.bias.detach(),
            eps=self.eps, axis=1, xp=xp,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen ``BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``."""

    _dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen ``BatchNorm2d``: input ``(N, C, H, W)`` (torchvision's class, torch.nn's eps 1e-5)."""

    _dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen ``BatchNorm3d``: input ``(N, C, D, H, W)``."""

    _dims = (5,)


def is_batch_norm(module: nn.Module) -> bool:
    """True for every batch norm this package's tools handle: torch.nn's and normkit's ``_BatchNorm``
    subclasses (BatchNorm*d, SyncBatchNorm, BatchRenorm*d) and the frozen modules."""
    return isinstance(module, (_BatchNorm, FrozenBatchNorm))


def _dims_of(module: nn.Module) -> Optional[int]:
    for dims, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(module, cls):
            return dims
    return getattr(type(module), "_normkit_dims", None)  # BatchRenorm1d/2d/3d


_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d, None: FrozenBatchNorm}


def _frozen_twin(module: _BatchNorm, name: str) -> FrozenBatchNorm:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"freeze: {name} is an uninitialized lazy module; run one forward call first")
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"freeze: {name} ({type(module).__name__}) has no running statistics "
            "(track_running_stats=False); a frozen batch norm needs them"
        )
    rm, rv = module.running_mean, module.running_var
    frozen = _FROZEN[_dims_of(module)](module.num_features, eps=module.eps, device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        frozen.running_mean = rm.detach().clone()
        frozen.running_var = rv.detach().clone()
        w, b = module.weight, module.bias
        frozen.weight = w.detach().clone() if w is not None else torch.ones_like(rm)
        frozen.bias = b.detach().clone() if b is not None else torch.zeros_like(rm)
    frozen.train(module.training)
    return frozen


def _unfrozen_twin(module: FrozenBatchNorm) -> nn.Module:
    cls = {FrozenBatchNorm1d: "BatchNorm1d", FrozenBatchNorm2d: "BatchNorm2d", FrozenBatchNorm3d: "BatchNorm3d"}
    target = getattr(_batchnorm, cls.get(type(module), "BatchNorm"))
    rm = module.running_mean
    bn = target(module.num_features, eps=module.eps, device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        bn.weight = nn.Parameter(module.weight.detach().clone())
        bn.bias = nn.Parameter(module.bias.detach().clone())
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(module.running_var)
    bn.train(module.training)
    return bn


def _replace(model: nn.Module, convert: Any, select: Any, prefix: str, memo: dict) -> nn.Module:
    """``model`` with every module ``select`` picks replaced by ``convert(module, name)``; a module
    reachable from two places (two names, two parents) is converted once and every place gets the
    same new module."""
    if select(model):
        if id(model) not in memo:
            memo[id(model)] = convert(model, prefix or "model")
        return memo[id(model)]
    for name, child in list(model._modules.items()):  # not named_children(): it yields a shared child once
        if child is None:
            continue
        new = _replace(child, convert, select, f"{prefix}.{name}" if prefix else name, memo)
        if new is not child:
            setattr(model, name, new)
    return model


def _check_module(model: Any, owner: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch norm in ``model`` (in place) by its ``FrozenBatchNorm*d`` twin; returns the model.

    Values (running statistics, weight and bias; ones/zeros where the module has no affine),
    eps, device and dtype are kept. BatchNorm1d/2d/3d (torch.nn's, normkit's, BatchRenorm*d) become
    FrozenBatchNorm1d/2d/3d; SyncBatchNorm and normkit's any-rank ``BatchNorm`` become
    ``FrozenBatchNorm``. A root that is itself a batch norm is returned as its frozen twin. A
    batch norm without running statistics (``track_running_stats=False``) is an error. A batch norm
    registered at several places (two names, two parents) becomes one frozen module held by each.
    """
    _check_module(model, "freeze")
    return _replace(
        model, _frozen_twin, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, FrozenBatchNorm), "", {}
    )


def unfreeze(model: nn.Module) -> nn.Module:
    """Turn every ``FrozenBatchNorm*`` in ``model`` (in place) back into ``normkit_torch.BatchNorm*d``.

    The new modules have trainable ``weight``/``bias`` Parameters holding the frozen values, the same
    running statistics and eps, torch.nn's default momentum 0.1 and ``num_batches_tracked`` 0, and
    the frozen module's train/eval mode. Returns the model (or the new module for a frozen root).
    """
    _check_module(model, "unfreeze")
    return _replace(model, lambda m, _name: _unfrozen_twin(m), lambda m: isinstance(m, FrozenBatchNorm), "", {})
