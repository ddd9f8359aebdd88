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
from normkit_keras._backend import backend_namespace, cast, dtype_name, native

__all__ = ["Standardize", "MinMaxScale"]

_CHUNK_ROWS = 4096


def _to_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, (tuple, list)) and batch and not np.isscalar(batch[0]):
        batch = batch[0]
    if hasattr(batch, "detach"):  # torch
        batch = batch.detach().cpu()
    return np.asarray(keras.ops.convert_to_numpy(batch) if not isinstance(batch, np.ndarray) else batch, np.float64)


def _batches(data: Any):
    """Float64 NumPy chunks of ``data``; a single array is cut along axis 0 so memory stays bounded."""
    tf = _tf_if_loaded()
    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = _to_numpy(data)
        if array.ndim == 0:
            raise ValueError("adapt() needs an array of rank >= 1, got a scalar")
        for start in range(0, max(array.shape[0], 1), _CHUNK_ROWS):
            yield array[start : start + _CHUNK_ROWS]
        return
    if tf is not None and isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        x_spec = spec[0] if isinstance(spec, tuple) else spec
        if len(x_spec.shape) == 1:
            data = data.batch(128)
        data = data.as_numpy_iterator()
    if not hasattr(data, "__iter__"):
        raise TypeError(
            f"adapt() expects a NumPy array, a tensor, a tf.data.Dataset or an iterable of batches, got {type(data).__name__}"
        )
    for batch in data:
        yield _to_numpy(batch)


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
    """Shared build / adapt / config for layers holding per-feature statistics along ``axis`` (None: one scalar)."""

    _stat_names: tuple[tuple[str, str], ...] = ()

    def __init__(self, axis: int | None = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int (the feature axis) or None, got {axis!r}")
        self.axis = axis
        self.supports_masking = True

    def build(self, input_shape):
        if self.axis is None:
            shape: tuple = ()
        else:
            if not -len(input_shape) <= self.axis < len(input_shape):
                raise ValueError(f"axis={self.axis} is out of range for inputs of shape {tuple(input_shape)}")
            shape = (input_shape[self.axis],)
            if shape[0] is None:
                raise ValueError(f"the feature axis {self.axis} must have a known size, got input shape {tuple(input_shape)}")
        for name, initializer in self._stat_names:
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer=initializer, trainable=False))
        self._xp = backend_namespace()

    def adapt(self, data: Any) -> None:
        """Fit the statistics to ``data`` (replacing earlier ones), merging one batch at a time."""
        if _is_dask_array(data):
            self._adapt_dask(data)
            return
        chunks = iter(_batches(data))
        first = next(chunks, None)
        if first is None:
            raise ValueError("adapt() received no data (an empty iterable or dataset)")
        if not self.built:
            self.build((None,) + tuple(first.shape[1:]))
        total = None
        for chunk in itertools.chain([first], chunks):
            if self.axis is not None and chunk.shape[self.axis] != self._feature_count():
                raise ValueError(
                    f"adapt() got a batch of shape {chunk.shape} whose feature axis {self.axis} has "
                    f"{chunk.shape[self.axis]} entries; the layer has {self._feature_count()}"
                )
            if chunk.size == 0:
                continue
            part = normkit.Moments.from_array(chunk, axis=self.axis)
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("adapt() received only empty batches")
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
        xp = self._xp
        if not xp.isdtype(inputs.dtype, "real floating"):
            inputs = xp.astype(inputs, getattr(xp, self.compute_dtype))
        return xp, inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package="normkit")
class Standardize(_AdaptedLayer):
    """``(x - mean) / std`` per feature along ``axis``, ``std`` the population std fitted by ``adapt()``.

    Like ``keras.layers.Normalization`` after ``adapt``, but a constant feature gives 0 (its std
    is treated as 1) and the statistics are merged exactly in float64. Weights: ``mean``, ``variance``.
    """

    _stat_names = (("mean", "zeros"), ("variance", "ones"))

    def _assign(self, moments: normkit.Moments) -> None:
        self.mean.assign(np.asarray(moments.mean))
        self.variance.assign(np.asarray(moments.var))

    def call(self, inputs):
        xp, x = self._inputs(inputs)
        dtype = dtype_name(x)
        mean = cast(xp, native(self.mean), dtype)
        std = xp.sqrt(cast(xp, native(self.variance), dtype))
        return normkit.standardize(x, axis=self.axis, mean=mean, std=std, xp=xp)


@keras.saving.register_keras_serializable(package="normkit")
class MinMaxScale(_AdaptedLayer):
    """``lo + (x - data_min) / (data_max - data_min) * (hi - lo)`` per feature, fitted by ``adapt()``.

    A constant feature maps to ``lo``. Weights: ``data_min``, ``data_max``.
    """

    _stat_names = (("data_min", "zeros"), ("data_max", "ones"))

    def __init__(self, feature_range=(0.0, 1.0), axis: int | None = -1, **kwargs: Any) -> None:
        super().__init__(axis=axis, **kwargs)
        lo, hi = feature_range
        if not float(lo) < float(hi):
            raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
        self.feature_range = (float(lo), float(hi))

    def _assign(self, moments: normkit.Moments) -> None:
        self.data_min.assign(np.asarray(moments.min))
        self.data_max.assign(np.asarray(moments.max))

    def call(self, inputs):
        xp, x = self._inputs(inputs)
        dtype = dtype_name(x)
        return normkit.min_max_scale(
            x, axis=self.axis, feature_range=self.feature_range,
            data_min=cast(xp, native(self.data_min), dtype), data_max=cast(xp, native(self.data_max), dtype), xp=xp,
        )

    def get_config(self):
        return {**super().get_config(), "feature_range": list(self.feature_range)}
