"""Plain float64 NumPy references, written to be read at a glance. Not fast, not clever: the definition.

The forward references compute in float64, or in ``np.longdouble`` when given it: float64 results
(whose own round-off the float64 reference shares) are checked against the wider type.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "batch_norm", "ghost_batch_norm",
    "layer_norm", "group_norm", "instance_norm", "rms_norm", "standardize", "min_max_scale", "moments",
]


def _float(x) -> np.ndarray:
    """``x`` as float64, or as ``np.longdouble`` if it is one already."""
    x = np.asarray(x)
    return x if x.dtype == np.longdouble else np.asarray(x, np.float64)


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _per_feature(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.reshape(v, shape)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, *, training=False,
               momentum=0.1, eps=1e-5, axis=1, correction=1, mask=None):
    """Returns (y, new_running_mean, new_running_var), all float64."""
    x = _float(x)
    axes = _other_axes(x.ndim, axis)
    if training:
        if mask is None:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            n = x.size // x.shape[axis % x.ndim]
        else:
            m = np.broadcast_to(np.expand_dims(np.asarray(mask, np.float64), axis % x.ndim), x.shape)
            n = m.sum(axis=axes)
            mean = (x * m).sum(axis=axes) / n
            var = (((x - _per_feature(mean, x.ndim, axis)) ** 2) * m).sum(axis=axes) / n
        if running_mean is not None:
            unbiased = var * n / (n - correction)
            running_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
            running_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * unbiased
    else:
        mean, var = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    y = (x - _per_feature(mean, x.ndim, axis)) / np.sqrt(_per_feature(var, x.ndim, axis) + eps)
    if weight is not None:
        y = y * _per_feature(np.asarray(weight, np.float64), x.ndim, axis)
    if bias is not None:
        y = y + _per_feature(np.asarray(bias, np.float64), x.ndim, axis)
    return y, running_mean, running_var


def ghost_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, *, virtual_batch_size,
                     momentum=0.1, eps=1e-5, axis=1, correction=1, mask=None):
    """Training-mode ghost batch norm: each run of ``virtual_batch_size`` consecutive samples is batch-normalized
    with its own statistics; the running statistics take one update with the whole batch's (the merge of the
    virtual batches'). Returns (y, new_running_mean, new_running_var), all float64."""
    x = _float(x)
    assert x.shape[0] % virtual_batch_size == 0, "the virtual batch size must divide the batch"
    y = np.empty_like(x)
    for start in range(0, x.shape[0], virtual_batch_size):
        part = slice(start, start + virtual_batch_size)
        y[part] = batch_norm(x[part], None, None, weight, bias, training=True, eps=eps, axis=axis,
                             mask=None if mask is None else np.asarray(mask)[part])[0]
    _, running_mean, running_var = batch_norm(x, running_mean, running_var, training=True, momentum=momentum,
                                              axis=axis, correction=correction, mask=mask)
    return y, running_mean, running_var


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5):
    """Normalize over ``axis`` (int or tuple) per sample; weight/bias shaped like x along axis."""
    x = _float(x)
    axes = tuple(a % x.ndim for a in np.atleast_1d(axis))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if weight is not None:
        y = y * np.reshape(np.asarray(weight, np.float64), shape)
    if bias is not None:
        y = y + np.reshape(np.asarray(bias, np.float64), shape)
    return y


def group_norm(x, num_groups, weight=None, bias=None, *, axis=1, eps=1e-5):
    """Per sample and group of consecutive channels along ``axis``."""
    x = _float(x)
    c_axis = axis % x.ndim
    xm = np.moveaxis(x, c_axis, 1)
    n, c = xm.shape[:2]
    g = xm.reshape(n, num_groups, -1)
    y = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)
    y = np.moveaxis(y.reshape(xm.shape), 1, c_axis)
    if weight is not None:
        y = y * _per_feature(np.asarray(weight, np.float64), x.ndim, c_axis)
    if bias is not None:
        y = y + _per_feature(np.asarray(bias, np.float64), x.ndim, c_axis)
    return y


def instance_norm(x, weight=None, bias=None, *, axis=1, eps=1e-5):
    """Group norm with one channel per group."""
    x = _float(x)
    return group_norm(x, x.shape[axis % x.ndim], weight, bias, axis=axis, eps=eps)


def rms_norm(x, weight=None, *, axis=-1, eps=1e-6):
    """x / sqrt(mean(x**2) + eps) * weight over ``axis``."""
    x = _float(x)
    axes = tuple(a % x.ndim for a in np.atleast_1d(axis))
    y = x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)
    if weight is not None:
        shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
        y = y * np.reshape(np.asarray(weight, np.float64), shape)
    return y


