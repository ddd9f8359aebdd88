"""Preprocessing layers fitted with ``adapt()``: ``Standardize`` (z-scores) and ``MinMaxScale``.

``adapt`` accepts a NumPy array, a backend tensor, a ``tf.data.Dataset`` or any iterable of
batches (``(x, y)`` tuples use ``x``). Statistics are gathered chunk by chunk in float64 with
``normkit.Moments`` (Chan's merge, exact to round-off against the whole data) and stored as
non-trainable weights, so they are saved and loaded with the model. A dask array is reduced where it
lives (on a dask.distributed cluster when a Client is active): one graph, one compute, each chunk's
``Moments.from_array`` in float64 merged pairwise with ``Moments.merge``.
"""

from __future__ import annotations

import itertools
from typing import Any

import keras
import numpy as np

import normkit
from normkit_keras._backend import backend_namespace, cast, dtype_name, in_compute_dtype, native

__all__ = ["Standardize", "MinMaxScale"]

_CHUNK_ROWS = 4096


def _to_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, (tuple, list)) and batch and not np.isscalar(batch[0]):
        batch = batch[0]
    if hasattr(batch, "detach"):  # torch
        batch = batch.detach().cpu()
    return np.asarray(keras.ops.convert_to_numpy(batch) if not isinstance(batch, np.ndarray) else batch, np.float64)


def _shape_and_batches(data: Any) -> tuple[tuple, Any]:
    """``(input shape, float64 NumPy batches)`` of ``data``, as ``keras.layers.Normalization.adapt`` reads it.

    An array is one batch (a rank-1 array: one sample, as Keras's), cut along axis 0 so memory stays
    bounded; a ``tf.data.Dataset`` whose elements have rank 1 is batched by 128 (its elements are
    taken as samples), so a batched dataset of scalars has an unknown feature axis, as in Keras.
    """
    tf = _tf_if_loaded()
    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = _to_numpy(data)
        if array.ndim == 1:
            array = array[None]

        def chunks() -> Any:
            for start in range(0, max(array.shape[0], 1), _CHUNK_ROWS):
                yield array[start : start + _CHUNK_ROWS]

        return tuple(data.shape), chunks()
    if tf is not None and isinstance(data, tf.data.Dataset):
        def spec_shape(d: Any) -> tuple:
            spec = d.element_spec
            return tuple((spec[0] if isinstance(spec, tuple) else spec).shape)

        if len(spec_shape(data)) == 1:
            data = data.batch(128)
        return spec_shape(data), (_to_numpy(batch) for batch in data.as_numpy_iterator())
    if not hasattr(data, "__iter__"):
        raise TypeError(
            f"adapt() expects a NumPy array, a tensor, a tf.data.Dataset or an iterable of batches, got {type(data).__name__}"
        )
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise ValueError("adapt() received no data (an empty iterable or dataset)")
    first = _to_numpy(first)
    return tuple(first.shape), itertools.chain([first], (_to_numpy(b) for b in batches))


def _tf_if_loaded() -> Any:
    import sys

    return sys.modules.get("tensorflow")


def _is_dask_array(data: Any) -> bool:
    """True for a dask array (dask is never imported here: an array of it means it is loaded)."""
    import sys

    da = sys.modules.get("dask.array")
    return da is not None and isinstance(data, da.Array)


