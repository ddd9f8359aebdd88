"""Per-sample normalization layers, drop-ins for their ``keras.layers`` namesakes.

LayerNormalization  -> ``normkit.layer_norm`` (``axis``: the axes normalized over)
GroupNormalization  -> ``normkit.group_norm`` (``axis``: the channel axis; ``groups=-1``: instance norm)
RMSNormalization    -> ``normkit.rms_norm``   (weight ``scale``)
UnitNormalization   -> ``x / max(||x||_2, 1e-12)`` over ``axis`` (``keras.ops.normalize``'s definition)

Arguments, defaults, weights and config are Keras 3.15's; half precision is computed in float32.
"""

from __future__ import annotations

import warnings

import keras
from keras import constraints, initializers, regularizers

import normkit
from normkit_keras._backend import backend_namespace, cast, dtype_name, in_compute_dtype, native

__all__ = ["LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization"]


def _check_axes(axis, input_shape):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    for a in axes:
        if a >= len(input_shape) or a < -len(input_shape):
            raise ValueError(f"Axis {a} is out of bounds for input shape {input_shape}. Received: axis={axis}")
    return input_shape


def _tuple_axis(axis):
    return tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)


@keras.saving.register_keras_serializable(package="normkit")
class LayerNormalization(keras.layers.Layer):
    """``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``, moments per sample over ``axis`` (int or list).

    ``rms_scaling=True`` (deprecated in Keras, accepted for old configs) scales by
    ``rsqrt(var + epsilon)`` without centering and drops ``beta``, exactly as Keras does.
    """

    def __init__(
        self,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        rms_scaling = kwargs.pop("rms_scaling", False)
        if rms_scaling:
            warnings.warn(
                "You passed `rms_scaling=True`, which is deprecated. This argument incorrectly scales the input "
                "by the variance, not the root mean square. To correctly use RMS Normalization, please use "
                "`keras.layers.RMSNormalization` (or normkit_keras.RMSNormalization) instead."
            )
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            self.axis = list(axis)
        elif isinstance(axis, int):
            self.axis = axis
        else:
            raise TypeError(f"Expected an int or a list/tuple of ints for the argument 'axis', but received: {axis!r}")
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.rms_scaling = rms_scaling
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.autocast = False

    def build(self, input_shape):
        if isinstance(self.axis, (list, tuple)):
            self.axis = sorted(self.axis)
            shape = tuple(input_shape[dim] for dim in self.axis)
        else:
            shape = (input_shape[self.axis],)
            self.axis = [self.axis]
        self.gamma = self.beta = None
        if self.scale or self.rms_scaling:
            self.gamma = self.add_weight(
                name="gamma", shape=shape, initializer=self.gamma_initializer, regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint, trainable=True, autocast=False,
            )
        if self.center and not self.rms_scaling:
            self.beta = self.add_weight(
                name="beta", shape=shape, initializer=self.beta_initializer, regularizer=self.beta_regularizer,
                constraint=self.beta_constraint, trainable=True, autocast=False,
            )
        self._xp = backend_namespace()

    def call(self, inputs):
        xp = self._xp
        x = in_compute_dtype(xp, inputs)
        dtype = dtype_name(x)
        gamma = None if self.gamma is None else cast(xp, native(self.gamma), dtype)
        beta = None if self.beta is None else cast(xp, native(self.beta), dtype)
        if self.rms_scaling:
            y = self._rms_scaling(xp, x, gamma)
        else:
            y = normkit.layer_norm(x, gamma, beta, axis=tuple(self.axis), eps=self.epsilon, xp=xp)
        return cast(xp, cast(xp, y, dtype_name(inputs)), self.compute_dtype)

    def _rms_scaling(self, xp, x, gamma):
        axes = tuple(a % len(x.shape) for a in self.axis)
        _, var = _moments(xp, x, axes)
        y = x * (1.0 / xp.sqrt(var + self.epsilon))
        if gamma is not None:
            y = y * xp.reshape(gamma, tuple(x.shape[i] if i in axes else 1 for i in range(len(x.shape))))
        return y

    def compute_output_shape(self, input_shape):
        return _check_axes(self.axis, input_shape)

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "rms_scaling": self.rms_scaling,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**super().get_config(), **config}


def _moments(xp, x, axes):
    """Shifted two-pass (mean, biased var) over ``axes`` with keepdims (the core's method, on ``xp``)."""
    return normkit.moments(x, axis=axes, keepdims=True, xp=xp)


