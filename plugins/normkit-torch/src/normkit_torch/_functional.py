"""The normkit core bound to torch: the namespace is resolved once, here, never per call.

Every module of this package computes through these functions. ``batch_norm_train`` is the one
training-mode batch-norm entry point; a faster implementation (an analytic-backward
``torch.autograd.Function``) can replace it without touching the modules.

Passing ``xp=`` to the core skips its namespace lookup, so ``torch.compile(fullgraph=True)``
traces a forward without a graph break.

Kernels. The batch-norm modules may compute through a fused kernel instead of the core: the one
the ``normkit_kernel`` hook offers for ``(op, device, dtype, layout)`` (``resolve_kernel``), looked
up once per module and configuration and kept on the module, never per call. ``layout_of(x)`` is
the per-call key, cheap and free of graph breaks. The policy decides whether offered kernels are
used at all:

    NORMKIT_TORCH_KERNELS=core           # environment, read at import: always the generic core
    normkit_torch.set_kernel_policy("core")   # the same at run time ("auto" gives kernels back)

"core" is the reference path: every kernel is tested equal to it.
"""

from __future__ import annotations

from typing import Any, Optional

from normkit.plugin.kernels import KERNEL_POLICIES, KernelPolicy


import normkit
import torch
from array_api_compat import torch as xp
from torch import Tensor

__all__ = [
    "xp",
    "batch_norm_train",
    "update_running_stats",
    "batch_norm_eval",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "standardize",
    "min_max_scale",
    "is_compiling",
    "KERNEL_POLICIES",
    "set_kernel_policy",
    "get_kernel_policy",
    "kernels_enabled",
    "layout_of",
    "resolve_kernel",
    "SMALL_NUMEL",
    "LAYOUTS",
]

_POLICY = KernelPolicy("NORMKIT_TORCH_KERNELS")


def set_kernel_policy(policy: str) -> str:
    """Choose how the batch-norm modules compute; returns the previous policy.

    ``"auto"`` (default): the kernel the plugin hook offers for the input's device, dtype and
    layout, where one is offered (the generic core otherwise). ``"core"``: always the generic
    normkit core (the reference). Takes effect on the next forward call of every module; a
    compiled graph recompiles (the policy is guarded). Initial value: ``NORMKIT_TORCH_KERNELS``.
    """
    return _POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return _POLICY.value


def kernels_enabled() -> bool:
    """True when the policy lets modules use plugin kernels."""
    return _POLICY.value == "auto"


# inputs with at most this many elements are "small": per-call overhead decides there, not bandwidth
SMALL_NUMEL = 1 << 15


def layout_of(x: Tensor) -> str:
    """The layout key of a batch-norm input (channels on axis 1), cheap enough for every call.

    "small" (at most SMALL_NUMEL elements), "dense" (rank 2), "channels_last" (rank 4/5 stored
    channels innermost and not also plain contiguous), "contiguous" (rank >= 3, row-major) or
    "strided" (anything else). Only shape, rank and stride checks: no graph break under
    torch.compile (a shape-dependent answer is a guard).
    """
    if x.numel() <= SMALL_NUMEL:
        return "small"
    nd = x.dim()
    if nd == 2:
        return "dense"
    if x.is_contiguous():
        return "contiguous"
    if nd == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if nd == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "strided"


LAYOUTS = ("small", "dense", "contiguous", "channels_last", "strided")