def _nan_stats(x, axes):
    """mean and population std over ``axes`` ignoring NaN (NaN where nothing is left); std 0 where all values are equal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN feature: "Mean of empty slice"
        mean = np.nanmean(x, axis=axes, keepdims=True)
        std = np.nanstd(x, axis=axes, keepdims=True)
        constant = np.nanmax(x, axis=axes, keepdims=True) == np.nanmin(x, axis=axes, keepdims=True)
    return mean, np.where(constant, 0.0, std)  # np.std of equal values can be 1e-17, not 0


def standardize(x, *, axis=-1):
    """(x - mean) / population std per feature; NaN ignored by the statistics, kept in the output; a constant feature gives 0."""
    x = _float(x)
    axes = _other_axes(x.ndim, axis) if axis is not None else None
    mean, std = _nan_stats(x, axes)
    return (x - mean) / np.where(std == 0, 1.0, std)


def min_max_scale(x, *, axis=-1, feature_range=(0.0, 1.0)):
    """lo + (x - min) / (max - min) * (hi - lo) per feature, NaN ignored by min and max; a constant feature gives lo."""
    x = _float(x)
    axes = _other_axes(x.ndim, axis) if axis is not None else None
    lo, hi = feature_range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN feature: "All-NaN slice encountered"
        mn, mx = np.nanmin(x, axis=axes, keepdims=True), np.nanmax(x, axis=axes, keepdims=True)
    span = np.where(mx == mn, 1.0, mx - mn)
    return lo + (x - mn) / span * (hi - lo)


def moments(x, *, axis=-1):
    """Per-feature (count, mean, biased var, min, max) of ``x`` along feature ``axis`` (None: all of x), NaN ignored.

    A feature with no value has count 0, mean 0, var 0, min +inf and max -inf (the identities of a merge).
    """
    x = _float(x)
    axes = _other_axes(x.ndim, axis) if axis is not None else tuple(range(x.ndim))
    valid = ~np.isnan(x)
    count = valid.sum(axis=axes).astype(np.float64)
    mean, std = _nan_stats(x, axes)
    empty = count == 0
    return (count, np.where(empty, 0.0, mean.squeeze(axes)), np.where(empty, 0.0, std.squeeze(axes) ** 2),
            np.where(valid, x, np.inf).min(axis=axes), np.where(valid, x, -np.inf).max(axis=axes))


def _centered_norm_grad(x, g, axes, eps):
    """d/dx of sum(xhat * g) for xhat = (x - mean) / sqrt(var + eps) over ``axes``: (dx, xhat)."""
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * invstd
    dx = invstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, xhat


def batch_norm_grad(x, upstream, weight=None, *, axis=1, eps=1e-5):
    """Training-mode gradients of sum(batch_norm(x) * upstream): (dx, dweight, dbias), all float64.

    xhat = (x - mean) / sqrt(var + eps); dx = w / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    x, dy = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    axes = _other_axes(x.ndim, axis)
    w = 1.0 if weight is None else _per_feature(np.asarray(weight, np.float64), x.ndim, axis)
    dx, xhat = _centered_norm_grad(x, dy * w, axes, eps)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def layer_norm_grad(x, upstream, weight=None, *, axis=-1, eps=1e-5):
    """Gradients of sum(layer_norm(x) * upstream) over the normalized ``axis``: (dx, dweight, dbias)."""
    x, dy = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    other = tuple(i for i in range(x.ndim) if i not in axes)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    w = 1.0 if weight is None else np.reshape(np.asarray(weight, np.float64), shape)
    dx, xhat = _centered_norm_grad(x, dy * w, axes, eps)
    return dx, (dy * xhat).sum(axis=other), dy.sum(axis=other)


def group_norm_grad(x, upstream, num_groups, weight=None, *, axis=1, eps=1e-5):
    """Gradients of sum(group_norm(x) * upstream), groups of consecutive channels along ``axis``."""
    x, dy = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    c_axis = axis % x.ndim
    xm, dym = np.moveaxis(x, c_axis, 1), np.moveaxis(dy, c_axis, 1)
    w = 1.0 if weight is None else _per_feature(np.asarray(weight, np.float64), xm.ndim, 1)
    grouped = (xm.shape[0], num_groups, -1)
    dxg, xhat = _centered_norm_grad(xm.reshape(grouped), (dym * w).reshape(grouped), (2,), eps)
    dx = np.moveaxis(dxg.reshape(xm.shape), 1, c_axis)
    xhat = xhat.reshape(xm.shape)
    other = tuple(i for i in range(xm.ndim) if i != 1)
    return dx, (dym * xhat).sum(axis=other), dym.sum(axis=other)


def rms_norm_grad(x, upstream, weight=None, *, axis=-1, eps=1e-6):
    """Gradients of sum(rms_norm(x) * upstream): (dx, dweight); r = 1/sqrt(mean(x**2) + eps), dx = r g - x r**3 mean(g x)."""
    x, dy = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    other = tuple(i for i in range(x.ndim) if i not in axes)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    w = 1.0 if weight is None else np.reshape(np.asarray(weight, np.float64), shape)
    r = 1.0 / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)
    g = dy * w
    dx = r * g - x * r**3 * (g * x).mean(axis=axes, keepdims=True)
    return dx, (dy * x * r).sum(axis=other)
