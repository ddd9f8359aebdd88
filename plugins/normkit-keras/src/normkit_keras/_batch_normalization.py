"""``BatchNormalization``: a drop-in for ``keras.layers.BatchNormalization`` computed by ``normkit.batch_norm``.

Keras's conventions, passed to the core as arguments: feature axis -1, ``momentum`` the weight of
the old moving value (the core takes ``1 - momentum``), biased variance in the output and in
``moving_variance`` (``correction=0``), a batch of one in training gives ``beta``
(``allow_single_value``). Unlike Keras on the torch backend, the variance is always two-pass, so
data far from zero (mean 1e4) never gives a negative variance or NaN.

On the TensorFlow backend, training-mode batch norm with features last (rank 2-4, float32 compute
dtype, no mask, no renorm, not synchronized) runs TensorFlow's fused kernel, which the plugin hook
``normkit_kernel`` offers (``_kernels``, decision table in ``_plugin``), chosen once per layer and
(dtype, layout); ``normkit_keras.set_kernel_policy("core")`` or ``NORMKIT_KERAS_KERNELS=core``
forces the core.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import constraints, initializers, regularizers

import normkit
from normkit_keras._backend import backend_name, backend_namespace, cast, dtype_name, in_compute_dtype, native
from normkit_keras._kernels import device_of_trace, kernels_enabled, layout_of

__all__ = ["BatchNormalization"]


def _check_renorm_clipping(renorm_clipping: Any) -> None:
    keys = ["rmax", "rmin", "dmax"]
    clipping = renorm_clipping or {}
    if set(clipping) - set(keys):
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {clipping}. Supported values: {keys}."
        )


def _clone_initializer(initializer: Any) -> Any:
    """A fresh copy of a Keras initializer (a seeded one must not repeat its draws across weights)."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


