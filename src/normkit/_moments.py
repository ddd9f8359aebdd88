"""Moments: accurate per-feature mean and variance, mergeable across chunks, batches and processes.

Variance is never ``E[x**2] - E[x]**2`` (negative on data far from zero). It is the corrected
two-pass algorithm (Chan, Golub and LeVeque, 1983): the mean of the data, then the mean of the
centred data refines it:

    c = x - mean(x);  r = mean(c);  mean = mean(x) + r;  var = mean(c**2) - r**2;  x - mean = c - r

``r`` sums values near zero, so it corrects a first mean that float32 rounding got slightly wrong
(about 1e-3 at mean 1e4); no sample is trusted as a shift, so an outlier anywhere costs nothing.
Where a library sums a long axis naively (numpy over a non-contiguous axis, TensorFlow: 1e6 rows
at 1e4 come out 131 off; an outlier's square swallows the rest), the first mean and the squares
of float32 data are accumulated in float64. ``Moments`` holds ``(count, mean, m2)``
and merges with Chan's formula.

Fitting (``Moments.from_array``, ``standardize``, ``min_max_scale``; ``fit_moments``) follows
scikit-learn: NaN is ignored (``count`` per feature). Each feature is first scaled by an exact
power of two that brings its largest magnitude near 1, so the squares of subnormal data do not
underflow and those of huge data do not overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from normkit._backend import backend
from normkit._moment_types import Centered, Fitted
from normkit._namespace import array_namespace, device_of
from normkit._validate import (
    compute_dtype,
    feature_axis,
    mask_weights,
    reduce_axes,
    require_floating,
    samples_per_feature,
    static_count,
    two_or_more_values,
)

__all__ = [
    "moments", "Moments", "MomentsResult", "batch_moments", "Centered", "centered_moments", "Fitted", "fit_moments",
    "power_of_two_scale", "scalar_like",
]


class MomentsResult(NamedTuple):
    """``(mean, var)`` as returned by ``normkit.moments``."""

    mean: Any
    var: Any


def dynamic_count(xp: Any, x: Any, axes: tuple[int, ...]) -> Any:
    """Number of values reduced over ``axes`` as a 0-d array, for dimensions known only at run time (tf.function)."""
    index = tuple(slice(None) if i in axes else slice(0, 1) for i in range(x.ndim))
    return xp.sum(xp.ones_like(x[index]))


def _weight_count(xp: Any, w: Any, x: Any, axes: tuple[int, ...]) -> Any:
    """``sum(broadcast_to(w, x.shape))`` over ``axes`` without the broadcast (dask cannot broadcast to unknown sizes)."""
    shape = tuple(x.shape)
    count = xp.sum(w, axis=axes, keepdims=True)
    factor = 1
    for a in range(x.ndim):
        if w.shape[a] == 1 and shape[a] != 1:
            n = static_count(shape, (a,))
            if n is None:
                return xp.sum(xp.broadcast_to(w, x.shape), axis=axes, keepdims=True)
            if a in axes:
                factor = factor * n
            else:  # a kept axis (the features): one count per entry
                count = xp.broadcast_to(count, tuple(n if i == a else d for i, d in enumerate(count.shape)))
    return count if factor == 1 else count * factor


def centered_moments(xp: Any, x: Any, axes: tuple[int, ...], weights: Any = None) -> Centered:
    """Mean, biased variance and the centred data of ``x`` over ``axes`` (keepdims), ``x`` in the compute dtype.

    The corrected two-pass algorithm of the module docstring: three reductions and one full-size
    difference, the same cost as a shifted two-pass, and no sample trusted.

    ``weights`` (1 where a position counts, broadcastable to ``x``) turns every mean into a
    weighted one; ``count`` is then the per-feature number of counted positions (an array),
    otherwise the static number of reduced values (an int) or a 0-d array when unknown until
    run time. A feature with no counted position gets mean and variance 0.
    """
    wide = backend(xp).accumulation_dtype(xp, x)
    if weights is None:
        count: Any = static_count(tuple(x.shape), axes)
        if count is None:
            count = xp.astype(dynamic_count(xp, x, axes), x.dtype)
        if wide is None:
            first = xp.mean(x, axis=axes, keepdims=True)
        else:
            n = count if isinstance(count, int) else xp.astype(count, wide)
            first = xp.astype(xp.sum(x, axis=axes, keepdims=True, dtype=wide) / n, x.dtype)
        centered = x - first
        if wide is None:
            residual = xp.mean(centered, axis=axes, keepdims=True)
        else:  # sorted data: a naive float32 sum of the centred values drifts (1e6 rows: 1e-5 std)
            residual = xp.astype(xp.sum(centered, axis=axes, keepdims=True, dtype=wide) / n, x.dtype)
        if wide is None:
            square = xp.mean(centered * centered, axis=axes, keepdims=True)
        else:  # one outlier's square would swallow every later one in a naive float32 sum
            square = xp.astype(xp.sum(centered * centered, axis=axes, keepdims=True, dtype=wide) / n, x.dtype)
    else:
        w = xp.astype(weights, x.dtype)
        count = _weight_count(xp, w, x, axes)
        total = xp.maximum(count, xp.asarray(1.0, dtype=x.dtype))
        if wide is None:
            first = xp.sum(x * w, axis=axes, keepdims=True) / total
        else:
            first = xp.astype(xp.sum(x * w, axis=axes, keepdims=True, dtype=wide) / xp.astype(total, wide), x.dtype)
        centered = x - first
        if wide is None:
            residual = xp.sum(centered * w, axis=axes, keepdims=True) / total
        else:
            residual = xp.astype(xp.sum(centered * w, axis=axes, keepdims=True, dtype=wide)
                                 / xp.astype(total, wide), x.dtype)
        if wide is None:
            square = xp.sum(centered * centered * w, axis=axes, keepdims=True) / total
        else:
            square = xp.astype(xp.sum(centered * centered * w, axis=axes, keepdims=True, dtype=wide)
                               / xp.astype(total, wide), x.dtype)
    var = xp.maximum(square - residual * residual, xp.zeros_like(square))
    return Centered(first + residual, centered, residual, var, count)


def scalar_like(xp: Any, value: float, like: Any) -> Any:
    """A 0-d array of ``like``'s dtype and device (rule 6: constants for ``where`` and comparisons)."""
    return xp.asarray(value, dtype=like.dtype, device=device_of(xp, like))


