"""Synchronized batch norm on Keras's torch backend: ``normkit_torch.distributed``'s collectives, any feature axis.

Statistics: each rank's ``(count, mean, m2)`` (``local_moments``), ONE ``all_gather`` and Chan's
merge (``all_gather_moments``, as ``normkit_torch.SyncBatchNorm``). Normalization is an autograd
function whose backward, as one process on the concatenated batch, all-reduces two per-feature sums
over all positions of all ranks in ONE ``all_reduce``:

    grad_x = scale * dy - m * scale / n * (SUM(dy) + xhat * SUM(dy * xhat)),   scale = gamma / sqrt(var + eps)

``m`` is the mask (1 where a position counts; statistics ignore the others), ``n`` the global count.
``grad_gamma = sum(dy * xhat)`` and ``grad_beta = sum(dy)`` stay this rank's sums (DDP averages them,
as for ``torch.nn.SyncBatchNorm``). The process group is the world.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import normkit

__all__ = ["world_size", "global_moments", "normalize"]


def world_size() -> int:
    """The default process group's size; 1 where torch.distributed is unavailable or not initialized."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed(layer: str) -> Any:
    try:
        import normkit_torch.distributed as distributed
    except ImportError as error:
        raise RuntimeError(
            f"{layer}: synchronized=True on the torch backend with torch.distributed initialized (world size "
            f"{world_size()}) exchanges statistics through normkit-torch, which cannot be imported ({error}); "
            "install normkit-torch, or use synchronized=False for per-process statistics") from error
    return distributed


_AGREEMENTS: dict[str, dict] = {}  # layer description -> what its ranks last agreed on (agreed_moments' state)


def global_moments(x: torch.Tensor, *, axis: int, mask: Optional[torch.Tensor], layer: str) -> normkit.Moments:
    """Every rank's statistics merged (one all_gather); per-feature ``count``, no autograd history.

    The ranks first agree (``normkit_torch.distributed.agreed_moments``, inside the same all_gather; a
    layer's first call gathers the signature alone first): feature count, dtype and whether a backward
    follows differing between ranks raise ``SyncMismatchError`` on every rank, naming each rank's value."""
    distributed = _distributed(layer)
    axis = axis % x.ndim
    local = distributed.local_moments(x, axis=axis, mask=mask if x.numel() > 0 else None)
    sig = distributed.signature(x, axis=axis, weight=False, bias=False, running_stats=True, eps=0.0, momentum=None)
    total = distributed.agreed_moments(local, sig, state=_AGREEMENTS.setdefault(layer, {}), layer=layer)
    return normkit.Moments(count=total.count, mean=total.mean.detach(), m2=total.m2.detach())


def _feature_shape(x: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


class _SynchronizedNormalize(torch.autograd.Function):
    """``normalize(x)`` with global statistics; the backward all-reduces ``SUM(dy)`` and ``SUM(dy * xhat)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], total: normkit.Moments, eps: float, axis: int) -> torch.Tensor:
        var = total.var  # biased; 0 for a feature no rank has a value of
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mask, total.mean, invstd, total.count)
        ctx.axis = axis
        if x.numel() == 0:  # an empty rank still joins the backward's all_reduce
            return torch.empty_like(x)
        return normkit.normalize(x, total.mean, var, weight, bias, eps=eps, axis=axis)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        from normkit_torch.distributed import all_reduce_sums

        x, weight, mask, mean, invstd, count = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        axis, shape = ctx.axis, _feature_shape(x, ctx.axis)
        axes = [i for i in range(x.ndim) if i != axis]
        xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)  # centred first
        sum_dy, sum_dy_xhat = dy.sum(axes), (dy * xhat).sum(axes)  # zeros on an empty rank
        grad_x = None
        if need_x:  # the same on every rank (torch's rule), so every rank joins the all_reduce
            total_dy, total_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat)
            scale = invstd if weight is None else weight * invstd
            per_count = scale / count.clamp(min=1)  # count 0 only where the mask is 0 on every rank
            correction = (per_count * total_dy).reshape(shape) + xhat * (per_count * total_dy_xhat).reshape(shape)
            if mask is not None:
                correction = correction * (torch.unsqueeze(mask, axis) if mask.ndim < x.ndim else mask).to(x.dtype)
            grad_x = dy * scale.reshape(shape) - correction
        grad_weight = sum_dy_xhat if need_weight else None
        grad_bias = sum_dy if need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


def normalize(x: torch.Tensor, total: normkit.Moments, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              *, eps: float, axis: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x - mean) * gamma / sqrt(var + eps) + beta`` with ``global_moments``' statistics, gradients as one process."""
    return _SynchronizedNormalize.apply(x, weight, bias, mask, total, eps, axis % x.ndim)
