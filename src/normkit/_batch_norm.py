"""Batch normalization on any Array API namespace, composed of the core's three steps.

1. statistics of the batch: ``batch_moments`` (count, mean, m2 per feature; mergeable ``Moments``);
2. the running update: ``update_running_stats`` (momentum, Bessel ``correction``, cumulative average);
3. the application: ``normalize``, ``y = (x - mean) * (weight / sqrt(var + eps)) + bias``, centred first.

training:  y = (x - mean_B) / sqrt(var_B + eps) * weight + bias, var_B biased;
           running <- (1 - momentum) * running + momentum * batch (running var with ``correction``).
inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from normkit._backend import backend
from normkit._dispatch import call_kernel
from normkit._ghost import ghost_train, virtual_batch_size_value
from normkit._moments import Moments, centered_moments
from normkit._namespace import array_namespace, is_array
from normkit._running import update_running_stats
from normkit._validate import (
    as_param,
    compute_dtype,
    feature_axis,
    mask_weights,
    momentum_value,
    nonnegative_eps,
    num_batches_value,
    positive_eps,
    require_floating,
    require_floating_state,
    running_stats_shape,
    static_count,
    two_or_more_values,
)

__all__ = ["batch_norm", "BatchNormResult", "normalize"]


class BatchNormResult(NamedTuple):
    """``(output, running_mean, running_var)``; the running statistics are new arrays, or None."""

    output: Any
    running_mean: Any
    running_var: Any


def _broadcast_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def _single_value_error(x: Any, virtual_batch_size: int | None = None) -> ValueError:
    where = "" if virtual_batch_size is None else f" in each virtual batch of {virtual_batch_size} (virtual_batch_size)"
    return ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}{where}")


def _scale(xp: Any, var: Any, w: Any, eps: float) -> Any:
    """``weight / sqrt(var + eps)`` per feature (weight None means 1)."""
    scale = 1.0 / xp.sqrt(var + eps)
    return scale if w is None else scale * w


def normalize(
    x: Any, mean: Any, var: Any, weight: Any = None, bias: Any = None, *, eps: float = 1e-5, axis: int = 1,
    xp: Any = None,
) -> Any:
    """The application step: ``(x - mean) * (weight / sqrt(var + eps)) + bias`` per feature along ``axis``.

    ``mean``/``var`` have one value per feature (batch or running statistics, biased variance);
    ``x - mean`` is formed before scaling, so float32 data far from zero (mean 1e4) keeps its
    accuracy. Half precision is computed in float32 and returned in x's dtype.
    """
    if xp is None:
        xp = array_namespace(("x", x), ("mean", mean), ("var", var), ("weight", weight), ("bias", bias))
    require_floating(xp, x)
    two_or_more_values(x, "normalize")
    f = feature_axis(axis, x.ndim)
    eps = nonnegative_eps(eps)
    return _normalize(xp, x, mean, var, weight, bias, eps, f, ("mean", "var"))


def _normalize(xp: Any, x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float, f: int,
               names: tuple[str, str]) -> Any:
    c = x.shape[f]
    if c is None:
        raise ValueError(f"the feature axis {f} of x must have a known size, got shape {tuple(x.shape)}")
    dtype = compute_dtype(xp, x.dtype)
    feat, bshape = (c,), _broadcast_shape(x.ndim, f, c)
    m = xp.reshape(as_param(xp, mean, names[0], feat, dtype, x), bshape)
    v = as_param(xp, var, names[1], feat, dtype, x)
    w = as_param(xp, weight, "weight", feat, dtype, x)
    b = as_param(xp, bias, "bias", feat, dtype, x)
    scale = xp.reshape(_scale(xp, v, w, eps), bshape)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    b = None if b is None else xp.reshape(b, bshape)
    fast = backend(xp).fast_for(xc)
    if fast is not None:  # in place on our own difference: one full-size temporary
        y = fast.scale_shift_in_place(xc - m, scale, b)
    else:
        y = (xc - m) * scale
        if b is not None:
            y = y + b
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


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
    correction: float = 1,
    allow_single_value: bool = False,
    num_batches: Any = None,
    virtual_batch_size: int | None = None,
    xp: Any = None,
) -> BatchNormResult:
    """Normalize ``x`` per feature along ``axis`` (1: ``(N, C, *spatial)``; -1: channels-last).

    ``momentum`` is the weight of the new batch in the running update (torch's convention), or None
    for the cumulative average over ``num_batches`` batches (this one included). ``correction`` is
    the Bessel correction of the batch variance folded into ``running_var`` (1: torch's unbiased
    convention; 0: Keras's biased one). ``mask`` (rank ``ndim - 1``, True where a position counts)
    excludes positions from the statistics. ``allow_single_value`` lets one value per feature
    train (Keras's behaviour: the output is then ``bias``) instead of raising; a feature with no
    counted position leaves its running statistics as they were. NaN propagates as in torch (to its
    feature's output and statistics); a NumPy masked array is refused (pass ``x.data`` with
    ``mask=~x.mask``). Inputs are never mutated; running statistics come back as new arrays. On arrays a plugin serves with a fused
    kernel (torch, TensorFlow) the kernel computes where the arguments fit its contract.

    ``virtual_batch_size=V`` (training only; ghost batch norm): samples ``g*V .. g*V+V-1`` form virtual
    batch ``g``, each normalized by its own statistics; V must divide the batch (ValueError naming
    both), checked when tracing where the batch is known, else by the reshape at run time. The
    running statistics are updated ONCE with the merge (Chan) of the virtual batches' statistics,
    i.e. the whole batch's, the population estimate plain batch norm folds (Keras 2 folded the mean
    of their biased variances, low by the spread of their means and by ``(V-1)/V`` in expectation;
    see ``normkit._ghost``). ``V`` equal to the batch is plain batch norm.
    """
    if xp is None:
        xp = array_namespace(
            ("x", x), ("running_mean", running_mean), ("running_var", running_var),
            ("weight", weight), ("bias", bias), ("mask", mask),
        )
    require_floating(xp, x)
    two_or_more_values(x, "batch_norm")
    f = feature_axis(axis, x.ndim)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    require_floating_state(xp, running_mean, "running_mean")
    require_floating_state(xp, running_var, "running_var")
    if training:
        eps = positive_eps(eps)
        momentum = momentum_value(momentum, allow_none=True)
        if momentum is None and running_mean is not None:
            num_batches = num_batches_value(num_batches)
    else:
        eps = nonnegative_eps(eps)
        if running_mean is None:
            raise ValueError(
                "batch_norm(training=False) normalizes with running_mean and running_var; both are required "
                "(pass training=True to use the batch statistics)"
            )
    ghost = None
    if virtual_batch_size is not None:
        ghost = virtual_batch_size_value(virtual_batch_size, tuple(x.shape), f, training)
        if not training or ghost == static_count(tuple(x.shape), (0,)):
            ghost = None  # inference, or one virtual batch: plain batch norm (same kernels, same result)
    if is_array(running_mean) and is_array(running_var):  # before any kernel: one message under every policy
        running_stats_shape(running_mean, running_var, (x.shape[f],))
    out = call_kernel(  # a kernel gets virtual_batch_size only when it splits a training batch
        "batch_norm", xp, x, x, running_mean, running_var, weight, bias, training=training, momentum=momentum,
        eps=eps, axis=f, mask=mask, correction=correction, allow_single_value=allow_single_value,
        num_batches=num_batches, **({} if ghost is None else {"virtual_batch_size": ghost}),
    )
    if out is not NotImplemented:
        return out
    if not training:
        y = _normalize(xp, x, running_mean, running_var, weight, bias, eps, f, ("running_mean", "running_var"))
        return BatchNormResult(y, running_mean, running_var)
    if ghost is not None:
        return BatchNormResult(*ghost_train(
            xp, x, running_mean, running_var, weight, bias, momentum, eps, f, mask, correction, allow_single_value,
            num_batches, ghost, _single_value_error(x, ghost),
        ))
    return _train(xp, x, running_mean, running_var, weight, bias, momentum, eps, f, mask, correction,
                  allow_single_value, num_batches)


def _train(xp: Any, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, momentum: Any,
           eps: float, f: int, mask: Any, correction: float, allow_single_value: bool, num_batches: Any) -> BatchNormResult:
    num_features = x.shape[f]
    if num_features is None:
        raise ValueError(f"the feature axis {f} of x must have a known size, got shape {tuple(x.shape)}")
    axes = tuple(i for i in range(x.ndim) if i != f)
    dtype = compute_dtype(xp, x.dtype)
    feat = (num_features,)
    bshape = _broadcast_shape(x.ndim, f, num_features)
    w = as_param(xp, weight, "weight", feat, dtype, x)
    b = as_param(xp, bias, "bias", feat, dtype, x)
    rm = rv = None
    if running_mean is not None:
        rm = as_param(xp, running_mean, "running_mean", feat, getattr(running_mean, "dtype", dtype), x)
        rv = as_param(xp, running_var, "running_var", feat, getattr(running_var, "dtype", dtype), x)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    count = static_count(tuple(x.shape), axes)
    if count is not None and count <= 1 and not allow_single_value and mask is None:
        raise _single_value_error(x)
    weights = None if mask is None else mask_weights(xp, mask, x, f)
    fast = backend(xp).fast_for(xc) if weights is None and count is not None and count > 0 else None
    m = centered_moments(xp, xc, axes, weights) if fast is None else fast.centered_moments(xc, f, count)
    # y = (x - mean) * scale + bias with x - mean = centered - residual: centred before scaling, so
    # float32 data far from zero (mean 1e4) keeps its accuracy; the residual folds into the shift
    scale = _scale(xp, xp.reshape(m.var, feat), w, eps)
    scale = xp.reshape(scale, bshape)
    shift = -(m.residual * scale) if b is None else xp.reshape(b, bshape) - m.residual * scale
    if fast is not None:  # in place on our own temporary: no further full-size array
        y = fast.scale_shift_in_place(m.centered, scale, shift)
    else:
        y = m.centered * scale + shift
    new_mean = new_var = None
    if rm is not None:
        count_feat = m.count if weights is None else xp.reshape(m.count, feat)
        var = xp.reshape(m.var, feat)
        stats = Moments(count=count_feat, mean=xp.reshape(m.mean, feat),
                        m2=var * (count_feat if isinstance(count_feat, int) else xp.astype(count_feat, var.dtype)))
        new_mean, new_var = update_running_stats(
            rm, rv, stats, momentum=momentum, correction=correction, num_batches=num_batches, xp=xp
        )
    out = y if y.dtype == x.dtype else xp.astype(y, x.dtype)
    return BatchNormResult(out, new_mean, new_var)