def _at_least(xp: Any, a: Any, b: Any) -> Any:
    """``a >= b`` with the functions every namespace normkit serves has (TensorFlow's is a subset)."""
    return xp.equal(xp.maximum(a, b), a)


def power_of_two_scale(xp: Any, magnitude: Any) -> Any:
    """``2**-e`` per element with ``magnitude * 2**-e`` in [1, 4); 1 where magnitude is 0, inf or NaN.

    A binary search on the exponent by exact multiplications with powers of two (log2 and pow
    are neither in every namespace nor exact everywhere); ``2**-e`` stays a normal number.
    """
    one = xp.ones_like(magnitude)
    largest = scalar_like(xp, float(xp.finfo(magnitude.dtype).max), magnitude)
    m = xp.where(_at_least(xp, largest, magnitude), magnitude, one)  # inf and NaN: 1
    m = xp.where(_at_least(xp, xp.zeros_like(m), m), one, m)  # 0 and -inf: 1
    steps = (512, 256, 128, 64, 32, 16, 8, 4, 2) if m.dtype == xp.float64 else (64, 32, 16, 8, 4, 2)
    scale = one
    for k in steps:
        down, up = scalar_like(xp, 2.0**-k, m), scalar_like(xp, 2.0**k, m)
        scaled = m * scale
        scale = xp.where(_at_least(xp, scaled, up), scale * down, scale)
        scale = xp.where(_at_least(xp, scaled, down), scale, scale * up)
    return scale


def _mean(xp: Any, a: Any, axes: tuple[int, ...], count: Any, wide: Any) -> Any:
    """``sum(a) / count`` over ``axes`` (keepdims), accumulated in ``wide`` (float64) where it is not None."""
    if wide is None:
        return xp.sum(a, axis=axes, keepdims=True) / count
    return xp.astype(xp.sum(a, axis=axes, keepdims=True, dtype=wide) / xp.astype(count, wide), a.dtype)


def fit_moments(xp: Any, x: Any, axes: tuple[int, ...]) -> Fitted:
    """``Fitted`` statistics of ``x`` (in the compute dtype) over ``axes``, ignoring NaN (scikit-learn's rule).

    The corrected two-pass of ``centered_moments`` on ``u = x * scale`` with NaN replaced by 0 and
    left out of every sum and count (a ``where``, not a weight: fewer full-size temporaries).
    A namespace's fast path (NumPy's C-contiguous arrays: ``_numpy_fast.fit_moments``) runs the same algorithm in place.
    """
    be = backend(xp)
    fast = be.fast_for(x)
    if fast is not None:
        return fast.fit_moments(x, axes)
    valid = xp.equal(x, x)
    zero = scalar_like(xp, 0.0, x)
    lo = xp.min(xp.where(valid, x, scalar_like(xp, float("inf"), x)), axis=axes, keepdims=True)
    hi = xp.max(xp.where(valid, x, scalar_like(xp, float("-inf"), x)), axis=axes, keepdims=True)
    scale = power_of_two_scale(xp, xp.maximum(-lo, hi))
    count = xp.sum(xp.astype(valid, x.dtype), axis=axes, keepdims=True)
    total = xp.maximum(count, scalar_like(xp, 1.0, count))  # a feature with no value: mean 0, var 0
    wide = be.accumulation_dtype(xp, x)
    u = x * scale
    first = _mean(xp, xp.where(valid, u, zero), axes, total, wide)
    centered = u - first  # NaN stays NaN
    c0 = xp.where(valid, centered, zero)
    residual = _mean(xp, c0, axes, total, wide)
    square = _mean(xp, c0 * c0, axes, total, wide)
    var = xp.maximum(square - residual * residual, xp.zeros_like(square))
    return Fitted(count, first + residual, var, lo, hi, scale, centered, residual)


