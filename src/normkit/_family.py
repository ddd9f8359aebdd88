"""Per-sample normalizations: layer, group, instance and RMS normalization.

layer:    y = (x - mean) / sqrt(var + eps) * weight + bias, moments over the normalized ``axis`` of each sample.
group:    channels split into ``num_groups``; moments per sample and group over its channels and spatial axes.
instance: moments per sample and channel over the spatial axes (group norm with one channel a group).
rms:      y = x / sqrt(mean(x**2) + eps) * weight, over the normalized ``axis``; no centering.
"""

from __future__ import annotations

from typing import Any

from normkit._batch_norm import BatchNormResult, _ema
from normkit._moments import raw_moments
from normkit._namespace import array_namespace, stop_gradient
from normkit._validate import (
    as_param,
    compute_dtype,
    feature_axis,
    positive_eps,
    reduce_axes,
    require_floating,
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


def layer_norm(
    x: Any, weight: Any = None, bias: Any = None, *, axis: int | tuple[int, ...] = -1, eps: float = 1e-5, xp: Any = None
) -> Any:
    """Normalize each sample over ``axis`` (the normalized axes; torch's ``normalized_shape`` is the last ones).

    ``weight``/``bias`` have the shape of x along ``axis``.
    """
    xp, dtype, xc = _setup(x, (("weight", weight), ("bias", bias)), xp)
    axes = reduce_axes(axis, x.ndim)
    eps = positive_eps(eps)
    pshape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    w = as_param(xp, weight, "weight", pshape, dtype, x)
    b = as_param(xp, bias, "bias", pshape, dtype, x)
    _, centered, var = raw_moments(xp, xc, axes)
    y = centered * (1.0 / xp.sqrt(var + eps))
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
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels, got {channels} channels")
    eps = positive_eps(eps)
    w = as_param(xp, weight, "weight", (channels,), dtype, x)
    b = as_param(xp, bias, "bias", (channels,), dtype, x)
    shape = tuple(x.shape)
    grouped_shape = shape[:f] + (num_groups, channels // num_groups) + shape[f + 1 :]
    g = xp.reshape(xc, _concrete(grouped_shape))
    axes = tuple(i for i in range(1, g.ndim) if i != f)
    _, centered, var = raw_moments(xp, g, axes)
    y = xp.reshape(centered * (1.0 / xp.sqrt(var + eps)), _concrete(shape))
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
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm(use_input_stats=False) needs running_mean and running_var")
        rm = xp.reshape(as_param(xp, running_mean, "running_mean", (channels,), dtype, x), bshape)
        rv = xp.reshape(as_param(xp, running_var, "running_var", (channels,), dtype, x), bshape)
        y = (xc - rm) * (1.0 / xp.sqrt(rv + float(eps)))
        return BatchNormResult(_back(xp, _affine(xp, y, w, b, bshape), x), running_mean, running_var)
    eps = positive_eps(eps)
    n = static_count(tuple(x.shape), spatial)
    if n is not None and n <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
    mean, centered, var = raw_moments(xp, xc, spatial)
    y = centered * (1.0 / xp.sqrt(var + eps))
    out = _back(xp, _affine(xp, y, w, b, bshape), x)
    new_mean = new_var = None
    if running_mean is not None and running_var is not None:
        rm = as_param(xp, running_mean, "running_mean", (channels,), running_mean.dtype, x)
        rv = as_param(xp, running_var, "running_var", (channels,), running_var.dtype, x)
        batch_axes = tuple(i for i in range(x.ndim) if i != f)
        unbiased = var * (n / (n - 1)) if n is not None else var
        bm = stop_gradient(xp, xp.reshape(xp.mean(mean, axis=batch_axes), (channels,)))
        bv = stop_gradient(xp, xp.reshape(xp.mean(unbiased, axis=batch_axes), (channels,)))
        new_mean, new_var = _ema(xp, rm, bm, momentum), _ema(xp, rv, bv, momentum)
    return BatchNormResult(out, new_mean, new_var)


def rms_norm(
    x: Any, weight: Any = None, *, axis: int | tuple[int, ...] = -1, eps: float | None = None, xp: Any = None
) -> Any:
    """``x / sqrt(mean(x**2 over axis) + eps) * weight``; ``eps=None`` is the machine epsilon of x's dtype."""
    xp, dtype, xc = _setup(x, (("weight", weight),), xp)
    axes = reduce_axes(axis, x.ndim)
    if eps is None:
        eps = float(xp.finfo(dtype).eps)  # float32's for half input, as torch
    eps = positive_eps(eps)
    pshape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    w = as_param(xp, weight, "weight", pshape, dtype, x)
    ms = xp.mean(xc * xc, axis=axes, keepdims=True)
    y = xc * (1.0 / xp.sqrt(ms + eps))
    return _back(xp, _affine(xp, y, w, None, bshape), x)
