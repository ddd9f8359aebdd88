"""torch's own kernels for the functional API: what ``normkit_kernel`` hands out for torch tensors.

Each function takes the normkit function's validated arguments (``normkit.batch_norm``,
``layer_norm``, ``group_norm``, ``instance_norm``, ``rms_norm``) and returns its result computed by
aten, or ``NotImplemented`` where the call falls outside aten's contract (a mask, a biased running
variance, one value per feature allowed, a feature axis aten cannot take without a copy, per-feature
tensors of another shape, dtype or device, a traced momentum...); the core computes then. They are
pure like the core: running statistics come back as new tensors (aten updates clones in place).

aten forms ``x * scale + shift`` rather than ``(x - mean) * scale``: in float32 at a data offset of
1e4 it is about 1e-3 off the float64 reference where the core is exact. Where aten is much worse
than that in float32/half, the kernel declines: training batch norm where aten's statistics sum the
batch naively (channels innermost: dense ``(N, C)`` for every C, 1 included, any input without a
spatial extent, channels_last; about one standard deviation off for 1e6 rows at mean 1e4; see
``_sums_naively``) and channels_last group norm (one-pass variance: hundreds of standard deviations
off at mean 1e4).

Each also names, as ``nn_functional``, the ``torch.nn.functional`` function over the same kernel:
what the modules' dispatch (``normkit_torch.functional``) calls where this kernel is chosen.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normkit import BatchNormResult

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]

_HALF = (torch.float16, torch.bfloat16)
_REFUSED = object()  # a per-feature argument aten cannot take as given


def _stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype aten (and the core) computes statistics in: float32 for half precision."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def _param(t: Any, shape: tuple, dtype: torch.dtype, x: Tensor) -> Any:
    """``t`` as aten takes it (None, or a tensor of ``shape`` on x's device, converted to ``dtype``), else _REFUSED."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.device != x.device or not t.is_floating_point():
        return _REFUSED
    return t if t.dtype == dtype else t.to(dtype)


def _stats(running_mean: Any, running_var: Any, c: int, dtype: torch.dtype, x: Tensor, update: bool) -> bool:
    """True when the running statistics are both None, or both ``(c,)`` tensors aten can use as they are.

    For an update they must already be in the statistics dtype (the result keeps theirs) and carry
    no autograd history (aten updates them in place).
    """
    if running_mean is None and running_var is None:
        return True
    for t in (running_mean, running_var):
        if not isinstance(t, Tensor) or _param(t, (c,), t.dtype, x) is _REFUSED:
            return False
        if update and (t.dtype != dtype or t.requires_grad):
            return False
    return True


def _momentum(momentum: Any, num_batches: Any) -> Optional[float]:
    """The update weight as a Python float (cumulative average: 1 / num_batches), or None when traced."""
    if momentum is None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, (int, float)) or num_batches <= 0:
            return None
        return 1.0 / num_batches
    return float(momentum) if isinstance(momentum, (int, float)) else None


