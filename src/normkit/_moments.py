"""Moments: shifted two-pass mean and variance, and mergeable statistics (Chan et al.'s parallel formula).

Variance is always ``mean((x - mean)**2)`` after the mean has been found on data shifted by one
sample; never ``E[x**2] - E[x]**2``, which goes negative on data far from zero. The shift also
keeps numpy's naive summation over a non-contiguous float32 axis accurate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from normkit._namespace import array_namespace
from normkit._validate import compute_dtype, feature_axis, reduce_axes, require_floating, static_count

__all__ = ["moments", "Moments", "MomentsResult", "raw_moments"]


class MomentsResult(NamedTuple):
    """``(mean, var)`` as returned by ``normkit.moments``."""

    mean: Any
    var: Any


def _first_sample(x: Any, axes: tuple[int, ...]) -> Any:
    index = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    return x[index]


def raw_moments(xp: Any, x: Any, axes: tuple[int, ...], mask: Any = None) -> tuple[Any, Any, Any]:
    """``(mean, centered, var)`` over ``axes`` with keepdims; ``x`` is already in the compute dtype.

    ``centered`` is ``x - mean`` (callers reuse it); ``var`` is biased. With a ``mask`` (1 where
    a position counts, broadcastable to x), the moments are weighted by it.
    """
    shift = _first_sample(x, axes)
    shifted = x - shift
    if mask is None:
        offset = xp.mean(shifted, axis=axes, keepdims=True)
        mean = shift + offset
        centered = shifted - offset  # not x - mean: the offset was never rounded to x's magnitude
        var = xp.mean(centered * centered, axis=axes, keepdims=True)
        return mean, centered, var
    weights = xp.astype(mask, x.dtype)
    total = xp.sum(xp.broadcast_to(weights, x.shape), axis=axes, keepdims=True)
    total = xp.maximum(total, xp.asarray(1.0, dtype=x.dtype))
    offset = xp.sum(shifted * weights, axis=axes, keepdims=True) / total
    mean = shift + offset
    centered = shifted - offset
    var = xp.sum(centered * centered * weights, axis=axes, keepdims=True) / total
    return mean, centered, var


def dynamic_count(xp: Any, x: Any, axes: tuple[int, ...]) -> Any:
    """Number of values reduced over ``axes`` as a 0-d array, for dimensions known only at run time (tf.function)."""
    index = tuple(slice(None) if i in axes else slice(0, 1) for i in range(x.ndim))
    return xp.sum(xp.ones_like(x[index]))


def moments(x: Any, axis: int | tuple[int, ...] | None = None, *, correction: float = 0, keepdims: bool = False) -> MomentsResult:
    """Mean and variance of ``x`` over ``axis`` (the axes reduced, as in ``xp.mean``).

    ``var = sum((x - mean)**2) / (n - correction)``; half precision is reduced in float32 and
    returned in the input dtype.
    """
    xp = array_namespace(("x", x))
    require_floating(xp, x)
    axes = reduce_axes(axis, x.ndim)
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    mean, _, var = raw_moments(xp, xc, axes)
    if correction:
        n = static_count(tuple(x.shape), axes)
        if n is None:
            n = xp.astype(dynamic_count(xp, xc, axes), dtype)
        elif n - correction <= 0:
            raise ValueError(f"correction={correction} leaves no degrees of freedom for {n} values")
        var = var * (n / (n - correction))
    if not keepdims:
        mean = xp.squeeze(mean, axis=axes) if axes else mean
        var = xp.squeeze(var, axis=axes) if axes else var
    if x.dtype != dtype:
        mean, var = xp.astype(mean, x.dtype), xp.astype(var, x.dtype)
    return MomentsResult(mean, var)


@dataclass(frozen=True)
class Moments:
    """Mergeable per-feature statistics: ``count``, ``mean``, ``m2`` (sum of squared deviations), ``min``, ``max``.

    ``Moments.from_array(x, axis=-1)`` keeps one value per entry of the feature axis ``axis``;
    ``a.merge(b)`` combines two sets with Chan's formula, exact to round-off against the whole data.
    """

    count: int
    mean: Any
    m2: Any
    min: Any
    max: Any

    @classmethod
    def from_array(cls, x: Any, axis: int | None = -1) -> Moments:
        """Statistics of ``x`` per feature along ``axis`` (None: one scalar over all of x)."""
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
        mean, _, var = raw_moments(xp, xc, axes)
        squeeze = (lambda a: xp.squeeze(a, axis=axes)) if axes else (lambda a: a)
        return cls(
            count=n,
            mean=squeeze(mean),
            m2=squeeze(var) * n,
            min=xp.min(xc, axis=axes) if axes else xc,
            max=xp.max(xc, axis=axes) if axes else xc,
        )

    @property
    def var(self) -> Any:
        """Biased (population) variance, ``m2 / count``."""
        return self.m2 / self.count

    @property
    def std(self) -> Any:
        """Population standard deviation."""
        xp = array_namespace(("m2", self.m2))
        return xp.sqrt(self.var)

    def unbiased_var(self) -> Any:
        """Sample variance, ``m2 / (count - 1)``."""
        if self.count < 2:
            raise ValueError("unbiased variance needs at least two values per feature")
        return self.m2 / (self.count - 1)

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of both data sets (Chan, Golub and LeVeque, 1979)."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge expects a Moments, got {type(other).__name__}")
        xp = array_namespace(("self.mean", self.mean), ("other.mean", other.mean))
        if tuple(self.mean.shape) != tuple(other.mean.shape):
            raise ValueError(
                f"cannot merge Moments of shape {tuple(self.mean.shape)} with Moments of shape {tuple(other.mean.shape)}"
            )
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        return Moments(
            count=n,
            mean=self.mean + delta * (nb / n),
            m2=self.m2 + other.m2 + delta * delta * (na * nb / n),
            min=xp.minimum(self.min, other.min),
            max=xp.maximum(self.max, other.max),
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
