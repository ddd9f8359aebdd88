"""The running-statistics update: one formula for every framework, path, kernel and process count.

    running_mean <- (1 - m) * running_mean + m * mean_B
    running_var  <- (1 - m) * running_var  + m * m2_B / (count_B - correction)

``m`` is the weight of the new batch (torch's ``momentum``; Keras's is ``1 - m``); ``momentum=None``
is the cumulative average ``m = 1 / num_batches`` (torch's convention); ``correction=1`` folds the
unbiased batch variance (torch), ``0`` the biased one (Keras). A batch with no counted value
(``count == 0``: every position masked, an empty rank) leaves the statistics unchanged.
"""

from __future__ import annotations

from typing import Any

from normkit._backend import backend
from normkit._moments import Moments
from normkit._namespace import array_namespace, is_array, type_name
from normkit._validate import (
    compute_dtype,
    momentum_value,
    nonnegative_eps,
    num_batches_value,
    require_floating_state,
    running_stats_shape,
)

__all__ = ["update_running_stats"]


def _bessel(xp: Any, m2: Any, count: Any, correction: float) -> Any:
    """``m2 / (count - correction)``, with the denominator kept >= 1 (one value: its variance is 0)."""
    if isinstance(count, int):
        return m2 / max(count - correction, 1)
    if count.dtype != m2.dtype:
        count = xp.astype(count, m2.dtype)
    return m2 / xp.maximum(count - correction, xp.ones_like(count))


def _in(xp: Any, a: Any, dtype: Any) -> Any:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def update_running_stats(
    running_mean: Any,
    running_var: Any,
    batch: Moments,
    *,
    momentum: float | Any = 0.1,
    correction: float = 1,
    num_batches: Any = None,
    xp: Any = None,
) -> tuple[Any, Any]:
    """Fold a batch's ``Moments`` into running statistics; returns ``(new_mean, new_var)``, new arrays.

    ``momentum`` is the weight of the new batch in [0, 1] (torch's convention; pass ``1 - momentum``
    for Keras's), or None for the cumulative average over ``num_batches`` (>= 1) batches, this one included
    (torch's ``num_batches_tracked`` after its increment); a 0-d array is range-checked where its value is
    known (not under jax.jit, torch.compile, dask). ``correction`` is the Bessel correction of
    the folded variance: 1 unbiased (torch), 0 biased (Keras). The running statistics must have the
    batch's per-feature shape (never broadcast). The batch statistics carry no autograd history into the
    result; the update is computed in float32 for half precision and the result keeps each running
    statistic's dtype (one cast at the end: a batch variance above 65504 does not make a float16 inf).
    """
    if not isinstance(batch, Moments):
        raise TypeError(f"batch must be a normkit.Moments (e.g. normkit.batch_moments(x)), got {type(batch).__name__}")
    if xp is None:
        xp = array_namespace(("running_mean", running_mean), ("running_var", running_var), ("batch.mean", batch.mean))
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if not is_array(value):
            raise TypeError(f"{name} must be an array, got {type_name(value)}")
    require_floating_state(xp, running_mean, "running_mean")
    require_floating_state(xp, running_var, "running_var")
    features = tuple(batch.mean.shape)
    if tuple(batch.m2.shape) != features:
        raise ValueError(f"batch.m2 must have batch.mean's shape {features}, got shape {tuple(batch.m2.shape)}")
    running_stats_shape(running_mean, running_var, features, "batch.mean")
    correction = nonnegative_eps(correction, "correction")
    momentum = momentum_value(momentum, allow_none=True)
    if momentum is None:
        num_batches = num_batches_value(num_batches)
        momentum = 1.0 / num_batches if isinstance(num_batches, (int, float)) else 1.0 / xp.astype(num_batches, compute_dtype(xp, running_mean.dtype))
    elif is_array(momentum):
        array_namespace(("running_mean", running_mean), ("momentum", momentum))  # one library: else a clear error
    count = batch.observed  # NaN left out by Moments.from_array does not count
    if isinstance(count, int) and count == 0:
        return running_mean, running_var
    dtype = compute_dtype(xp, running_mean.dtype)
    mean_dtype, var_dtype = running_mean.dtype, running_var.dtype
    old_mean, old_var = _in(xp, running_mean, dtype), _in(xp, running_var, compute_dtype(xp, var_dtype))
    running_mean, running_var = old_mean, old_var  # half precision: the update in float32, one cast at the end
    cut = backend(xp).stop_gradient
    mean = cut(batch.mean)
    var = cut(_bessel(xp, _in(xp, batch.m2, compute_dtype(xp, batch.m2.dtype)), count, correction))
    if mean.dtype != running_mean.dtype:
        mean = xp.astype(mean, running_mean.dtype)
    if var.dtype != running_var.dtype:
        var = xp.astype(var, running_var.dtype)
    new_mean = running_mean * (1.0 - momentum) + mean * momentum
    new_var = running_var * (1.0 - momentum) + var * momentum
    if not isinstance(count, int):  # a per-feature count: features with none counted keep their value
        seen = xp.reshape(count, tuple(new_mean.shape)) if count.ndim else count
        empty = xp.equal(seen, xp.zeros_like(seen))
        new_mean = xp.where(empty, old_mean, new_mean)
        new_var = xp.where(empty, old_var, new_var)
    return _in(xp, new_mean, mean_dtype), _in(xp, new_var, var_dtype)
