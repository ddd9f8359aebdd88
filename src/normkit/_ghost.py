"""Ghost batch norm (Hoffer et al., 2017): the batch split along axis 0 into virtual batches of V samples.

``x`` of shape ``(N, ...)`` is viewed as ``(G, V, ...)``, ``G = N / V``: virtual batch ``g`` holds
the consecutive samples ``g*V .. g*V + V - 1``, and each is normalized by its own statistics
(biased variance, centred first, as plain batch norm). The running statistics take one update per
call with the MERGE of the G virtual batches' ``(count, mean, M2)`` (Chan's formula for G sets at
once): that is the whole batch's statistics, so the running statistics do not depend on V.

Keras 2 (tf.keras, measured with tf_keras 2.21) differs twice: its virtual batch g held the strided
samples g, g+G, g+2G, ... (a reshape to (V, G, ...)), and it folded the mean of the virtual batches'
biased variances: the batch's minus the spread of their means, in expectation (V-1)/V of the
population variance where the batch's is (N-1)/N (a quarter low for V = 4). normkit takes
consecutive samples (the paper's split, torch's ``chunk``: a batch concatenated from per-device
parts keeps each part's statistics) and folds the merge, the estimate plain batch norm folds.
Both make one update per call (not one per virtual batch).
"""

from __future__ import annotations

import operator
from typing import Any, Optional

from normkit._moments import Moments, centered_moments, dynamic_count
from normkit._running import update_running_stats
from normkit._validate import as_int, as_param, compute_dtype, mask_weights, static_count

__all__ = ["virtual_batch_size_value", "ghost_train", "check_virtual_batch_size"]


def check_virtual_batch_size(value: Any) -> Optional[int]:
    """A layer's ``virtual_batch_size`` argument at construction: None, or a positive int (NumPy integers
    accepted); a bool, float or string is a TypeError and a value below 1 a ValueError, each naming it."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"virtual_batch_size must be None or a positive int, got {type(value).__name__} {value!r}") from None
    if v <= 0:
        raise ValueError(f"virtual_batch_size must be None or a positive int (samples per virtual batch), got {v}")
    return v


def virtual_batch_size_value(virtual_batch_size: Any, shape: tuple, f: int, training: bool) -> int:
    """``virtual_batch_size`` as a positive int; the feature axis ``f`` may not be axis 0, the one it splits;
    in training it must divide a batch size known now (inference does not split the batch)."""
    v = as_int(virtual_batch_size, "virtual_batch_size", "samples per virtual batch")
    if v <= 0:
        raise ValueError(f"virtual_batch_size must be a positive int (samples per virtual batch), got {v}")
    if f == 0:
        raise ValueError(
            f"virtual_batch_size splits axis 0 (the batch), so the feature axis cannot be 0; got axis=0 for x of shape {shape}"
        )
    n = static_count(shape, (0,))
    if training and n is not None and n % v:
        raise ValueError(
            f"virtual_batch_size={v} must divide the batch size (axis 0 of x), got a batch of {n} samples "
            f"(x of shape {shape}); use a batch size that is a multiple of {v}"
        )
    return v


def _merge_virtual_batches(xp: Any, mean: Any, var: Any, count: Any, groups: Any) -> tuple[Any, Any, Any]:
    """Chan's merge over axis 0 of G sets with per-set ``mean``, biased ``var`` and ``count`` (keepdims arrays).

    ``n = sum n_g``, ``mean = sum n_g mean_g / n``, ``M2 = sum n_g (var_g + (mean_g - mean)**2)``; with equal
    counts (an int, or a 0-d array where sizes are symbolic) the mean is the mean of the means. Returns
    ``(n, mean, M2)`` reduced over axis 0.
    """
    if isinstance(count, int) or count.ndim == 0:
        merged = xp.mean(mean, axis=0, keepdims=True)
        dev = mean - merged
        m2 = xp.sum(var + dev * dev, axis=0, keepdims=True) * count
        return (count * groups if isinstance(groups, int) else groups * count), merged, m2
    total = xp.sum(count, axis=0, keepdims=True)
    merged = xp.sum(count * mean, axis=0, keepdims=True) / xp.maximum(total, xp.ones_like(total))
    dev = mean - merged
    return total, merged, xp.sum(count * (var + dev * dev), axis=0, keepdims=True)


def ghost_train(xp: Any, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, momentum: Any,
                eps: float, f: int, mask: Any, correction: float, allow_single_value: bool, num_batches: Any,
                v: int, single_value_error: Any) -> tuple[Any, Any, Any]:
    """Training-mode ghost batch norm of ``x`` (features on axis ``f`` > 0, ``v`` dividing axis 0): ``(y, mean, var)``."""
    shape = tuple(x.shape)
    rest = shape[1:]
    if any(static_count(rest, (i,)) is None for i in range(len(rest))):
        raise ValueError(f"virtual_batch_size needs every axis of x but the batch axis known, got shape {shape}")
    c = shape[f]
    n = static_count(shape, (0,))
    groups: Any = -1 if n is None else n // v
    fg = f + 1  # the feature axis of the (G, V, ...) view
    axes = tuple(i for i in range(1, x.ndim + 1) if i != fg)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    xg = xp.reshape(xc, (groups, v) + rest)
    per_batch = static_count(tuple(xg.shape), axes)
    if per_batch is not None and per_batch <= 1 and not allow_single_value and mask is None:
        raise single_value_error
    weights = None
    if mask is not None:
        w8 = mask_weights(xp, mask, x, f)
        if w8.shape[0] == 1:
            weights = xp.expand_dims(w8, axis=0)
        else:
            weights = xp.reshape(w8, (groups, v) + tuple(w8.shape[1:]))
    m = centered_moments(xp, xg, axes, weights)
    bshape = tuple(c if i == fg else 1 for i in range(xg.ndim))
    w = as_param(xp, weight, "weight", (c,), dtype, x)
    b = as_param(xp, bias, "bias", (c,), dtype, x)
    scale = 1.0 / xp.sqrt(m.var + eps)
    if w is not None:
        scale = scale * xp.reshape(w, bshape)
    shift = -(m.residual * scale) if b is None else xp.reshape(b, bshape) - m.residual * scale
    y = xp.reshape(m.centered * scale + shift, (-1,) + rest if n is None else shape)
    if y.dtype != x.dtype:
        y = xp.astype(y, x.dtype)
    if running_mean is None:
        return y, None, None
    running_mean = as_param(xp, running_mean, "running_mean", (c,), getattr(running_mean, "dtype", dtype), x)
    running_var = as_param(xp, running_var, "running_var", (c,), getattr(running_var, "dtype", dtype), x)
    num_groups: Any = groups
    if n is None and mask is None:  # known only at run time (tf.function, symbolic shapes)
        num_groups = xp.astype(dynamic_count(xp, xg, (0,)), dtype)
    count, mean, m2 = _merge_virtual_batches(xp, m.mean, m.var, m.count, num_groups)
    if mask is not None:  # one count per feature
        count = xp.reshape(count, (c,))
    batch = Moments(count=count, mean=xp.reshape(mean, (c,)), m2=xp.reshape(m2, (c,)))
    new_mean, new_var = update_running_stats(running_mean, running_var, batch, momentum=momentum,
                                             correction=correction, num_batches=num_batches, xp=xp)
    return y, new_mean, new_var