def moments(x: Any, axis: int | tuple[int, ...] | None = None, *, correction: float = 0, keepdims: bool = False,
            xp: Any = None) -> MomentsResult:
    """Mean and variance of ``x`` over ``axis`` (the axes reduced, as in ``xp.mean``).

    ``var = sum((x - mean)**2) / (n - correction)``; half precision is reduced in float32 and
    returned in the input dtype.
    """
    if xp is None:
        xp = array_namespace(("x", x))
    require_floating(xp, x)
    axes = reduce_axes(axis, x.ndim)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    c = centered_moments(xp, xc, axes)
    mean, var = c.mean, c.var
    if correction:
        n = c.count
        if isinstance(n, int) and n - correction <= 0:
            raise ValueError(f"correction={correction} leaves no degrees of freedom for {n} values")
        var = var * (n / (n - correction))
    if not keepdims:
        mean = xp.squeeze(mean, axis=axes) if axes else mean
        var = xp.squeeze(var, axis=axes) if axes else var
    if x.dtype != dtype:
        mean, var = xp.astype(mean, x.dtype), xp.astype(var, x.dtype)
    return MomentsResult(mean, var)


def _safe_ratio(xp: Any, num: Any, den: Any) -> Any:
    """``num / den`` with 0 where ``den`` is 0 (ints or arrays; an empty set contributes nothing)."""
    if isinstance(den, (int, float)):
        return num / den if den else num * 0
    zero = xp.zeros_like(den)
    return xp.where(xp.equal(den, zero), zero, num / xp.where(xp.equal(den, zero), xp.ones_like(den), den))


def _unless_empty(xp: Any, count: Any, if_empty: Any, value: Any) -> Any:
    """``if_empty`` where ``count`` is 0, else ``value`` (count an int or an array)."""
    if isinstance(count, (int, float)):
        return if_empty if count == 0 else value
    return xp.where(xp.equal(count, xp.zeros_like(count)), if_empty, value)


def _as_count(xp: Any, count: Any, like: Any) -> Any:
    """``count`` (an int or an array) in ``like``'s dtype, for arithmetic with it."""
    if isinstance(count, int):
        return count
    return count if count.dtype == like.dtype else xp.astype(count, like.dtype)


