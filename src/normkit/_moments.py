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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from normkit._namespace import array_namespace, stop_gradient
from normkit._validate import (
    compute_dtype,
    feature_axis,
    mask_weights,
    reduce_axes,
    require_floating,
    static_count,
    two_or_more_values,
)

__all__ = ["moments", "Moments", "MomentsResult", "batch_moments", "Centered", "centered_moments"]


class MomentsResult(NamedTuple):
    """``(mean, var)`` as returned by ``normkit.moments``."""

    mean: Any
    var: Any


class Centered(NamedTuple):
    """What one pass over ``x`` leaves behind (keepdims): ``x - mean == centered - residual``.

    ``centered`` is the full-size ``x - (mean - residual)``; callers reuse it for the output as
    ``centered * scale + (bias - residual * scale)``, which needs no further full-size pass.
    """

    mean: Any
    centered: Any
    residual: Any
    var: Any
    count: Any


# namespaces whose float32 sums accumulate naively along a non-contiguous axis (1e6 rows at 1e4:
# the mean comes out 131 off in numpy and TensorFlow); a namespace may say so itself with the
# attribute ``normkit_sums_naively``
_NAIVE_SUMMERS = frozenset({"array_api_compat.numpy", "array_api_strict", "array_api_compat.dask.array"})


def _wide_accumulator(xp: Any, x: Any) -> Any:
    """float64 where ``xp`` sums float32 naively and has float64, else None (the sum is accurate)."""
    naive = getattr(xp, "normkit_sums_naively", None)
    if naive is None:
        naive = getattr(xp, "__name__", None) in _NAIVE_SUMMERS
    if not naive or x.dtype != xp.float32:
        return None
    return getattr(xp, "float64", None)


def dynamic_count(xp: Any, x: Any, axes: tuple[int, ...]) -> Any:
    """Number of values reduced over ``axes`` as a 0-d array, for dimensions known only at run time (tf.function)."""
    index = tuple(slice(None) if i in axes else slice(0, 1) for i in range(x.ndim))
    return xp.sum(xp.ones_like(x[index]))


def centered_moments(xp: Any, x: Any, axes: tuple[int, ...], weights: Any = None) -> Centered:
    """Mean, biased variance and the centred data of ``x`` over ``axes`` (keepdims), ``x`` in the compute dtype.

    The corrected two-pass algorithm of the module docstring: three reductions and one full-size
    difference, the same cost as a shifted two-pass, and no sample trusted.

    ``weights`` (1 where a position counts, broadcastable to ``x``) turns every mean into a
    weighted one; ``count`` is then the per-feature number of counted positions (an array),
    otherwise the static number of reduced values (an int) or a 0-d array when unknown until
    run time. A feature with no counted position gets mean and variance 0.
    """
    wide = _wide_accumulator(xp, x)
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
        residual = xp.mean(centered, axis=axes, keepdims=True)
        if wide is None:
            square = xp.mean(centered * centered, axis=axes, keepdims=True)
        else:  # one outlier's square would swallow every later one in a naive float32 sum
            square = xp.astype(xp.sum(centered * centered, axis=axes, keepdims=True, dtype=wide) / n, x.dtype)
    else:
        w = xp.astype(weights, x.dtype)
        count = xp.sum(xp.broadcast_to(w, x.shape), axis=axes, keepdims=True)
        total = xp.maximum(count, xp.asarray(1.0, dtype=x.dtype))
        if wide is None:
            first = xp.sum(x * w, axis=axes, keepdims=True) / total
        else:
            first = xp.astype(xp.sum(x * w, axis=axes, keepdims=True, dtype=wide) / xp.astype(total, wide), x.dtype)
        centered = x - first
        residual = xp.sum(centered * w, axis=axes, keepdims=True) / total
        if wide is None:
            square = xp.sum(centered * centered * w, axis=axes, keepdims=True) / total
        else:
            square = xp.astype(xp.sum(centered * centered * w, axis=axes, keepdims=True, dtype=wide)
                               / xp.astype(total, wide), x.dtype)
    var = xp.maximum(square - residual * residual, xp.zeros_like(square))
    return Centered(first + residual, centered, residual, var, count)


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


