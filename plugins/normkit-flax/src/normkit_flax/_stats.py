"""Exact statistics of a Flax layer's input: ``normkit.batch_moments`` on a 2-D view, merged across devices.

Every Flax normalization reduces ``x`` over some axes and keeps the others (batch norm keeps the
features, layer norm the samples, group norm samples and groups). ``View`` lays ``x`` out as a
2-D array with one row or column per kept entry, so one call of ``normkit.batch_moments`` (the
corrected two-pass, masks as weights) gives every statistic, and ``normkit.normalize`` applies
them centred first. Under ``axis_name`` each device's ``(count, mean, m2)`` goes through ONE
``lax.psum`` (of one-hot rows: an all-gather whose result is the same on every device) and is merged with ``Moments.merge`` (Chan): the statistics of the union of the
shards, weighted by their counts, so masks and uneven shards are exact (Flax's ``lax.pmean`` of
per-device means weights every device equally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import jax.numpy as jnp
from jax import lax

import normkit

__all__ = ["View", "Exact", "canonical_axes", "exact_moments", "normalize", "affine", "mean_square"]


def canonical_axes(ndim: int, axes: Any) -> tuple[int, ...]:
    """Sorted, distinct, non-negative axes (Flax's ``_canonicalize_axes`` accepts an int or an iterable)."""
    if isinstance(axes, int):
        axes = (axes,)
    out = sorted({int(a) + ndim if int(a) < 0 else int(a) for a in axes})
    for a in out:
        if not 0 <= a < ndim:
            raise ValueError(f"axis {a - ndim if a >= ndim else a} is out of range for input of rank {ndim}")
    return tuple(out)


@dataclass(frozen=True)
class View:
    """``x`` of ``shape`` as a 2-D array: the kept entries along ``feature`` (0 or 1), the reduced ones along the other.

    Channels-last batch norm (the reduced axes lead) is a reshape, ``(R, K)``; layer norm (the reduced
    axes trail) too, ``(K, R)``; any other arrangement transposes first.
    """

    shape: tuple[int, ...]
    reduced: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i not in self.reduced)

    @property
    def order(self) -> tuple[int, ...]:
        kept, reduced = self.kept, self.reduced
        return reduced + kept if kept == tuple(range(len(reduced), len(self.shape))) else kept + reduced

    @property
    def feature(self) -> int:
        return 1 if self.order[: len(self.reduced)] == self.reduced else 0

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.kept)

    def _sizes(self) -> tuple[int, int]:
        k = r = 1
        for i in self.kept:
            k *= self.shape[i]
        for i in self.reduced:
            r *= self.shape[i]
        return k, r

    def flat(self, a: Any) -> Any:
        """``a`` (of ``shape``) as the 2-D view."""
        if self.order != tuple(range(len(self.shape))):
            a = jnp.transpose(a, self.order)
        k, r = self._sizes()
        return jnp.reshape(a, (r, k) if self.feature == 1 else (k, r))

    def unflat(self, a2: Any) -> Any:
        """The inverse of ``flat``."""
        a = jnp.reshape(a2, tuple(self.shape[i] for i in self.order))
        if self.order != tuple(range(len(self.shape))):
            a = jnp.transpose(a, tuple(self.order.index(i) for i in range(len(self.shape))))
        return a


class Exact(NamedTuple):
    """Statistics per kept entry (``(K,)``) and the centred view that applies them exactly.

    ``centered = flat(x) - local_mean`` (this device's float32 mean; the difference is exact to
    round-off of its own size), ``offset`` the mean of the union relative to ``local_mean``, so
    ``x - mean == centered - offset`` keeps float32 accuracy at mean 1e4 (the mean itself is one
    float32 rounding, 5e-4, off there). ``total`` holds the union's count, mean and m2.
    """

    centered: Any
    offset: Any
    total: normkit.Moments


