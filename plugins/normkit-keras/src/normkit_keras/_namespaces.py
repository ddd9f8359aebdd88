"""Array API namespaces for the arrays normkit's core cannot name by itself: tf.Tensor and KerasTensor.

Only the functions normkit's core calls are provided, each with the standard's signature and
semantics (``axis`` a tuple, ``keepdims``, ``astype``, ``isdtype``); dtypes keep their width
(float64 stays float64). ``TensorFlowNamespace`` works eagerly, inside ``tf.function`` (shapes with
``None``) and under XLA; ``KerasOpsNamespace`` works on symbolic ``KerasTensor`` while a functional
model is built. Both are built on first use, so importing this module imports neither library.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["tensorflow_namespace", "keras_ops_namespace", "TensorFlowNamespace", "KerasOpsNamespace"]

_KINDS = ("bool", "signed integer", "unsigned integer", "integral", "real floating", "complex floating", "numeric")


def _axis(axis: Any) -> Any:
    if axis is None or isinstance(axis, int):
        return axis
    return list(axis)


class _Finfo:
    """``finfo`` in the standard's shape: bits, eps, max, min, smallest_normal, dtype."""

    def __init__(self, np_dtype: Any, dtype: Any) -> None:
        import ml_dtypes

        info = ml_dtypes.finfo(np_dtype)
        self.bits = int(info.bits)
        self.eps = float(info.eps)
        self.max = float(info.max)
        self.min = float(info.min)
        self.smallest_normal = float(info.smallest_normal)
        self.dtype = dtype