def resolve_kernel(op: str, device: torch.device, dtype: torch.dtype, layout: str) -> Any:
    """The kernel the plugin hook offers for this configuration, or the core's function.

    ``op`` is ``"batch_norm_train"`` or ``"batch_norm_eval"``. Asks ``normkit.plugin.manager.kernel``
    (a pluggy call): call it once per configuration and keep the answer, never per forward call.
    """
    from normkit.plugin.manager import kernel

    found = kernel(op, xp, device, dtype, layout)
    if found is not None:
        return found
    return batch_norm_train if op == "batch_norm_train" else batch_norm_eval


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def batch_norm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, axis: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm along feature axis ``axis``: ``(y, mean, var_biased)``.

    ``y = (x - mean) / sqrt(var_biased + eps) * weight + bias`` in x's dtype; ``mean`` and
    ``var_biased`` have shape ``(C,)``, float32 for half-precision x (else x's dtype), and carry
    no autograd history. The caller folds them into its running statistics. This is the one
    training-mode entry point of the batch-norm modules, with the signature of
    ``normkit_torch._autograd.batch_norm_train`` so either can stand here.

    Through the core: with zero "running" statistics, ``momentum=1`` and ``correction=0`` its
    updated statistics are exactly the batch mean and biased variance.
    """
    c = x.shape[axis]
    zeros = torch.zeros(c, dtype=_compute_dtype(x.dtype), device=x.device)
    y, mean, var = normkit.batch_norm(
        x, zeros, zeros, weight, bias, training=True, momentum=1.0, eps=eps, axis=axis, correction=0, xp=xp
    )
    return y, mean, var


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var_biased: Tensor, count: int, momentum: Any
) -> None:
    """torch's update, in place: ``r <- (1 - m) * r + m * batch`` with the unbiased batch variance.

    ``lerp_`` is that update in one op per buffer (``r + m * (batch - r)``; at ``m = 1`` exactly the
    batch value). ``mean`` and ``var_biased`` carry no autograd history (the kernels' contract), so
    the buffers get none either.
    """
    unbiased = var_biased * (count / max(count - 1, 1))
    if mean.dtype != running_mean.dtype:
        mean = mean.to(running_mean.dtype)
    if unbiased.dtype != running_var.dtype:
        unbiased = unbiased.to(running_var.dtype)
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(unbiased, momentum)


def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    axis: int = 1,
) -> Tensor:
    """Inference-mode batch norm with the running statistics: one fused scale and shift per channel."""
    return normkit.batch_norm(
        x, running_mean, running_var, weight, bias, training=False, eps=eps, axis=axis, xp=xp
    ).output


def instance_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Instance norm over the spatial axes of ``(N, C, *spatial)``; running stats come back new."""
    return normkit.instance_norm(
        x, running_mean, running_var, weight, bias,
        use_input_stats=use_input_stats, momentum=momentum, eps=eps, axis=1, xp=xp,
    )


def layer_norm(x: Tensor, ndim: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm over the last ``ndim`` axes."""
    axes = tuple(range(x.ndim - ndim, x.ndim))
    return normkit.layer_norm(x, weight, bias, axis=axes, eps=eps, xp=xp)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Group norm with channels on axis 1."""
    return normkit.group_norm(x, num_groups, weight, bias, axis=1, eps=eps, xp=xp)


def rms_norm(x: Tensor, ndim: int, weight: Optional[Tensor], eps: Optional[float]) -> Tensor:
    """RMS norm over the last ``ndim`` axes; ``eps=None`` is the machine epsilon of the compute dtype."""
    axes = tuple(range(x.ndim - ndim, x.ndim))
    return normkit.rms_norm(x, weight, axis=axes, eps=eps, xp=xp)


def standardize(x: Tensor, mean: Tensor, std: Tensor, axis: int) -> Tensor:
    """``(x - mean) / std`` per feature along ``axis``."""
    return normkit.standardize(x, axis=axis, mean=mean, std=std, xp=xp)


def min_max_scale(
    x: Tensor, data_min: Tensor, data_max: Tensor, feature_range: tuple[float, float], axis: int
) -> Tensor:
    """Linear map of ``[data_min, data_max]`` onto ``feature_range`` per feature along ``axis``."""
    return normkit.min_max_scale(
        x, axis=axis, feature_range=feature_range, data_min=data_min, data_max=data_max, xp=xp
    )


def _is_compiling_fn() -> Any:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:  # torch < 2.3
        from torch._dynamo import is_compiling as fn
    return fn


_IS_COMPILING = _is_compiling_fn()


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces: value-dependent Python checks are skipped then."""
    return bool(_IS_COMPILING())
