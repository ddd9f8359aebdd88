"""Per-sample normalizations: layer, group, instance and RMS normalization.

layer:    y = (x - mean) / sqrt(var + eps) * weight + bias, moments over the normalized ``axis`` of each sample.
group:    channels split into ``num_groups``; moments per sample and group over its channels and spatial axes.
instance: moments per sample and channel over the spatial axes (group norm with one channel a group).
rms:      y = x / sqrt(mean(x**2) + eps) * weight, over the normalized ``axis``; no centering.
"""

from __future__ import annotations

from typing import Any

from normkit._batch_norm import BatchNormResult
from normkit._dispatch import call_kernel
from normkit._moments import Moments, centered_moments
from normkit._namespace import array_namespace
from normkit._running import update_running_stats
from normkit._validate import (
    as_int,
    as_param,
    compute_dtype,
    feature_axis,
    momentum_value,
    nonnegative_eps,
    reduce_axes,
    require_floating,
    require_floating_state,
    static_count,
)

__all__ = ["layer_norm", "group_norm", "instance_norm", "rms_norm"]


def _setup(x: Any, named: tuple, xp: Any) -> tuple[Any, Any, Any]:
    if xp is None:
        xp = array_namespace(("x", x), *named)
    require_floating(xp, x)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    return xp, dtype, xc


def _concrete(shape: tuple) -> tuple:
    """A reshape target: an unknown (symbolic batch) dimension becomes -1."""
    return tuple(-1 if d is None else d for d in shape)


def _affine(xp: Any, y: Any, w: Any, b: Any, bshape: tuple) -> Any:
    if w is not None:
        y = y * xp.reshape(w, bshape)
    if b is not None:
        y = y + xp.reshape(b, bshape)
    return y


def _back(xp: Any, y: Any, x: Any) -> Any:
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


def _standardized(xp: Any, x: Any, axes: tuple[int, ...], eps: float) -> tuple[Any, Any]:
    """``((x - mean) / sqrt(var + eps), moments)`` over ``axes``, centred before scaling."""
    m = centered_moments(xp, x, axes)
    inv = 1.0 / xp.sqrt(m.var + eps)
    return m.centered * inv - m.residual * inv, m


def layer_norm(
    x: Any, weight: Any = None, bias: Any = None, *, axis: int | tuple[int, ...] = -1, eps: float = 1e-5, xp: Any = None
) -> Any:
    """Normalize each sample over ``axis`` (the normalized axes; torch's ``normalized_shape`` is the last ones).

    ``weight``/``bias`` have the shape of x along ``axis``.
    """
    xp, dtype, xc = _setup(x, (("weight", weight), ("bias", bias)), xp)
    axes = reduce_axes(axis, x.ndim)
    eps = nonnegative_eps(eps)
    out = call_kernel("layer_norm", xp, x, x, weight, bias, axis=axes, eps=eps)
    if out is not NotImplemented:
        return out
    pshape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    w = as_param(xp, weight, "weight", pshape, dtype, x)
    b = as_param(xp, bias, "bias", pshape, dtype, x)
    y, _ = _standardized(xp, xc, axes, eps)
    return _back(xp, _affine(xp, y, w, b, bshape), x)