class TensorFlowNamespace:
    """The Array API subset normkit uses, over TensorFlow. One instance: ``tensorflow_namespace()``."""

    __array_api_version__ = "2023.12"
    # TensorFlow's float32 reduce_sum accumulates a long axis naively (1e6 rows at mean 1e4: 131 off):
    # normkit accumulates the first mean of float32 data in float64 here
    normkit_sums_naively = True

    def __init__(self) -> None:
        import tensorflow as tf

        self._tf = tf
        self.bool = tf.bool
        self.int8, self.int16, self.int32, self.int64 = tf.int8, tf.int16, tf.int32, tf.int64
        self.uint8, self.uint16, self.uint32, self.uint64 = tf.uint8, tf.uint16, tf.uint32, tf.uint64
        self.float16, self.bfloat16, self.float32, self.float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
        self.complex64, self.complex128 = tf.complex64, tf.complex128

    def __repr__(self) -> str:
        return "<normkit_keras TensorFlow namespace>"

    # dtypes -----------------------------------------------------------------------------------
    def _dtype(self, dtype: Any) -> Any:
        return self._tf.as_dtype(dtype)

    def isdtype(self, dtype: Any, kind: Any) -> bool:
        """The standard's ``isdtype``: ``kind`` is a dtype, one of the kind names, or a tuple of them."""
        if isinstance(kind, tuple):
            return any(self.isdtype(dtype, k) for k in kind)
        d = self._dtype(dtype)
        if not isinstance(kind, str):
            return d == self._dtype(kind)
        if kind not in _KINDS:
            raise ValueError(f"isdtype: unknown kind {kind!r}; expected a dtype or one of {_KINDS}")
        if kind == "bool":
            return d == self._tf.bool
        if kind == "signed integer":
            return d.is_integer and not d.is_unsigned
        if kind == "unsigned integer":
            return d.is_integer and d.is_unsigned
        if kind == "integral":
            return d.is_integer
        if kind == "real floating":
            return d.is_floating
        if kind == "complex floating":
            return d.is_complex
        return (d.is_integer or d.is_floating or d.is_complex) and d != self._tf.bool

    def finfo(self, dtype: Any) -> _Finfo:
        d = self._dtype(getattr(dtype, "dtype", dtype))
        return _Finfo(d.as_numpy_dtype, d)

    def astype(self, x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
        return self._tf.cast(x, self._dtype(dtype))

    # creation ---------------------------------------------------------------------------------
    def asarray(self, obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
        tf = self._tf
        dtype = None if dtype is None else self._dtype(dtype)

        def convert() -> Any:
            if dtype is not None and _is_tf(obj):
                return tf.cast(obj, dtype)
            return tf.convert_to_tensor(obj, dtype=dtype)

        if device:
            with tf.device(device):
                return convert()
        return convert()

    def ones_like(self, x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
        return self._tf.ones_like(x, dtype=None if dtype is None else self._dtype(dtype))

    def zeros_like(self, x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
        return self._tf.zeros_like(x, dtype=None if dtype is None else self._dtype(dtype))

    # shapes -----------------------------------------------------------------------------------
    def reshape(self, x: Any, /, shape: Any, *, copy: Any = None) -> Any:
        return self._tf.reshape(x, [-1 if d is None else d for d in shape])

    def broadcast_to(self, x: Any, /, shape: Any) -> Any:
        """Standard ``broadcast_to``; inside ``tf.function`` an unknown (None) target dimension is taken from
        ``x``'s run-time shape, so ``x`` must already have it (the core broadcasts a mask of x's own batch
        shape against ``x.shape``)."""
        dims = list(shape)
        if all(d is not None for d in dims):
            return self._tf.broadcast_to(x, dims)
        tf = self._tf
        offset = len(dims) - len(x.shape)
        runtime = tf.shape(x)
        full = []
        for i, d in enumerate(dims):
            if d is not None:
                full.append(d)
            elif i >= offset:
                full.append(runtime[i - offset])
            else:
                raise ValueError(f"broadcast_to: dimension {i} of {tuple(dims)} is unknown and x of shape {tuple(x.shape)} lacks it")
        return tf.broadcast_to(x, tf.stack([tf.cast(d, tf.int32) for d in full]))

    def expand_dims(self, x: Any, /, *, axis: int = 0) -> Any:
        return self._tf.expand_dims(x, axis)

    def squeeze(self, x: Any, /, axis: Any) -> Any:
        return self._tf.squeeze(x, axis=_axis(axis) if not isinstance(axis, int) else [axis])

    # elementwise ------------------------------------------------------------------------------
    def sqrt(self, x: Any, /) -> Any:
        return self._tf.sqrt(x)

    def where(self, condition: Any, x1: Any, x2: Any, /) -> Any:
        return self._tf.where(condition, x1, x2)

    def equal(self, x1: Any, x2: Any, /) -> Any:
        return self._tf.equal(x1, x2)

    def maximum(self, x1: Any, x2: Any, /) -> Any:
        return self._tf.maximum(x1, x2)

    def minimum(self, x1: Any, x2: Any, /) -> Any:
        return self._tf.minimum(x1, x2)

    # reductions -------------------------------------------------------------------------------
    def mean(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._tf.reduce_mean(x, axis=_axis(axis), keepdims=keepdims)

    def sum(self, x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
        if dtype is not None:
            x = self._tf.cast(x, self._dtype(dtype))
        return self._tf.reduce_sum(x, axis=_axis(axis), keepdims=keepdims)

    def min(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._tf.reduce_min(x, axis=_axis(axis), keepdims=keepdims)

    def max(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._tf.reduce_max(x, axis=_axis(axis), keepdims=keepdims)

    # normkit extensions -----------------------------------------------------------------------
    def stop_gradient(self, x: Any, /) -> Any:
        return self._tf.stop_gradient(x)

    def normkit_device(self, x: Any) -> Any:
        """The device string of ``x``; ``None`` inside a graph, where TensorFlow places ops itself."""
        return getattr(x, "device", None) or None


def _is_tf(obj: Any) -> bool:
    return type(obj).__module__.startswith(("tensorflow", "keras"))


class KerasOpsNamespace:
    """The same subset over ``keras.ops``, for symbolic ``KerasTensor`` (functional model construction)."""

    __array_api_version__ = "2023.12"

    def __init__(self) -> None:
        from keras import backend, ops

        self._ops = ops
        self._standardize = backend.standardize_dtype
        for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                     "float16", "bfloat16", "float32", "float64", "complex64", "complex128"):
            setattr(self, name, name)

    def __repr__(self) -> str:
        return "<normkit_keras keras.ops namespace>"

    def isdtype(self, dtype: Any, kind: Any) -> bool:
        if isinstance(kind, tuple):
            return any(self.isdtype(dtype, k) for k in kind)
        d = self._standardize(dtype)
        if not (isinstance(kind, str) and kind in _KINDS):
            return d == self._standardize(kind)
        if kind == "bool":
            return d == "bool"
        if kind == "signed integer":
            return d.startswith("int")
        if kind == "unsigned integer":
            return d.startswith("uint")
        if kind == "integral":
            return d.startswith(("int", "uint"))
        if kind == "real floating":
            return d.startswith(("float", "bfloat"))
        if kind == "complex floating":
            return d.startswith("complex")
        return d != "bool"

    def finfo(self, dtype: Any) -> _Finfo:
        import ml_dtypes
        import numpy as np

        d = self._standardize(getattr(dtype, "dtype", dtype))
        np_dtype = ml_dtypes.bfloat16 if d == "bfloat16" else np.dtype(d)
        return _Finfo(np_dtype, d)

    def astype(self, x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
        return self._ops.cast(x, self._standardize(dtype))

    def asarray(self, obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
        return self._ops.convert_to_tensor(obj, dtype=None if dtype is None else self._standardize(dtype))

    def ones_like(self, x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
        return self._ops.ones_like(x, dtype=dtype)

    def zeros_like(self, x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
        return self._ops.zeros_like(x, dtype=dtype)

    def reshape(self, x: Any, /, shape: Any, *, copy: Any = None) -> Any:
        return self._ops.reshape(x, tuple(-1 if d is None else d for d in shape))

    def broadcast_to(self, x: Any, /, shape: Any) -> Any:
        return self._ops.broadcast_to(x, tuple(shape))

    def expand_dims(self, x: Any, /, *, axis: int = 0) -> Any:
        return self._ops.expand_dims(x, axis)

    def squeeze(self, x: Any, /, axis: Any) -> Any:
        return self._ops.squeeze(x, axis=axis)

    def sqrt(self, x: Any, /) -> Any:
        return self._ops.sqrt(x)

    def where(self, condition: Any, x1: Any, x2: Any, /) -> Any:
        return self._ops.where(condition, x1, x2)

    def equal(self, x1: Any, x2: Any, /) -> Any:
        return self._ops.equal(x1, x2)

    def maximum(self, x1: Any, x2: Any, /) -> Any:
        return self._ops.maximum(x1, x2)

    def minimum(self, x1: Any, x2: Any, /) -> Any:
        return self._ops.minimum(x1, x2)

    def mean(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._ops.mean(x, axis=axis, keepdims=keepdims)

    def sum(self, x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
        if dtype is not None:
            x = self.astype(x, dtype)
        return self._ops.sum(x, axis=axis, keepdims=keepdims)

    def min(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._ops.min(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
        return self._ops.max(x, axis=axis, keepdims=keepdims)

    def stop_gradient(self, x: Any, /) -> Any:
        return self._ops.stop_gradient(x)

    def normkit_device(self, x: Any) -> Any:
        return None


@functools.lru_cache(maxsize=None)
def tensorflow_namespace() -> TensorFlowNamespace:
    """The one TensorFlow namespace of this process (namespaces compare by identity in normkit)."""
    return TensorFlowNamespace()


@functools.lru_cache(maxsize=None)
def keras_ops_namespace() -> KerasOpsNamespace:
    """The one keras.ops namespace of this process."""
    return KerasOpsNamespace()
