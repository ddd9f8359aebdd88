"""Preprocessing layers fitted with ``adapt()``: ``Standardize`` (z-scores) and ``MinMaxScale``.

``Standardize`` subclasses ``keras.layers.Normalization`` (its constructor, ``axis`` int, tuple or
None, weights ``mean``/``variance``/``count``, config and ``tf.data`` use are Keras's); ``adapt`` and
``call`` are normkit's. ``MinMaxScale`` has no Keras twin: it is a plain ``keras.layers.Layer``.
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

    An array is one batch (a rank-1 array: one sample, as Keras's; ``_rows`` reads it so), cut along
    axis 0 so memory stays bounded; a ``tf.data.Dataset`` whose elements have rank 1 is batched by 128
    (its elements are taken as samples), so a batched dataset of scalars has an unknown feature axis,
    as in Keras. Every batch of an iterable must have a ``.shape`` (Keras's rule).
    """
    tf = _tf_if_loaded()
    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = _to_numpy(data)

        def chunks() -> Any:
            if array.ndim < 2:
                yield array
                return
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
        raise ValueError("adapt() received no data (an empty iterable or dataset): expected at least one batch")
    if isinstance(first, tuple) and first:
        first = first[0]
    if not hasattr(first, "shape"):
        raise TypeError(
            "adapt() expects an iterable that yields arrays or tensors with a `.shape` attribute, got an element "
            f"of type {type(first).__name__}")
    first = _to_numpy(first)
    return tuple(first.shape), itertools.chain([first], (_to_numpy(b) for b in batches))


def _rows(chunk: np.ndarray, keep: tuple[int, ...]) -> np.ndarray:
    """``chunk`` as (samples, features): the kept axes ``keep`` last and flattened (none kept: one feature)."""
    rest = tuple(i for i in range(chunk.ndim) if i not in keep)
    features = 1
    for i in keep:
        features *= int(chunk.shape[i])
    return np.reshape(np.transpose(chunk, rest + keep), (-1, features))


def _check_batch(shape: tuple, keep: tuple[int, ...], built: tuple, what: str, axis: Any) -> None:
    """A batch's kept axes must be the ones the layer was built with (the message names both shapes)."""
    if len(shape) != len(built):
        raise ValueError(f"adapt() got {what} of shape {tuple(shape)}, an incompatible shape: the layer was built "
                         f"with input_shape={tuple(built)} (rank {len(built)})")
    if any(shape[d] != built[d] for d in keep if built[d] is not None):
        got, want = tuple(shape[d] for d in keep), tuple(built[d] for d in keep)
        got, want = (got[0], want[0]) if len(keep) == 1 else (got, want)
        raise ValueError(f"adapt() got {what} of shape {tuple(shape)}, an incompatible shape: its feature axis "
                         f"{axis} has {got} entries; the layer has {want} (built with input_shape={tuple(built)})")


def _fit(chunks: Any, keep: tuple[int, ...], built: tuple, axis: Any) -> normkit.Moments:
    """The merged float64 ``Moments`` of every chunk, one feature per position of the kept axes."""
    total = None
    for chunk in chunks:
        _check_batch(chunk.shape, keep, built, "a batch", axis)
        if chunk.size == 0:
            continue
        part = normkit.Moments.from_array(_rows(chunk, keep), axis=-1)
        total = part if total is None else total.merge(part)
    if total is None:
        raise ValueError("adapt() received no data (an empty iterable, dataset or only empty batches)")
    return total


def _unobserved_as_nan(moments: normkit.Moments, what: str) -> tuple[np.ndarray, ...]:
    """``(observed, *statistics)`` with NaN where a feature had no value but NaN (scikit-learn's scalers store NaN
    there, and their output is NaN), and a RuntimeWarning naming those features: never a silent pass-through."""
    observed = np.asarray(moments.observed, np.float64) * np.ones(np.shape(moments.mean))
    empty = observed == 0
    if empty.any():
        import warnings

        warnings.warn(f"{what}.adapt(): feature(s) {np.flatnonzero(empty).tolist()} had only NaN values; their "
                      "statistics are NaN and so is their output (as scikit-learn's scalers)", RuntimeWarning,
                      stacklevel=3)
    return (observed, *(np.where(empty, np.nan, np.asarray(v, np.float64))
                        for v in (moments.mean, moments.var, moments.min, moments.max)))