@keras.saving.register_keras_serializable(package="normkit")
class GroupNormalization(keras.layers.Layer):
    """Per sample, channels (``axis``) split into ``groups`` groups of consecutive channels, each normalized
    over its channels and every non-batch axis; ``groups=-1`` makes one group per channel (instance norm)."""

    def __init__(
        self,
        groups=32,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        if not isinstance(groups, int) or (groups <= 0 and groups != -1):
            raise ValueError(
                "Received an invalid value for argument `groups`, expected a positive integer (or `-1` for "
                f"instance normalization). Received: groups={groups}"
            )
        super().__init__(**kwargs)
        self.supports_masking = True
        self.autocast = False
        self.groups = groups
        self.axis = axis
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)

    def build(self, input_shape):
        dim = input_shape[self.axis]
        if dim is None:
            raise ValueError(
                f"Axis {self.axis} of input tensor should have a defined dimension but the layer received an "
                f"input with shape {input_shape}."
            )
        if self.groups == -1:
            self.groups = dim
        if dim < self.groups:
            raise ValueError(f"Number of groups ({self.groups}) cannot be more than the number of channels ({dim}).")
        if dim % self.groups != 0:
            raise ValueError(f"Number of groups ({self.groups}) must be a multiple of the number of channels ({dim}).")
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={self.axis: dim})
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                shape=(dim,), name="gamma", initializer=self.gamma_initializer, regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=(dim,), name="beta", initializer=self.beta_initializer, regularizer=self.beta_regularizer,
                constraint=self.beta_constraint, autocast=False,
            )
        self._xp = backend_namespace()
        super().build(input_shape)

    def call(self, inputs):
        xp = self._xp
        x = in_compute_dtype(xp, inputs)
        dtype = dtype_name(x)
        gamma = None if self.gamma is None else cast(xp, native(self.gamma), dtype)
        beta = None if self.beta is None else cast(xp, native(self.beta), dtype)
        y = normkit.group_norm(x, self.groups, gamma, beta, axis=self.axis, eps=self.epsilon, xp=xp)
        return cast(xp, cast(xp, y, dtype_name(inputs)), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return _check_axes(self.axis, input_shape)

    def get_config(self):
        config = {
            "groups": self.groups,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="normkit")
class RMSNormalization(keras.layers.Layer):
    """``y = x / sqrt(mean(x**2 over axis) + epsilon) * scale``; one weight, ``scale``, initialized to ones."""

    def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def build(self, input_shape):
        if isinstance(self.axis, (list, tuple)):
            self.axis = sorted(self.axis)
            shape = tuple(input_shape[dim] for dim in self.axis)
        else:
            shape = (input_shape[self.axis],)
            self.axis = [self.axis]
        self.scale = self.add_weight(name="scale", shape=shape, initializer="ones")
        self._xp = backend_namespace()
        self.built = True

    def call(self, x):
        xp = self._xp
        xc = in_compute_dtype(xp, x)
        scale = cast(xp, native(self.scale), dtype_name(xc))
        y = normkit.rms_norm(xc, scale, axis=tuple(self.axis), eps=self.epsilon, xp=xp)
        return cast(xp, y, dtype_name(x))

    def compute_output_shape(self, input_shape):
        return _check_axes(self.axis, input_shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="normkit")
class UnitNormalization(keras.layers.Layer):
    """``y = x / max(||x||_2, 1e-12)`` over ``axis`` (int or list), per sample; no weights."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            self.axis = list(axis)
        elif isinstance(axis, int):
            self.axis = axis
        else:
            raise TypeError(f"Invalid value for `axis` argument: expected an int or a list/tuple of ints. Received: axis={axis}")
        self.supports_masking = True
        self._xp = backend_namespace()
        self._build_at_init()

    def call(self, inputs):
        xp = self._xp
        axes = tuple(a % len(inputs.shape) for a in _tuple_axis(self.axis))
        square_sum = xp.sum(inputs * inputs, axis=axes, keepdims=True)
        inv_norm = xp.minimum(1.0 / xp.sqrt(square_sum), xp.asarray(1e12, dtype=square_sum.dtype))
        return inputs * inv_norm

    def compute_output_shape(self, input_shape):
        return _check_axes(self.axis, input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis})
        return config