@dataclass(frozen=True)
class Moments:
    """Mergeable per-feature statistics: ``count``, ``mean``, ``m2`` (sum of squared deviations), ``min``, ``max``.

    ``count`` is an int, or an array broadcastable to ``mean`` where the count differs per
    feature (a mask) or is known only at run time. ``missing`` (None: none) is the per-feature
    number of NaN among the ``count`` samples, which the statistics leave out (``from_array``);
    ``observed = count - missing`` values per feature make them. ``min``/``max`` are None where
    not gathered (``batch_moments``). ``a.merge(b)`` combines two sets with Chan's formula, exact
    to round-off against the whole data; a set with no observed value is the identity of the merge.
    """

    count: Any
    mean: Any
    m2: Any
    min: Any = None
    max: Any = None
    missing: Any = None

    @classmethod
    def from_array(cls, x: Any, axis: int | None = -1) -> Moments:
        """Statistics of ``x`` per feature along ``axis`` (None: one scalar over all of x), with min and max.

        NaN is ignored, as scikit-learn's scalers do: ``count`` is the number of samples and
        ``missing`` the number of NaN per feature among them; a feature with no value has mean 0,
        m2 0, min +inf and max -inf (the identity of ``merge``). 1-D ``x`` with a feature axis
        (one sample per feature) is refused.
        """
        xp = array_namespace(("x", x))
        require_floating(xp, x)
        if axis is None:
            axes = tuple(range(x.ndim))
        else:
            f = feature_axis(axis, x.ndim)
            axes = tuple(i for i in range(x.ndim) if i != f)
        samples_per_feature(x, axis, axes, "Moments.from_array")
        dtype = compute_dtype(xp, x.dtype)
        xc = x if x.dtype == dtype else xp.astype(x, dtype)
        fit = fit_moments(xp, xc, axes)
        squeeze = (lambda a: xp.squeeze(a, axis=axes)) if axes else (lambda a: a)
        scale, observed = squeeze(fit.scale), backend(xp).stop_gradient(squeeze(fit.count))
        rows: Any = static_count(tuple(x.shape), axes)
        if rows is None:  # dask with unknown chunk sizes
            rows = backend(xp).stop_gradient(dynamic_count(xp, xc, axes))
        return cls(
            count=rows,
            mean=squeeze(fit.mean) / scale,
            m2=squeeze(fit.var) / scale / scale * observed,  # two divisions: scale**2 may overflow
            min=squeeze(fit.min),
            max=squeeze(fit.max),
            missing=rows - observed,
        )

    @property
    def observed(self) -> Any:
        """Values per feature that the statistics hold: ``count - missing``."""
        return self.count if self.missing is None else self.count - self.missing

    @property
    def var(self) -> Any:
        """Biased (population) variance, ``m2 / observed`` (0 where nothing was observed)."""
        xp = array_namespace(("m2", self.m2))
        return _safe_ratio(xp, self.m2, _as_count(xp, self.observed, self.m2))

    @property
    def std(self) -> Any:
        """Population standard deviation."""
        xp = array_namespace(("m2", self.m2))
        return xp.sqrt(self.var)

    def unbiased_var(self, correction: float = 1) -> Any:
        """Sample variance, ``m2 / (observed - correction)``."""
        n = self.observed
        if isinstance(n, int) and n <= correction:
            raise ValueError(f"unbiased variance needs more than {correction} value(s) per feature, got {n}")
        xp = array_namespace(("m2", self.m2))
        return _safe_ratio(xp, self.m2, _as_count(xp, n, self.m2) - correction)

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both data sets (Chan, Golub and LeVeque, 1979)."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge expects a Moments, got {type(other).__name__}")
        xp = array_namespace(("self.mean", self.mean), ("other.mean", other.mean))
        if tuple(self.mean.shape) != tuple(other.mean.shape):
            raise ValueError(
                f"cannot merge Moments of shape {tuple(self.mean.shape)} with Moments of shape {tuple(other.mean.shape)}"
            )
        na, nb = _as_count(xp, self.observed, self.mean), _as_count(xp, other.observed, self.mean)
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * _safe_ratio(xp, nb, n)
        m2 = self.m2 + other.m2 + delta * delta * _safe_ratio(xp, na * nb, n)
        # a side with nothing observed is the identity exactly (its mean 0 may be far away: inf * 0 is NaN)
        mean, m2 = _unless_empty(xp, nb, self.mean, mean), _unless_empty(xp, nb, self.m2, m2)
        mean, m2 = _unless_empty(xp, na, other.mean, mean), _unless_empty(xp, na, other.m2, m2)
        both = self.min is not None and other.min is not None
        missing = None
        if self.missing is not None or other.missing is not None:
            missing = (0 if self.missing is None else self.missing) + (0 if other.missing is None else other.missing)
        return Moments(
            count=self.count + other.count,
            mean=mean,
            m2=m2,
            min=xp.minimum(self.min, other.min) if both else None,
            max=xp.maximum(self.max, other.max) if both else None,
            missing=missing,
        )

    @classmethod
    def from_batches(cls, batches: Any, axis: int | None = -1) -> Moments:
        """Merge the statistics of every batch of an iterable (a list, a generator, a DataLoader)."""
        total: Moments | None = None
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            part = cls.from_array(batch, axis=axis)
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("Moments.from_batches got an empty iterable")
        return total


def batch_moments(x: Any, *, axis: int = 1, mask: Any = None, xp: Any = None) -> Moments:
    """A batch's statistics per feature along ``axis`` (1: ``(N, C, *spatial)``; -1: channels-last).

    Reduces over every other axis; returns ``Moments(count, mean, m2)`` of shape ``(C,)`` in the
    compute dtype (float32 for half precision), without autograd history on ``count``; merge
    them across chunks, virtual batches or processes, fold them into running statistics with
    ``update_running_stats``. ``mask`` (x's shape without the feature axis, True where a
    position counts) excludes positions; ``count`` is then per feature.
    """
    if xp is None:
        xp = array_namespace(("x", x), ("mask", mask))
    require_floating(xp, x)
    two_or_more_values(x, "batch_moments")
    f = feature_axis(axis, x.ndim)
    c = x.shape[f]
    axes = tuple(i for i in range(x.ndim) if i != f)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    weights = None if mask is None else mask_weights(xp, mask, x, f)
    m = centered_moments(xp, xc, axes, weights)
    count = m.count
    if not isinstance(count, int):
        count = backend(xp).stop_gradient(xp.reshape(count, (c,)) if weights is not None else count)
    mean, var = xp.reshape(m.mean, (c,)), xp.reshape(m.var, (c,))
    return Moments(count=count, mean=mean, m2=var * (count if isinstance(count, int) else _as_count(xp, count, var)))