def _tf_if_loaded() -> Any:
    import sys

    return sys.modules.get("tensorflow")


def _is_dask_array(data: Any) -> bool:
    """True for a dask array (dask is never imported here: an array of it means it is loaded)."""
    import sys

    da = sys.modules.get("dask.array")
    return da is not None and isinstance(data, da.Array)


def _dask_moments(data: Any, keep: tuple[int, ...]) -> normkit.Moments:
    """``Moments`` of a dask array in ONE compute: each chunk's ``Moments.from_array`` in float64, merged
    pairwise with ``Moments.merge`` (one pass over the data; workers run only normkit and NumPy); one
    feature per position of the kept axes ``keep`` (none: one feature of every value)."""
    import dask

    x = data.astype(np.float64)
    if data.ndim < 2 and keep:  # rank 1: one sample
        x = x[None]
        keep = (1,)
    if not keep:  # one feature of every value (0-d NumPy statistics decay to scalars when merged)
        x, feature = x.reshape((-1, 1)), -1
    elif keep == (x.ndim - 1,) and x.ndim == 2:
        x, feature = x.rechunk({1: -1}), -1  # every chunk holds all features
    else:
        rest = tuple(i for i in range(x.ndim) if i not in keep)
        x = x.transpose(rest + keep).rechunk({i: -1 for i in range(len(rest), x.ndim)})
        x, feature = x.reshape((-1, int(np.prod([data.shape[i] for i in keep])))), -1
    shapes = itertools.product(*x.chunks)
    parts = [dask.delayed(normkit.Moments.from_array)(block, axis=feature)
             for block, shape in zip(x.to_delayed().ravel(), shapes) if 0 not in shape]
    if not parts:
        raise ValueError(f"adapt() received a dask array with no values (shape {tuple(data.shape)})")
    while len(parts) > 1:
        merged = [dask.delayed(normkit.Moments.merge)(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + parts[len(merged) * 2:]
    (total,) = dask.compute(parts[0])
    return total


def _adapted_moments(layer: Any, data: Any, build: Any) -> normkit.Moments:
    """The float64 ``Moments`` of ``data`` for ``layer`` (built from the data's shape first when it is not):
    one feature per position of ``layer._kept_axes``; a dask array is reduced on its scheduler."""
    dask = _is_dask_array(data)
    shape, chunks = (tuple(data.shape), None) if dask else _shape_and_batches(data)
    if not layer.built:
        build(shape)
    built = tuple(layer._build_input_shape)
    keep = layer._kept_axes(len(built))
    axis = layer.axis[0] if isinstance(layer.axis, tuple) and len(layer.axis) == 1 else layer.axis
    _check_batch(shape, keep, built, "data", axis)
    return _dask_moments(data, keep) if dask else _fit(chunks, keep, built, axis)


class _AdaptedLayer(keras.layers.Layer):
    """Build / adapt / invert / config of a plain Layer holding per-feature statistics along ``axis`` (None: one
    scalar): ``MinMaxScale``'s base."""

    _stat_names: tuple[tuple[str, str], ...] = ()

    def __init__(self, axis: int | None = -1, invert: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int (the feature axis) or None, got {axis!r}")
        self.axis = axis
        self.invert = bool(invert)
        self.supports_masking = True

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
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer=initializer, trainable=False))
        self._build_input_shape = tuple(input_shape)

    def adapt(self, data: Any) -> None:
        """Fit the statistics to ``data`` (replacing earlier ones), merging one batch at a time."""
        self._assign(_adapted_moments(self, data, lambda shape: self.build(
            (None,) + tuple(shape[1:]) if len(shape) > 1 else shape)))

    def _kept_axes(self, rank: int) -> tuple[int, ...]:
        return () if self.axis is None else (self.axis % rank,)

    def _feature_count(self) -> int:
        return int(getattr(self, self._stat_names[0][0]).shape[0])

    def _assign(self, moments: normkit.Moments) -> None:
        raise NotImplementedError

    def _inputs(self, inputs):
        xp = backend_namespace(layer=self)
        return xp, in_compute_dtype(xp, inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "invert": self.invert}


def _statistics_dtype(layer: keras.layers.Layer) -> str:
    """The dtype statistics are applied in: float64 for a float64 layer, else float32 (half precision too)."""
    return "float64" if layer.compute_dtype == "float64" else "float32"


@keras.saving.register_keras_serializable(package="normkit")
class Standardize(keras.layers.Normalization):
    """``(x - mean) / sqrt(variance)`` per position of the kept ``axis`` (population variance), or its inverse.

    A ``keras.layers.Normalization``: constructor (``axis`` int, tuple or None; ``mean=``/``variance=``;
    ``invert=``), weights ``mean``, ``variance``, ``count`` (``adapt_mean``, ``adapt_variance``, ``count``),
    the broadcast ``layer.mean``/``layer.variance``, config and ``tf.data`` use (``ds.map(layer)`` on
    every backend) are Keras's. normkit's: ``adapt`` merges every batch exactly in float64 (Chan) and
    ignores NaN (a feature with only NaN gets NaN statistics, a warning, and NaN output, as
    scikit-learn's StandardScaler); ``count`` holds the samples read; the statistics are applied in
    float32 (float64 for a float64 layer), never rounded to float16 under mixed precision; a constant
    feature gives 0 (its std is taken as 1, also when inverting) where Keras divides by 1e-7.
    """

    def __init__(self, axis: Any = -1, mean: Any = None, variance: Any = None, invert: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(axis=axis, mean=mean, variance=variance, invert=invert, **kwargs)
        if any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in self.axis):
            raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
        self.axis = tuple(int(a) for a in self.axis)

    def build(self, input_shape):
        super().build(input_shape)
        if input_shape is not None and self.input_mean is not None:  # Keras rounds them to the compute dtype
            dtype = _statistics_dtype(self)
            self.mean = keras.ops.cast(keras.ops.broadcast_to(keras.ops.reshape(
                keras.ops.convert_to_tensor(np.asarray(self.input_mean, np.float64), dtype=dtype),
                self._given_shape()), self._broadcast_shape), dtype)
            self.variance = keras.ops.cast(keras.ops.broadcast_to(keras.ops.reshape(
                keras.ops.convert_to_tensor(np.asarray(self.input_variance, np.float64), dtype=dtype),
                self._given_shape()), self._broadcast_shape), dtype)

    def _given_shape(self) -> tuple:
        """Keras's reading of given statistics: their axes are the last kept axes (a scalar: every position)."""
        given = np.shape(self.input_mean)
        shape = [1] * len(self._broadcast_shape)
        for i in range(1, len(given) + 1):
            shape[self._keep_axis[-i]] = given[-i]
        return tuple(shape)

    def finalize_state(self):
        if self.input_mean is not None or not self.built:
            return
        dtype = _statistics_dtype(self)
        self.mean = keras.ops.cast(keras.ops.reshape(self.adapt_mean, self._broadcast_shape), dtype)
        self.variance = keras.ops.cast(keras.ops.reshape(self.adapt_variance, self._broadcast_shape), dtype)

    def _kept_axes(self, rank: int) -> tuple[int, ...]:
        return tuple(sorted(a % rank for a in self.axis))

    def adapt(self, data: Any) -> None:
        """Fit ``mean``/``variance`` to ``data`` (replacing earlier ones), exactly, one batch at a time."""
        if self.input_mean is not None:
            raise ValueError("adapt() cannot fit a Standardize given mean= and variance= (they are fixed); "
                             "construct it without them to adapt")
        moments = _adapted_moments(self, data, self.build)
        _, mean, var, _, _ = _unobserved_as_nan(moments, type(self).__name__)
        self.adapt_mean.assign(np.reshape(mean, self._mean_and_var_shape))
        self.adapt_variance.assign(np.reshape(var, self._mean_and_var_shape))
        rows = int(np.max(np.asarray(moments.count)))
        self.count.assign(min(rows, np.iinfo(np.int32).max))
        self.finalize_state()

    def call(self, inputs):
        if self.mean is None:
            raise ValueError("You must call `.build(input_shape)` on the layer before using it.")
        backend = self.backend.name  # "tensorflow" inside tf.data whatever the Keras backend
        xp = backend_namespace(backend, layer=self)
        x = in_compute_dtype(xp, self.backend.core.convert_to_tensor(inputs))
        dtype = dtype_name(x)
        if self.input_mean is None and backend == keras.backend.backend():  # the weights as they are now
            mean = xp.reshape(native(self.adapt_mean), tuple(self._broadcast_shape))
            variance = xp.reshape(native(self.adapt_variance), tuple(self._broadcast_shape))
        else:
            mean, variance = self.convert_weight(self.mean), self.convert_weight(self.variance)
        mean, std = cast(xp, mean, dtype), xp.sqrt(cast(xp, variance, dtype))
        std = xp.where(xp.equal(std, xp.zeros_like(std)), xp.ones_like(std), std)  # normkit.standardize's rule
        y = x * std + mean if self.invert else (x - mean) / std
        return cast(xp, y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="normkit")
class MinMaxScale(_AdaptedLayer):
    """``lo + (x - data_min) / (data_max - data_min) * (hi - lo)`` per feature, fitted by ``adapt()``, or its inverse.

    scikit-learn's ``MinMaxScaler`` as a layer. Keras has no layer with this math, so this one is a plain
    ``keras.layers.Layer`` (not a ``keras.layers.Normalization``); ``axis`` is an int or None. A constant
    feature maps to ``lo`` (and back to its value with ``invert=True``); a feature with only NaN gets NaN
    statistics, a warning and NaN output (as scikit-learn's). Weights: ``data_min``, ``data_max``.
    The output has the layer's compute dtype (float16 under mixed precision), computed in float32.
    """

    _stat_names = (("data_min", "zeros"), ("data_max", "ones"))

    def __init__(self, feature_range=(0.0, 1.0), axis: int | None = -1, invert: bool = False, **kwargs: Any) -> None:
        super().__init__(axis=axis, invert=invert, **kwargs)
        lo, hi = feature_range
        if not float(lo) < float(hi):
            raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
        self.feature_range = (float(lo), float(hi))

    def _assign(self, moments: normkit.Moments) -> None:
        _, _, _, data_min, data_max = _unobserved_as_nan(moments, type(self).__name__)
        self.data_min.assign(np.reshape(data_min, self.data_min.shape))
        self.data_max.assign(np.reshape(data_max, self.data_max.shape))

    def call(self, inputs):
        xp, x = self._inputs(inputs)
        dtype = dtype_name(x)
        data_min, data_max = cast(xp, native(self.data_min), dtype), cast(xp, native(self.data_max), dtype)
        if self.invert:
            lo, hi = self.feature_range
            shape = _feature_shape(x, self.axis)
            y = (x - lo) * xp.reshape((data_max - data_min) / (hi - lo), shape) + xp.reshape(data_min, shape)
        else:
            y = normkit.min_max_scale(x, axis=self.axis, feature_range=self.feature_range, data_min=data_min,
                                      data_max=data_max, xp=xp)
        return cast(xp, y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "feature_range": list(self.feature_range)}


def _feature_shape(x: Any, axis: int | None) -> tuple:
    """The broadcast shape of per-feature statistics along ``axis`` (None: a scalar)."""
    if axis is None:
        return ()
    f = axis % x.ndim
    return tuple(-1 if i == f else 1 for i in range(x.ndim))