def _dask_moments(data: Any, axis: int | None) -> normkit.Moments:
    """``Moments`` of a dask array in ONE compute: each chunk's ``Moments.from_array`` in float64, merged
    pairwise with ``Moments.merge`` (one pass over the data; workers run only normkit and NumPy)."""
    import dask

    x = data.astype(np.float64)
    if axis is None:  # one feature of every value (0-d NumPy statistics decay to scalars when merged)
        x, feature = x.reshape((-1, 1)), -1
    else:
        x, feature = x.rechunk({axis % x.ndim: -1}), axis  # every chunk holds all features
    shapes = itertools.product(*x.chunks)
    parts = [dask.delayed(normkit.Moments.from_array)(block, axis=feature)
             for block, shape in zip(x.to_delayed().ravel(), shapes) if 0 not in shape]
    if not parts:
        raise ValueError(f"adapt() received a dask array with no values (shape {tuple(data.shape)})")
    while len(parts) > 1:
        merged = [dask.delayed(normkit.Moments.merge)(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + parts[len(merged) * 2:]
    (total,) = dask.compute(parts[0])
    if axis is None:
        total = normkit.Moments(*(v if v is None or np.ndim(v) == 0 else np.reshape(v, ())
                                  for v in (total.count, total.mean, total.m2, total.min, total.max)))
    return total


class _AdaptedLayer(keras.layers.Layer):
    """Shared build / adapt / invert / config for layers holding per-feature statistics along ``axis`` (None: one scalar)."""

    _stat_names: tuple[tuple[str, str], ...] = ()

    def __init__(self, axis: int | None = -1, invert: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int (the feature axis) or None, got {axis!r}")
        self.axis = axis
        self.invert = bool(invert)
        self.supports_masking = True
        self._given: dict[str, Any] = {}

    def build(self, input_shape):
        if self.axis is None:
            shape: tuple = ()
        else:
            if not -len(input_shape) <= self.axis < len(input_shape):
                raise ValueError(
                    "All `axis` values must be in the range [-ndim, ndim). "
                    f"Received inputs with ndim={len(input_shape)}, while axis={self.axis}"
                )
            shape = (input_shape[self.axis],)
            if shape[0] is None:
                raise ValueError(
                    "All `axis` values to be kept must have a known shape. "
                    f"Received axis={self.axis}, inputs.shape={tuple(input_shape)}, "
                    f"with unknown axis at index {self.axis % len(input_shape)}"
                )
        for name, initializer in self._stat_names:
            given = self._given.get(name)
            if given is not None:
                initializer = keras.initializers.Constant(np.broadcast_to(np.asarray(given, np.float64), shape))
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer=initializer, trainable=False))

    def adapt(self, data: Any) -> None:
        """Fit the statistics to ``data`` (replacing earlier ones), merging one batch at a time."""
        if _is_dask_array(data):
            self._adapt_dask(data)
            return
        input_shape, chunks = _shape_and_batches(data)
        if not self.built:
            self.build((None,) + tuple(input_shape[1:]) if len(input_shape) > 1 else input_shape)
        total = None
        for chunk in chunks:
            if self.axis is not None and chunk.shape[self.axis] != self._feature_count():
                raise ValueError(
                    f"adapt() got a batch of shape {chunk.shape} whose feature axis {self.axis} has "
                    f"{chunk.shape[self.axis]} entries; the layer has {self._feature_count()}"
                )
            if chunk.size == 0:
                continue
            if self.axis is None:  # one statistic over everything: one feature of a column
                part = normkit.Moments.from_array(np.reshape(chunk, (-1, 1)), axis=-1)
            else:
                part = normkit.Moments.from_array(chunk, axis=self.axis)
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("adapt() received no data (an empty iterable, dataset or only empty batches)")
        self._assign(total)

    def _adapt_dask(self, data: Any) -> None:
        """A dask array reduced on its scheduler; shapes read as for a NumPy array (rank 1: one sample)."""
        shape = tuple(data.shape)
        if not self.built:
            self.build((None,) + shape[1:] if len(shape) > 1 else shape)
        if data.ndim == 1:
            data = data[None]
        if self.axis is not None and data.shape[self.axis] != self._feature_count():
            raise ValueError(
                f"adapt() got a dask array of shape {shape} whose feature axis {self.axis} has "
                f"{data.shape[self.axis]} entries; the layer has {self._feature_count()}"
            )
        self._assign(_dask_moments(data, self.axis))

    def _feature_count(self) -> int:
        return int(getattr(self, self._stat_names[0][0]).shape[0])

    def _assign(self, moments: normkit.Moments) -> None:
        raise NotImplementedError

    def _inputs(self, inputs):
        xp = backend_namespace()
        return xp, in_compute_dtype(xp, inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "invert": self.invert}


def _given_statistics(first: Any, second: Any, names: tuple[str, str], axis: int | None) -> dict[str, Any]:
    """Statistics passed to the constructor (both or neither, same shape, at most one value per feature)."""
    if (first is None) != (second is None):
        raise ValueError(
            f"When setting values directly, both `{names[0]}` and `{names[1]}` must be set. "
            f"Received: {names[0]}={first} and {names[1]}={second}"
        )
    if first is None:
        return {}
    if np.shape(first) != np.shape(second):
        raise ValueError(
            f"When setting values directly, `{names[0]}` and `{names[1]}` must have the same shape. "
            f"Received: {names[0]} shape {np.shape(first)} and {names[1]} shape {np.shape(second)}"
        )
    rank = 0 if axis is None else 1
    if len(np.shape(first)) > rank:
        raise ValueError(
            f"The rank of `{names[0]}` must be less than or equal to the number of axes ({rank}). "
            f"Received: {names[0]} shape {np.shape(first)} for axis {axis}"
        )
    return {names[0]: first, names[1]: second}


def _to_config(value: Any) -> Any:
    return None if value is None else np.asarray(value).tolist()


@keras.saving.register_keras_serializable(package="normkit")
class Standardize(_AdaptedLayer):
    """``(x - mean) / sqrt(variance)`` per feature along ``axis`` (population variance), or its inverse.

    Like ``keras.layers.Normalization``: statistics come from ``adapt()`` or are given as
    ``mean=`` and ``variance=``; ``invert=True`` maps z-scores back, ``x = z * std + mean``. Unlike
    it, a constant feature gives 0 (its std is treated as 1, and so is it when inverting) and the
    statistics are merged exactly in float64. Weights: ``mean``, ``variance``.
    """

    _stat_names = (("mean", "zeros"), ("variance", "ones"))

    def __init__(self, axis: int | None = -1, mean: Any = None, variance: Any = None, invert: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(axis=axis, invert=invert, **kwargs)
        self._given = _given_statistics(mean, variance, ("mean", "variance"), axis)
        self.input_mean, self.input_variance = mean, variance

    def _assign(self, moments: normkit.Moments) -> None:
        self.mean.assign(np.reshape(moments.mean, self.mean.shape))
        self.variance.assign(np.reshape(moments.var, self.variance.shape))

    def call(self, inputs):
        xp, x = self._inputs(inputs)
        dtype = dtype_name(x)
        mean = cast(xp, native(self.mean), dtype)
        std = xp.sqrt(cast(xp, native(self.variance), dtype))
        if self.invert:
            shape = _feature_shape(x, self.axis)
            std = xp.where(xp.equal(std, xp.zeros_like(std)), xp.ones_like(std), std)
            return x * xp.reshape(std, shape) + xp.reshape(mean, shape)
        return normkit.standardize(x, axis=self.axis, mean=mean, std=std, xp=xp)

    def get_config(self):
        return {**super().get_config(), "mean": _to_config(self.input_mean), "variance": _to_config(self.input_variance)}


@keras.saving.register_keras_serializable(package="normkit")
class MinMaxScale(_AdaptedLayer):
    """``lo + (x - data_min) / (data_max - data_min) * (hi - lo)`` per feature, fitted by ``adapt()``, or its inverse.

    A constant feature maps to ``lo`` (and back to its value with ``invert=True``). Weights:
    ``data_min``, ``data_max``.
    """

    _stat_names = (("data_min", "zeros"), ("data_max", "ones"))

    def __init__(self, feature_range=(0.0, 1.0), axis: int | None = -1, invert: bool = False, **kwargs: Any) -> None:
        super().__init__(axis=axis, invert=invert, **kwargs)
        lo, hi = feature_range
        if not float(lo) < float(hi):
            raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
        self.feature_range = (float(lo), float(hi))

    def _assign(self, moments: normkit.Moments) -> None:
        self.data_min.assign(np.reshape(moments.min, self.data_min.shape))
        self.data_max.assign(np.reshape(moments.max, self.data_max.shape))

    def call(self, inputs):
        xp, x = self._inputs(inputs)
        dtype = dtype_name(x)
        data_min, data_max = cast(xp, native(self.data_min), dtype), cast(xp, native(self.data_max), dtype)
        if self.invert:
            lo, hi = self.feature_range
            shape = _feature_shape(x, self.axis)
            return (x - lo) * xp.reshape((data_max - data_min) / (hi - lo), shape) + xp.reshape(data_min, shape)
        return normkit.min_max_scale(x, axis=self.axis, feature_range=self.feature_range, data_min=data_min,
                                     data_max=data_max, xp=xp)

    def get_config(self):
        return {**super().get_config(), "feature_range": list(self.feature_range)}


def _feature_shape(x: Any, axis: int | None) -> tuple:
    """The broadcast shape of per-feature statistics along ``axis`` (None: a scalar)."""
    if axis is None:
        return ()
    f = axis % x.ndim
    return tuple(-1 if i == f else 1 for i in range(x.ndim))