def _channels_last(x: Tensor) -> bool:
    """x is stored channels innermost (4-d/5-d channels_last) rather than row-major."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def _sums_naively(xm: Tensor) -> bool:
    """aten's CPU batch-norm statistics run its channels-last kernel (a naive float32 sum over the batch: about
    one standard deviation off for 1e6 rows at mean 1e4) for a ``(N, C, *spatial)`` input whose reduction is
    over the outer axis: dense with no spatial extent (``(N, C)``, ``(N, 1)``, ``(N, C, 1, 1)``), or stored
    channels_last (4-d/5-d, C > 1). Contiguous input with a spatial extent (``(N, 1, L)`` included) and other
    strided views take its pairwise kernel."""
    spatial = 1
    for d in xm.shape[2:]:
        spatial = spatial * d
    return (spatial == 1 and xm.is_contiguous()) or _channels_last(xm)


def _trailing(axis: tuple[int, ...], ndim: int) -> bool:
    k = len(axis)
    return k > 0 and axis == tuple(range(ndim - k, ndim))


def batch_norm(
    x: Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, training: bool, momentum: Any,
    eps: float, axis: int, mask: Any = None, correction: float = 1, allow_single_value: bool = False,
    num_batches: Any = None, virtual_batch_size: Any = None,
) -> Any:
    """``normkit.batch_norm`` by ``torch.batch_norm``; features on axis 1, or last of a 4-d/5-d input (channels_last).
    aten has no ghost batch norm: ``virtual_batch_size`` (given only when it splits a training batch) declines."""
    ndim = x.dim()
    if virtual_batch_size is not None or mask is not None or not (axis == 1 or (ndim in (4, 5) and axis == ndim - 1)):
        return NotImplemented
    c = x.shape[axis]
    dtype = _stats_dtype(x)
    w, b = _param(weight, (c,), dtype, x), _param(bias, (c,), dtype, x)
    if w is _REFUSED or b is _REFUSED:
        return NotImplemented
    update = training and running_mean is not None
    if not _stats(running_mean, running_var, c, dtype, x, update):
        return NotImplemented
    factor, stats = 0.0, (running_mean, running_var)
    xm = x if axis == 1 else x.movedim(axis, 1)
    if training:
        if x.numel() // max(c, 1) <= 1:  # one value per feature: the core raises, or returns bias
            return NotImplemented
        if x.dtype != torch.float64 and _sums_naively(xm):
            return NotImplemented  # aten's channels-innermost statistics: naive float32 sums
        if update:
            factor = _momentum(momentum, num_batches)
            if factor is None or correction != 1:
                return NotImplemented
            stats = (running_mean.clone(), running_var.clone())
    elif dtype != running_mean.dtype:
        stats = (running_mean.to(dtype), running_var.to(dtype))
    y = torch.batch_norm(xm, w, b, stats[0], stats[1], training, factor, eps, torch.backends.cudnn.enabled)
    if axis != 1:
        y = y.movedim(1, axis)
    if update:
        return BatchNormResult(y, *stats)
    return BatchNormResult(y, None, None) if training else BatchNormResult(y, running_mean, running_var)


def layer_norm(x: Tensor, weight: Any, bias: Any, *, axis: tuple[int, ...], eps: float) -> Any:
    """``normkit.layer_norm`` by ``torch.layer_norm`` when the normalized axes are the trailing ones."""
    if not _trailing(axis, x.dim()) or x.numel() == 0:
        return NotImplemented
    shape = tuple(x.shape[axis[0]:])
    dtype = _stats_dtype(x)
    w, b = _param(weight, shape, dtype, x), _param(bias, shape, dtype, x)
    if w is _REFUSED or b is _REFUSED:
        return NotImplemented
    return torch.layer_norm(x, shape, w, b, eps, torch.backends.cudnn.enabled)


def group_norm(x: Tensor, num_groups: int, weight: Any, bias: Any, *, axis: int, eps: float) -> Any:
    """``normkit.group_norm`` by ``torch.group_norm``; channels on axis 1 or last (moved to 1, no copy)."""
    if axis not in (1, x.dim() - 1) or x.numel() == 0:
        return NotImplemented
    c = x.shape[axis]
    dtype = _stats_dtype(x)
    w, b = _param(weight, (c,), dtype, x), _param(bias, (c,), dtype, x)
    if w is _REFUSED or b is _REFUSED:
        return NotImplemented
    xm = x if axis == 1 else x.movedim(axis, 1)
    if x.dtype != torch.float64 and _channels_last(xm):
        return NotImplemented  # aten's channels-last group norm: one-pass variance, no digits left at mean 1e4
    y = torch.group_norm(xm, num_groups, w, b, eps, torch.backends.cudnn.enabled)
    return y if axis == 1 else y.movedim(1, axis)


def instance_norm(
    x: Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, use_input_stats: bool,
    momentum: Any, eps: float, axis: int,
) -> Any:
    """``normkit.instance_norm`` by ``torch.instance_norm``, channels on axis 1."""
    if axis != 1 or x.numel() == 0:
        return NotImplemented
    c = x.shape[1]
    dtype = _stats_dtype(x)
    w, b = _param(weight, (c,), dtype, x), _param(bias, (c,), dtype, x)
    if w is _REFUSED or b is _REFUSED:
        return NotImplemented
    update = use_input_stats and running_mean is not None
    if not _stats(running_mean, running_var, c, dtype, x, update):
        return NotImplemented
    factor = 0.0
    stats = (running_mean, running_var)
    if update:
        factor = _momentum(momentum, None)
        if factor is None:
            return NotImplemented
        stats = (running_mean.clone(), running_var.clone())
    elif not use_input_stats and dtype != running_mean.dtype:
        stats = (running_mean.to(dtype), running_var.to(dtype))
    y = torch.instance_norm(x, w, b, stats[0], stats[1], use_input_stats, factor, eps, torch.backends.cudnn.enabled)
    if update:
        return BatchNormResult(y, *stats)
    return BatchNormResult(y, None, None) if use_input_stats else BatchNormResult(y, running_mean, running_var)


_RMS_NORM = getattr(torch, "rms_norm", None)  # torch >= 2.4


def rms_norm(x: Tensor, weight: Any, *, axis: tuple[int, ...], eps: float) -> Any:
    """``normkit.rms_norm`` by ``torch.rms_norm`` when the normalized axes are the trailing ones.

    The weight is given in x's dtype (aten's fused path; torch.nn.RMSNorm's in half precision).
    """
    if _RMS_NORM is None or not _trailing(axis, x.dim()) or x.numel() == 0:
        return NotImplemented
    shape = tuple(x.shape[axis[0]:])
    w = _param(weight, shape, x.dtype, x)
    if w is _REFUSED:
        return NotImplemented
    return _RMS_NORM(x, shape, w, eps)


batch_norm.nn_functional = F.batch_norm  # type: ignore[attr-defined]
layer_norm.nn_functional = F.layer_norm  # type: ignore[attr-defined]
group_norm.nn_functional = F.group_norm  # type: ignore[attr-defined]
instance_norm.nn_functional = F.instance_norm  # type: ignore[attr-defined]
rms_norm.nn_functional = getattr(F, "rms_norm", None)  # type: ignore[attr-defined]
