"""Per-sample normalization layers: each subclasses its ``keras.layers`` twin and computes ``call`` with normkit.

LayerNormalization  -> ``normkit.layer_norm`` (``axis``: the axes normalized over)
GroupNormalization  -> ``normkit.group_norm`` (``axis``: the channel axis; ``groups=-1``: instance norm)
RMSNormalization    -> ``normkit.rms_norm``   (weight ``scale``)
UnitNormalization   -> ``x / max(||x||_2, 1e-12)`` over ``axis`` (``keras.ops.normalize``'s definition)

Constructors, weights and configs are Keras's. Half precision is computed in float32; integer
inputs are computed and returned in the layer's compute dtype (Keras's layers round the
normalized values back to the integer dtype first, which loses them).
"""

from __future__ import annotations

import keras

import normkit
from normkit_keras._backend import backend_namespace, cast, dtype_name, in_compute_dtype, native

__all__ = ["LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization"]


def _floating(name: str) -> bool:
    return name.startswith(("float", "bfloat"))


def _out_dtype(layer: keras.layers.Layer, inputs) -> str:
    """The input's dtype for floating inputs (Keras casts back to it), else the compute dtype."""
    name = dtype_name(inputs)
    return name if _floating(name) else layer.compute_dtype


def _weight(xp, variable, dtype):
    return None if variable is None else cast(xp, native(variable), dtype)


def _axes(axis) -> tuple[int, ...]:
    return tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)


@keras.saving.register_keras_serializable(package="normkit")
class LayerNormalization(keras.layers.LayerNormalization):
    """``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``, moments per sample over ``axis`` (int or list).

    ``rms_scaling=True`` (deprecated in Keras) scales by ``rsqrt(var + epsilon)`` without
    centering and drops ``beta``, exactly as Keras does.
    """

    def call(self, inputs):
        xp = backend_namespace(layer=self)
        x = in_compute_dtype(xp, inputs)
        dtype = dtype_name(x)
        gamma, beta = _weight(xp, self.gamma, dtype), _weight(xp, self.beta, dtype)
        axes = _axes(self.axis)
        if self.rms_scaling:
            _, var = normkit.moments(x, axis=axes, keepdims=True, xp=xp)
            y = x * (1.0 / xp.sqrt(var + self.epsilon))
            if gamma is not None:
                norm = {a % x.ndim for a in axes}
                y = y * xp.reshape(gamma, tuple(x.shape[i] if i in norm else 1 for i in range(x.ndim)))
        else:
            y = normkit.layer_norm(x, gamma, beta, axis=axes, eps=self.epsilon, xp=xp)
        return cast(xp, cast(xp, y, _out_dtype(self, inputs)), self.compute_dtype)


@keras.saving.register_keras_serializable(package="normkit")
class GroupNormalization(keras.layers.GroupNormalization):
    """Per sample, channels (``axis``) split into ``groups`` groups of consecutive channels, each normalized
    over its channels and every non-batch axis; ``groups=-1`` makes one group per channel (instance norm)."""

    def call(self, inputs):
        xp = backend_namespace(layer=self)
        x = in_compute_dtype(xp, inputs)
        dtype = dtype_name(x)
        gamma, beta = _weight(xp, self.gamma, dtype), _weight(xp, self.beta, dtype)
        y = normkit.group_norm(x, self.groups, gamma, beta, axis=self.axis, eps=self.epsilon, xp=xp)
        return cast(xp, cast(xp, y, _out_dtype(self, inputs)), self.compute_dtype)


@keras.saving.register_keras_serializable(package="normkit")
class RMSNormalization(keras.layers.RMSNormalization):
    """``y = x / sqrt(mean(x**2 over axis) + epsilon) * scale``; one weight, ``scale``, initialized to ones."""

    def call(self, x):
        xp = backend_namespace(layer=self)
        xc = in_compute_dtype(xp, x)
        y = normkit.rms_norm(xc, _weight(xp, self.scale, dtype_name(xc)), axis=_axes(self.axis), eps=self.epsilon,
                             xp=xp)
        return cast(xp, y, _out_dtype(self, x))


@keras.saving.register_keras_serializable(package="normkit")
class UnitNormalization(keras.layers.UnitNormalization):
    """``y = x / max(||x||_2, 1e-12)`` over ``axis`` (int or list), per sample; no weights; computed in float32 for
    half precision, returned in the layer's compute dtype (float16 under mixed precision), as Keras's."""

    def call(self, inputs):
        xp = backend_namespace(layer=self)
        x = in_compute_dtype(xp, inputs)
        axes = tuple(a % x.ndim for a in _axes(self.axis))
        square_sum = xp.sum(x * x, axis=axes, keepdims=True)
        inv_norm = xp.minimum(1.0 / xp.sqrt(square_sum), xp.asarray(1e12, dtype=square_sum.dtype))
        return cast(xp, cast(xp, x * inv_norm, _out_dtype(self, inputs)), self.compute_dtype)