@keras.saving.register_keras_serializable(package="normkit")
class BatchNormalization(keras.layers.Layer):
    """Normalizes its inputs per feature (``axis``) with the batch's statistics in training, moving ones otherwise.

    training (``training=True`` and ``trainable``):
        ``y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta``, ``var_B`` biased;
        ``moving = moving * momentum + batch * (1 - momentum)`` for the mean and the biased variance.
    inference (``training`` None or False, or ``trainable=False``):
        ``y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``.

    Arguments, defaults, weights (``gamma, beta, moving_mean, moving_variance``) and config are
    Keras's. ``mask`` (rank ``ndim - 1``, True where a position counts) excludes positions from
    the batch statistics. ``renorm=True`` adds batch renormalization with Keras's extra weights
    (``moving_stddev, renorm_mean, renorm_stddev``).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = int(axis)
        if synchronized and backend_name() != "tensorflow":
            raise ValueError("Argument synchronized=True is only supported with the TensorFlow backend.")
        self.synchronized = synchronized
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        if renorm:
            _check_renorm_clipping(renorm_clipping)
            clipping = renorm_clipping or {}
            rmax, rmin, dmax = clipping.get("rmax"), clipping.get("rmin"), clipping.get("dmax")
            if rmax is not None and rmin is not None and rmax < rmin:
                raise ValueError(
                    "rmax should be greater than rmin in the `renorm_clipping` argument. "
                    f"Received: rmax={rmax}, rmin={rmin}."
                )
            if dmax is not None and dmax < 0:
                raise ValueError(f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}.")
        self.renorm = renorm
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self._xp = None

    def build(self, input_shape):
        shape = (input_shape[self.axis],)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer, regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint, trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer, regularizer=self.beta_regularizer,
                constraint=self.beta_constraint, trainable=True, autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer=self.moving_mean_initializer, trainable=False, autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance", initializer=self.moving_variance_initializer, trainable=False,
            autocast=False,
        )
        if self.renorm:
            def moving_stddev_initializer(shape, dtype=None):
                return keras.ops.sqrt(_clone_initializer(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                shape=shape, name="moving_stddev", initializer=moving_stddev_initializer, trainable=False,
                autocast=False,
            )
            self.renorm_mean = self.add_weight(
                shape=shape, name="renorm_mean", initializer=_clone_initializer(self.moving_mean_initializer),
                trainable=False, autocast=False,
            )
            self.renorm_stddev = self.add_weight(
                shape=shape, name="renorm_stddev", initializer=moving_stddev_initializer, trainable=False,
                autocast=False,
            )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={self.axis: input_shape[self.axis]})
        self._xp = backend_namespace()

    def compute_output_shape(self, input_shape):
        if self.axis >= len(input_shape) or self.axis < -len(input_shape):
            raise ValueError(
                f"Axis {self.axis} is out of bounds for input shape {input_shape}. Received: axis={self.axis}"
            )
        return input_shape

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        xp = self._xp
        x = in_compute_dtype(xp, inputs)
        dtype = dtype_name(x)
        gamma = cast(xp, native(self.gamma), dtype) if self.scale else None
        beta = cast(xp, native(self.beta), dtype) if self.center else None
        moving_mean = cast(xp, native(self.moving_mean), dtype)
        moving_variance = cast(xp, native(self.moving_variance), dtype)
        if training and self.trainable:
            if self.renorm:
                y = self._renorm(x, mask, gamma, beta, dtype)
                return cast(xp, y, self.compute_dtype)
            if self.synchronized and _replicas() > 1:
                y, new_mean, new_var = self._synchronized(x, moving_mean, moving_variance, gamma, beta)
            else:
                kernel = None if mask is not None or self.synchronized else self._train_kernel(x, dtype)
                if kernel is not None:
                    y, mean, var = kernel(x, gamma, beta, self.epsilon)
                    m = self.momentum
                    new_mean = moving_mean * m + mean * (1.0 - m)
                    new_var = moving_variance * m + var * (1.0 - m)
                else:
                    y, new_mean, new_var = normkit.batch_norm(
                        x, moving_mean, moving_variance, gamma, beta, training=True, momentum=1.0 - self.momentum,
                        eps=self.epsilon, axis=self.axis, mask=mask, correction=0, allow_single_value=True, xp=xp,
                    )
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_var)
        else:
            y = normkit.batch_norm(
                x, moving_mean, moving_variance, gamma, beta, training=False, eps=self.epsilon, axis=self.axis, xp=xp,
            ).output
        return cast(xp, y, self.compute_dtype)

    def _train_kernel(self, x, dtype):
        """The fused kernel for training on ``x`` (already in the compute dtype), or None for the core.

        Asked of the plugin hook once per layer and (dtype, layout, device: ``"tf"``, or ``"xla"``
        while a ``jit_compile`` function traces), then kept in the plain dict
        ``_normkit_kernels`` (not a Keras weight, not tracked); only on the TensorFlow backend and
        under the ``"auto"`` kernel policy (``normkit_keras.set_kernel_policy``).
        """
        if backend_name() != "tensorflow" or not kernels_enabled():
            return None
        if any(d == 0 for d in x.shape):  # an empty batch (statically): the core's semantics
            return None
        key = (dtype, layout_of(len(x.shape), self.axis), device_of_trace())
        table = self.__dict__.get("_normkit_kernels")
        if table is None:
            table = {}
            object.__setattr__(self, "_normkit_kernels", table)  # bypass Keras/TF attribute tracking
        if key not in table:
            from normkit.plugin.manager import kernel as resolve

            table[key] = resolve("batch_norm_train", self._xp, key[2], getattr(self._xp, dtype), key[1])
        return table[key]

    def _renorm(self, x, mask, gamma, beta, dtype):
        """Batch renormalization (Ioffe 2017) as Keras computes it: ``y = norm(x) * (r * gamma) + (d * gamma + beta)``.

        ``r = clip(sqrt(var_B + eps) / renorm_stddev)`` and ``d = clip((mean_B - renorm_mean) / renorm_stddev)``
        carry no gradient; the batch moments come from the core (a first pass with ``momentum=1``),
        the output from the core's training path with the composed scale and offset.
        """
        xp = self._xp
        zeros = xp.zeros_like(cast(xp, native(self.moving_mean), dtype))
        _, mean, var = normkit.batch_norm(
            x, zeros, zeros, training=True, momentum=1.0, eps=self.epsilon, axis=self.axis, mask=mask, correction=0,
            allow_single_value=True, xp=xp,
        )
        eps = self.epsilon
        stddev = xp.sqrt(var + eps)
        renorm_mean = cast(xp, native(self.renorm_mean), dtype)
        renorm_stddev = xp.maximum(cast(xp, native(self.renorm_stddev), dtype), xp.asarray(eps**0.5, dtype=getattr(xp, dtype)))
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = xp.maximum(r, xp.asarray(float(clipping["rmin"]), dtype=getattr(xp, dtype)))
        if clipping.get("rmax") is not None:
            r = xp.minimum(r, xp.asarray(float(clipping["rmax"]), dtype=getattr(xp, dtype)))
        if clipping.get("dmax") is not None:
            dmax = float(clipping["dmax"])
            d = xp.minimum(xp.maximum(d, xp.asarray(-dmax, dtype=getattr(xp, dtype))), xp.asarray(dmax, dtype=getattr(xp, dtype)))
        r, d = keras.ops.stop_gradient(r), keras.ops.stop_gradient(d)
        weight = r if gamma is None else r * gamma
        bias = d if gamma is None else d * gamma
        if beta is not None:
            bias = bias + beta
        y = normkit.batch_norm(
            x, None, None, weight, bias, training=True, eps=eps, axis=self.axis, mask=mask, correction=0,
            allow_single_value=True, xp=xp,
        ).output
        m, rm = self.momentum, float(self.renorm_momentum)
        self.renorm_mean.assign(cast(xp, native(self.renorm_mean), dtype) * rm + mean * (1.0 - rm))
        self.renorm_stddev.assign(cast(xp, native(self.renorm_stddev), dtype) * rm + stddev * (1.0 - rm))
        self.moving_mean.assign(cast(xp, native(self.moving_mean), dtype) * m + mean * (1.0 - m))
        new_stddev = cast(xp, native(self.moving_stddev), dtype) * m + stddev * (1.0 - m)
        self.moving_stddev.assign(new_stddev)
        self.moving_variance.assign(xp.maximum(new_stddev * new_stddev - eps, xp.zeros_like(new_stddev)))
        return y

    def _synchronized(self, x, moving_mean, moving_variance, gamma, beta):
        """Global batch statistics across the replicas of a tf.distribute strategy (TensorFlow only).

        Each replica contributes its count and sum, then its sum of squared deviations from the
        global mean (two all-reduces, never ``E[x**2] - E[x]**2``); the output then normalizes
        with them through the core, with gradients flowing through the all-reduced moments.
        """
        import tensorflow as tf

        xp = self._xp
        ctx = tf.distribute.get_replica_context()
        f = self.axis % len(x.shape)
        axes = [i for i in range(len(x.shape)) if i != f]
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.ones_like(x), axis=axes))
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(x, axis=axes))
        mean = total / count
        shape = [1] * len(x.shape)
        shape[f] = -1
        centered = x - tf.reshape(mean, shape)
        m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(centered * centered, axis=axes))
        var = m2 / count
        y = normkit.batch_norm(x, mean, var, gamma, beta, training=False, eps=self.epsilon, axis=self.axis, xp=xp).output
        m = self.momentum
        new_mean = moving_mean * m + tf.stop_gradient(mean) * (1.0 - m)
        new_var = moving_variance * m + tf.stop_gradient(var) * (1.0 - m)
        return y, new_mean, new_var

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
        }
        return {**base_config, **config}


def _replicas() -> int:
    """Replicas in sync of the current tf.distribute strategy (1 outside one)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else int(ctx.num_replicas_in_sync)