def group_norm(
    x: Any, num_groups: int, weight: Any = None, bias: Any = None, *, axis: int = 1, eps: float = 1e-5, xp: Any = None
) -> Any:
    """Normalize each sample per group of channels; ``axis`` is the channel axis (1 torch, -1 Keras).

    Channel ``c`` belongs to group ``c // (C // num_groups)``; ``weight``/``bias`` have one value per channel.
    """
    xp, dtype, xc = _setup(x, (("weight", weight), ("bias", bias)), xp)
    if x.ndim < 2:
        raise ValueError(f"group_norm expects x of rank >= 2 (batch, channels, ...), got shape {tuple(x.shape)}")
    f = feature_axis(axis, x.ndim)
    channels = x.shape[f]
    num_groups = as_int(num_groups, "num_groups", "the number of channel groups")
    if num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels, got {channels} channels")
    eps = nonnegative_eps(eps)
    out = call_kernel("group_norm", xp, x, x, num_groups, weight, bias, axis=f, eps=eps)
    if out is not NotImplemented:
        return out
    w = as_param(xp, weight, "weight", (channels,), dtype, x)
    b = as_param(xp, bias, "bias", (channels,), dtype, x)
    shape = tuple(x.shape)
    grouped_shape = shape[:f] + (num_groups, channels // num_groups) + shape[f + 1 :]
    g = xp.reshape(xc, _concrete(grouped_shape))
    axes = tuple(i for i in range(1, g.ndim) if i != f)
    y, _ = _standardized(xp, g, axes, eps)
    y = xp.reshape(y, _concrete(shape))
    bshape = tuple(channels if i == f else 1 for i in range(x.ndim))
    return _back(xp, _affine(xp, y, w, b, bshape), x)


def instance_norm(
    x: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    *,
    use_input_stats: bool = True,
    momentum: float | Any = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    xp: Any = None,
) -> BatchNormResult:
    """Normalize each sample and channel over the spatial axes; ``axis`` is the channel axis, axis 0 the batch.

    With running statistics and ``use_input_stats``, returns them updated with the batch average of
    the per-instance mean and unbiased variance (torch's convention); without ``use_input_stats``,
    normalizes with them instead.
    """
    xp, dtype, xc = _setup(
        x, (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)), xp
    )
    if x.ndim < 3:
        raise ValueError(f"instance_norm expects x of rank >= 3 (batch, channels, *spatial), got shape {tuple(x.shape)}")
    f = feature_axis(axis, x.ndim)
    if f == 0:
        raise ValueError("instance_norm: axis names the channel axis and cannot be the batch axis 0")
    channels = x.shape[f]
    bshape = tuple(channels if i == f else 1 for i in range(x.ndim))
    w = as_param(xp, weight, "weight", (channels,), dtype, x)
    b = as_param(xp, bias, "bias", (channels,), dtype, x)
    spatial = tuple(i for i in range(1, x.ndim) if i != f)
    require_floating_state(xp, running_mean, "running_mean")
    require_floating_state(xp, running_var, "running_var")
    eps = nonnegative_eps(eps)
    if use_input_stats:
        momentum = momentum_value(momentum)
        n = static_count(tuple(x.shape), spatial)
        if n is not None and n <= 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
    elif running_mean is None or running_var is None:
        raise ValueError("instance_norm(use_input_stats=False) needs running_mean and running_var")
    out = call_kernel("instance_norm", xp, x, x, running_mean, running_var, weight, bias,
                      use_input_stats=use_input_stats, momentum=momentum, eps=eps, axis=f)
    if out is not NotImplemented:
        return out
    if not use_input_stats:
        rm = xp.reshape(as_param(xp, running_mean, "running_mean", (channels,), dtype, x), bshape)
        rv = xp.reshape(as_param(xp, running_var, "running_var", (channels,), dtype, x), bshape)
        y = (xc - rm) * (1.0 / xp.sqrt(rv + eps))
        return BatchNormResult(_back(xp, _affine(xp, y, w, b, bshape), x), running_mean, running_var)
    y, m = _standardized(xp, xc, spatial, eps)
    out = _back(xp, _affine(xp, y, w, b, bshape), x)
    new_mean = new_var = None
    if running_mean is not None and running_var is not None:
        rm = as_param(xp, running_mean, "running_mean", (channels,), running_mean.dtype, x)
        rv = as_param(xp, running_var, "running_var", (channels,), running_var.dtype, x)
        # torch's convention: the batch average of the per-instance means and unbiased variances,
        # i.e. Moments of n values each whose m2 is the average per-instance m2
        batch_axes = tuple(i for i in range(x.ndim) if i != f)
        count = m.count if isinstance(m.count, int) else xp.reshape(m.count, ())
        per_instance_m2 = m.var * (count if isinstance(count, int) else xp.astype(count, m.var.dtype))
        stats = Moments(
            count=count,
            mean=xp.reshape(xp.mean(m.mean, axis=batch_axes), (channels,)),
            m2=xp.reshape(xp.mean(per_instance_m2, axis=batch_axes), (channels,)),
        )
        new_mean, new_var = update_running_stats(rm, rv, stats, momentum=momentum, correction=1, xp=xp)
    return BatchNormResult(out, new_mean, new_var)


def rms_norm(
    x: Any, weight: Any = None, *, axis: int | tuple[int, ...] = -1, eps: float | None = None, xp: Any = None
) -> Any:
    """``x / sqrt(mean(x**2 over axis) + eps) * weight``; ``eps=None`` is the machine epsilon of x's dtype."""
    xp, dtype, xc = _setup(x, (("weight", weight),), xp)
    axes = reduce_axes(axis, x.ndim)
    if eps is None:
        eps = float(xp.finfo(dtype).eps)  # float32's for half input, as torch
    eps = nonnegative_eps(eps)
    out = call_kernel("rms_norm", xp, x, x, weight, axis=axes, eps=eps)
    if out is not NotImplemented:
        return out
    pshape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    w = as_param(xp, weight, "weight", pshape, dtype, x)
    ms = xp.mean(xc * xc, axis=axes, keepdims=True)
    y = xc * (1.0 / xp.sqrt(ms + eps))
    return _back(xp, _affine(xp, y, w, None, bshape), x)