def exact_moments(x: Any, view: View, *, mask: Any = None, axis_name: Any = None,
                  axis_index_groups: Any = None) -> Exact:
    """``Exact`` statistics of ``x`` over ``view.reduced``, of every device's shard together under ``axis_name``.

    Two ``normkit.batch_moments`` passes (the second on the data centred by the first's mean) and,
    under ``axis_name``, ONE ``lax.psum`` of one-hot rows of every device's packed ``(count, mean, offset, m2)``;
    the rows are merged with ``Moments.merge`` (Chan) relative to this device's mean. ``mask``
    (broadcastable to x, True where a position counts) leaves positions out; a kept entry with
    nothing counted has mean and variance 0. Half precision is reduced in float32.
    """
    x2 = view.flat(x)
    m2d = None
    if mask is not None:
        m2d = view.flat(jnp.broadcast_to(jnp.asarray(mask, bool), tuple(x.shape)))
    first = normkit.batch_moments(x2, axis=view.feature, mask=m2d)
    shape = (1, -1) if view.feature == 1 else (-1, 1)
    base = lax.stop_gradient(first.mean)  # a shift only: the result does not depend on it
    centered = x2 - jnp.reshape(base, shape).astype(x2.dtype)
    local = normkit.batch_moments(centered, axis=view.feature, mask=m2d)
    if axis_name is None:
        total = normkit.Moments(count=local.count, mean=base + local.mean, m2=local.m2)
        return Exact(centered, local.mean, total)
    count = jnp.broadcast_to(jnp.asarray(local.count, local.mean.dtype), local.mean.shape)
    packed = jnp.stack([count, jnp.broadcast_to(base, local.mean.shape), local.mean, local.m2])
    n = lax.axis_size(axis_name)  # a psum of one-hot rows: every device's rows, the same (unmapped) everywhere
    onehot = jnp.asarray(jnp.arange(n) == lax.axis_index(axis_name), packed.dtype)
    rows = lax.psum(onehot[:, None, None] * packed[None], axis_name, axis_index_groups=axis_index_groups)

    def merge(relative: bool) -> normkit.Moments:
        merged: Optional[normkit.Moments] = None
        for d in range(n):  # the number of devices: static; a row of another group has count 0 (the identity)
            # relative: device d's mean minus this device's base, a difference of nearby float32 values (exact)
            mean = (rows[d, 1] - base) + rows[d, 2] if relative else rows[d, 1] + rows[d, 2]
            part = normkit.Moments(count=lax.stop_gradient(rows[d, 0]), mean=mean, m2=rows[d, 3])
            merged = part if merged is None else merged.merge(part)
        assert merged is not None
        return merged

    # the output centres on this device's base (exact at mean 1e4); the running statistics take the
    # device-invariant merge (the same on every device, as a BatchStat must be)
    return Exact(centered, merge(relative=True).mean, merge(relative=False))


def mean_square(stats: normkit.Moments) -> Any:
    """``mean(x**2) = var + mean**2`` (RMS norm's statistic; a sum of non-negative terms, no cancellation)."""
    return stats.var + stats.mean * stats.mean


def normalize(x2: Any, view: View, mean: Any, var: Any, scale: Any, bias: Any, *, eps: float,
              feature_axes: Sequence[int]) -> Any:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` from the 2-D view ``x2``: ``mean``/``var`` per kept entry
    (``(K,)``), applied by ``normkit.normalize`` (centred first); ``scale``/``bias`` along ``feature_axes``."""
    if tuple(feature_axes) == view.kept:  # one scale per kept entry (batch norm): normkit applies it
        k = mean.shape[0]
        scale = None if scale is None else jnp.reshape(scale, (k,))
        bias = None if bias is None else jnp.reshape(bias, (k,))
        return view.unflat(normkit.normalize(x2, mean, var, scale, bias, eps=eps, axis=view.feature))
    y = view.unflat(normkit.normalize(x2, mean, var, eps=eps, axis=view.feature))
    return affine(y, scale, bias, feature_axes)


def affine(y: Any, scale: Any, bias: Any, feature_axes: Sequence[int]) -> Any:
    """``y * scale + bias`` with ``scale``/``bias`` laid out along ``feature_axes`` (Flax's layout)."""
    feature_shape = tuple(y.shape[i] if i in feature_axes else 1 for i in range(y.ndim))
    if scale is not None:
        y = y * jnp.reshape(jnp.asarray(scale, y.dtype), feature_shape)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, y.dtype), feature_shape)
    return y