def _as_count(xp: Any, count: Any, like: Any) -> Any:
    """``count`` (an int or an array) in ``like``'s dtype, for arithmetic with it."""
    if isinstance(count, int):
        return count
    return count if count.dtype == like.dtype else xp.astype(count, like.dtype)


@dataclass(frozen=True)
class Moments:
    """Mergeable per-feature statistics: ``count``, ``mean``, ``m2`` (sum of squared deviations), ``min``, ``max``.

    ``count`` is an int, or an array broadcastable to ``mean`` where the count differs per
    feature (a mask) or is known only at run time. ``min``/``max`` are None where not gathered
    (``batch_moments``). ``a.merge(b)`` combines two sets with Chan's formula, exact to round-off
    against the whole data; a set with count 0 is the identity of the merge.
    """

    count: Any
    mean: Any
    m2: Any
    min: Any = None
    max: Any = None

    @classmethod
    def from_array(cls, x: Any, axis: int | None = -1) -> Moments:
        """Statistics of ``x`` per feature along ``axis`` (None: one scalar over all of x), with min and max."""
        xp = array_namespace(("x", x))
        require_floating(xp, x)
        if axis is None:
            axes = tuple(range(x.ndim))
        else:
            f = feature_axis(axis, x.ndim)
            axes = tuple(i for i in range(x.ndim) if i != f)
        n = static_count(tuple(x.shape), axes)
        if n is None:
            raise ValueError("Moments.from_array needs x's shape to be known")
        if n == 0:
            raise ValueError(f"Moments.from_array got no values to reduce over (x has shape {tuple(x.shape)})")
        dtype = compute_dtype(xp, x.dtype)
        xc = x if x.dtype == dtype else xp.astype(x, dtype)
        c = centered_moments(xp, xc, axes)
        squeeze = (lambda a: xp.squeeze(a, axis=axes)) if axes else (lambda a: a)
        return cls(
            count=n,
            mean=squeeze(c.mean),
            m2=squeeze(c.var) * n,
            min=xp.min(xc, axis=axes) if axes else xc,
            max=xp.max(xc, axis=axes) if axes else xc,
        )

    @property
    def var(self) -> Any:
        """Biased (population) variance, ``m2 / count`` (0 where count is 0)."""
        xp = array_namespace(("m2", self.m2))
        return _safe_ratio(xp, self.m2, _as_count(xp, self.count, self.m2))

    @property
    def std(self) -> Any:
        """Population standard deviation."""
        xp = array_namespace(("m2", self.m2))
        return xp.sqrt(self.var)

    def unbiased_var(self, correction: int = 1) -> Any:
        """Sample variance, ``m2 / (count - correction)``."""
        if isinstance(self.count, int) and self.count <= correction:
            raise ValueError(f"unbiased variance needs more than {correction} value(s) per feature, got {self.count}")
        xp = array_namespace(("m2", self.m2))
        return _safe_ratio(xp, self.m2, _as_count(xp, self.count, self.m2) - correction)

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both data sets (Chan, Golub and LeVeque, 1979)."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge expects a Moments, got {type(other).__name__}")
        xp = array_namespace(("self.mean", self.mean), ("other.mean", other.mean))
        if tuple(self.mean.shape) != tuple(other.mean.shape):
            raise ValueError(
                f"cannot merge Moments of shape {tuple(self.mean.shape)} with Moments of shape {tuple(other.mean.shape)}"
            )
        na, nb = _as_count(xp, self.count, self.mean), _as_count(xp, other.count, self.mean)
        n = na + nb
        delta = other.mean - self.mean
        both = self.min is not None and other.min is not None
        return Moments(
            count=n,
            mean=self.mean + delta * _safe_ratio(xp, nb, n),
            m2=self.m2 + other.m2 + delta * delta * _safe_ratio(xp, na * nb, n),
            min=xp.minimum(self.min, other.min) if both else None,
            max=xp.maximum(self.max, other.max) if both else None,
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
        count = stop_gradient(xp, xp.reshape(count, (c,)) if weights is not None else count)
    mean, var = xp.reshape(m.mean, (c,)), xp.reshape(m.var, (c,))
    return Moments(count=count, mean=mean, m2=var * (count if isinstance(count, int) else _as_count(xp, count, var)))
