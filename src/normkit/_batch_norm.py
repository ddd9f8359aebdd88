"""Batch normalization on any Array API namespace: per-feature statistics over every other axis.

training:  y = (x - mean_B) / sqrt(var_B + eps) * weight + bias, var_B biased;
           running <- (1 - momentum) * running + momentum * batch (running var with ``correction``).
inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from normkit import _numpy_fast as numpy_fast
from normkit._moments import dynamic_count, raw_moments
from normkit._namespace import array_namespace, stop_gradient
from normkit._validate import as_param, compute_dtype, feature_axis, positive_eps, require_floating, static_count

__all__ = ["batch_norm", "BatchNormResult"]


class BatchNormResult(NamedTuple):
    """``(output, running_mean, running_var)``; the running statistics are new arrays, or None."""

    output: Any
    running_mean: Any
    running_var: Any


def _broadcast_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def _mask_weights(xp: Any, mask: Any, x: Any, axis: int) -> Any:
    """``mask`` of rank ``ndim - 1`` (x's shape without the feature axis) or ``ndim``, as a broadcastable array."""
    if mask.ndim == x.ndim - 1:
        mask = xp.expand_dims(mask, axis=axis)
    elif mask.ndim != x.ndim:
        raise ValueError(
            f"mask must have rank {x.ndim - 1} (x's shape without the feature axis) or {x.ndim}, "
            f"got shape {tuple(mask.shape)} for x of shape {tuple(x.shape)}"
        )
    for i, (m, d) in enumerate(zip(mask.shape, x.shape)):
        if m is not None and d is not None and m not in (1, d):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)} (axis {i})")
    return mask


def _single_value_error(x: Any) -> ValueError:
    return ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def batch_norm(
    x: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    *,
    training: bool = False,
    momentum: float | Any = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    mask: Any = None,
    correction: int = 1,
    allow_single_value: bool = False,
    xp: Any = None,
) -> BatchNormResult:
    """Normalize ``x`` per feature along ``axis`` (1: ``(N, C, *spatial)``; -1: channels-last).

    ``correction`` is the Bessel correction of the batch variance folded into ``running_var``
    (1: torch's unbiased convention; 0: Keras's biased one). ``mask`` (rank ``ndim - 1``, True
    where a position counts) excludes positions from the statistics. ``allow_single_value``
    lets one value per feature train (Keras's behaviour: the output is then ``bias``) instead
    of raising. Inputs are never mutated; running statistics come back as new arrays.
    """
    if xp is None:
        xp = array_namespace(
            ("x", x), ("running_mean", running_mean), ("running_var", running_var),
            ("weight", weight), ("bias", bias), ("mask", mask),
        )
    require_floating(xp, x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects x with a batch axis and a feature axis (rank >= 2), got shape {tuple(x.shape)}")
    f = feature_axis(axis, x.ndim)
    num_features = x.shape[f]
    if num_features is None:
        raise ValueError(f"the feature axis {axis} of x must have a known size, got shape {tuple(x.shape)}")
    axes = tuple(i for i in range(x.ndim) if i != f)
    dtype = compute_dtype(xp, x.dtype)
    feat = (num_features,)
    w = as_param(xp, weight, "weight", feat, dtype, x)
    b = as_param(xp, bias, "bias", feat, dtype, x)
    bshape = _broadcast_shape(x.ndim, f, num_features)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)

    if training:
        eps = positive_eps(eps)
        count = static_count(tuple(x.shape), axes)
        if count is not None and count <= 1 and not allow_single_value and mask is None:
            raise _single_value_error(x)
        weights = None if mask is None else _mask_weights(xp, mask, x, f)
        fast = weights is None and count is not None and numpy_fast.applies(xp, xc)
        if fast:
            mean, centered, var = numpy_fast.centered_moments(xc, f, count)
        else:
            mean, centered, var = raw_moments(xp, xc, axes, weights)
        # y = (x - mean) * scale + bias: centering first keeps float32 data far from zero (mean 1e4)
        # as accurate as the reference; x * scale + shift would lose about |mean| * eps.
        scale = 1.0 / xp.sqrt(var + eps)
        if w is not None:
            scale = scale * xp.reshape(w, bshape)
        if fast:  # in place on our own temporary: no further full-size array
            y = numpy_fast.scale_shift_in_place(centered, scale, None if b is None else xp.reshape(b, bshape))
        else:
            y = centered * scale
            if b is not None:
                y = y + xp.reshape(b, bshape)
        new_mean = new_var = None
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together (or both None)")
        if running_mean is not None:
            rm = as_param(xp, running_mean, "running_mean", feat, running_mean.dtype if hasattr(running_mean, "dtype") else dtype, x)
            rv = as_param(xp, running_var, "running_var", feat, running_var.dtype if hasattr(running_var, "dtype") else dtype, x)
            batch_mean = stop_gradient(xp, xp.reshape(mean, feat))
            batch_var = stop_gradient(xp, xp.reshape(var, feat))
            if correction:
                if weights is None:
                    n = count if count is not None else dynamic_count(xp, xc, axes)
                else:
                    n = xp.reshape(xp.sum(xp.broadcast_to(xp.astype(weights, dtype), xc.shape), axis=axes), feat)
                    n = xp.maximum(n, xp.asarray(float(correction) + 1.0, dtype=dtype))
                if isinstance(n, int):
                    batch_var = batch_var * (n / max(n - correction, 1))
                else:
                    batch_var = batch_var * (n / (n - correction))
            new_mean = _ema(xp, rm, batch_mean, momentum)
            new_var = _ema(xp, rv, batch_var, momentum)
        out = y if y.dtype == x.dtype else xp.astype(y, x.dtype)
        return BatchNormResult(out, new_mean, new_var)

    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm(training=False) normalizes with running_mean and running_var; both are required "
            "(pass training=True to use the batch statistics)"
        )
    rm = as_param(xp, running_mean, "running_mean", feat, dtype, x)
    rv = as_param(xp, running_var, "running_var", feat, dtype, x)
    eps = float(eps)
    scale = 1.0 / xp.sqrt(rv + eps)
    if w is not None:
        scale = scale * w
    # (x - running_mean) * scale + bias, centred first like training: x * scale + shift would lose
    # about |mean| * eps on data far from zero (1e-3 at mean 1e4 in float32, as Keras's layer does)
    rm, scale = xp.reshape(rm, bshape), xp.reshape(scale, bshape)
    if numpy_fast.applies(xp, xc):  # in place on our own difference: one full-size temporary
        y = numpy_fast.scale_shift_in_place(xc - rm, scale, None if b is None else xp.reshape(b, bshape))
    else:
        y = (xc - rm) * scale
        if b is not None:
            y = y + xp.reshape(b, bshape)
    out = y if y.dtype == x.dtype else xp.astype(y, x.dtype)
    return BatchNormResult(out, running_mean, running_var)


def _ema(xp: Any, old: Any, batch: Any, momentum: Any) -> Any:
    """``(1 - momentum) * old + momentum * batch`` in ``old``'s dtype."""
    batch = batch if batch.dtype == old.dtype else xp.astype(batch, old.dtype)
    return old * (1.0 - momentum) + batch * momentum
