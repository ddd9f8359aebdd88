"""``BatchNormalization``: ``keras.layers.BatchNormalization`` whose ``call`` is one ``normkit.batch_norm`` call.

Keras's conventions become the core's arguments in one place (``core_arguments``): feature axis
``axis``, ``momentum`` the weight of the old moving value (the core takes ``1 - momentum``),
biased variance in the output and in ``moving_variance`` (``correction=0``), ``epsilon``, and a
batch of one in training giving ``beta`` (``allow_single_value``). The variance is two-pass, so
data far from zero (mean 1e4) never gives a negative variance or NaN (Keras on torch does).
On TensorFlow, ``normkit.batch_norm`` runs the fused kernel the plugin offers (``_kernels``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import keras

import normkit
from normkit_keras import _recording, _synchronized
from normkit_keras._backend import backend_name, backend_namespace, cast, dtype_name, in_compute_dtype, native

__all__ = ["BatchNormalization", "core_arguments"]


def core_arguments(layer: keras.layers.BatchNormalization) -> dict[str, Any]:
    """Keras's batch-norm conventions as ``normkit.batch_norm`` arguments (the one place they are translated)."""
    return dict(momentum=1.0 - layer.momentum, eps=layer.epsilon, axis=layer.axis, correction=0,
                allow_single_value=True)


_KERAS_INIT = inspect.signature(keras.layers.BatchNormalization.__init__)
_SYNCHRONIZED_POSITION = list(_KERAS_INIT.parameters).index("synchronized") - 1  # in args, self excluded
_SIGNATURE = _KERAS_INIT.replace(parameters=[  # Keras's, then normkit's two keywords before **kwargs
    *list(_KERAS_INIT.parameters.values())[:-1],
    inspect.Parameter("frozen", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
    inspect.Parameter("virtual_batch_size", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[int]),
    list(_KERAS_INIT.parameters.values())[-1],
])


def _virtual_batch_size(value: Any, layer: keras.layers.BatchNormalization) -> Optional[int]:
    """``virtual_batch_size`` checked as Keras 2 did: None or a positive int, and not with renorm or synchronized."""
    v = normkit.check_virtual_batch_size(value)
    for name in ("renorm", "synchronized"):
        if v is not None and getattr(layer, name):
            raise ValueError(f"virtual_batch_size (ghost batch norm) cannot be combined with {name}=True")
    return v


def _divisible_batch(x: Any, virtual_batch_size: int, layer: str) -> Any:
    """``x``, checked at run time where its batch size is unknown while tracing (TensorFlow: model.fit's
    ``tf.function``): a batch that ``virtual_batch_size`` does not divide (the last, partial batch of an
    epoch) stops with an error naming both, as the core's check does for a batch size known when tracing.
    (Under XLA, ``jit_compile=True``, run-time checks are dropped: XLA's own shape error comes instead.)"""
    if x.shape[0] is not None or backend_name() != "tensorflow":
        return x
    import tensorflow as tf

    n = tf.shape(x)[0]
    message = (f"{layer}: virtual_batch_size={virtual_batch_size} must divide the batch size (axis 0 of x), got a "
               f"batch that is not a multiple of {virtual_batch_size} (often the last, partial batch of an epoch): use "
               f"a batch size that is a multiple of {virtual_batch_size} and drop the remainder (tf.data: "
               "batch(..., drop_remainder=True)). Samples in this batch:")
    check = tf.debugging.Assert(tf.equal(n % virtual_batch_size, 0), [message, n])
    with tf.control_dependencies([check]):
        return tf.identity(x)


@keras.saving.register_keras_serializable(package="normkit")
class BatchNormalization(keras.layers.BatchNormalization):
    """Normalizes per feature (``axis``) with the batch's statistics in training, the moving ones otherwise.

    training (``training=True`` and ``trainable``):
        ``y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta``, ``var_B`` biased;
        ``moving = moving * momentum + batch * (1 - momentum)`` for the mean and the biased variance.
    inference (``training`` None or False, or ``trainable=False``):
        ``y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``, centred first.

    Constructor, weights and config are Keras's (this class subclasses it). ``mask`` (rank
    ``ndim - 1``, True where a position counts) excludes positions from the batch statistics;
    ``renorm=True`` is batch renormalization as Keras computes it; ``synchronized=True`` merges
    every replica's statistics on every backend (``_synchronized``). Integer inputs are computed in float32.
    ``frozen=True`` (keyword beyond Keras's; set by ``normkit_keras.freeze``, saved in the config when
    True) keeps the layer in inference behaviour for good: ``trainable`` stays False whatever is set.
    ``virtual_batch_size=V`` (Keras 2's keyword; ghost batch norm, in the config when set): in training
    each run of V consecutive samples is normalized by its own statistics and the moving statistics take
    their merge (the whole batch's) once per call; V must divide the batch (a partial last batch in
    ``model.fit`` is an error naming V and the batch size, as Keras 2's reshape failed: drop the remainder);
    not with renorm or synchronized. A mask (rank ``ndim - 1``) spans every axis but the last, as Keras's.
    """

    def __init__(self, *args: Any, frozen: bool = False, virtual_batch_size: Optional[int] = None,
                 **kwargs: Any) -> None:
        synchronized = _KERAS_INIT.bind(None, *args, **kwargs).arguments.get("synchronized", False)
        if "synchronized" in kwargs:
            kwargs["synchronized"] = False  # Keras refuses True off TensorFlow; normkit synchronizes everywhere
        elif len(args) > _SYNCHRONIZED_POSITION:
            args = args[:_SYNCHRONIZED_POSITION] + (False,) + args[_SYNCHRONIZED_POSITION + 1:]
        super().__init__(*args, **kwargs)
        self.synchronized = bool(synchronized)
        self.virtual_batch_size = _virtual_batch_size(virtual_batch_size, self)
        self._frozen = False
        self.frozen = frozen

    __init__.__signature__ = _SIGNATURE  # type: ignore[attr-defined]

    @property
    def frozen(self) -> bool:
        """True: inference behaviour for good (``trainable`` stays False); False: ``trainable`` decides, as in Keras."""
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        if self._frozen:
            self.trainable = False

    @property
    def trainable(self) -> bool:
        return keras.layers.BatchNormalization.trainable.fget(self)

    @trainable.setter
    def trainable(self, value: bool) -> None:  # a frozen layer ignores trainable=True (e.g. model.trainable = True)
        keras.layers.BatchNormalization.trainable.fset(self, False if getattr(self, "_frozen", False) else value)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        if self._frozen:
            config["frozen"] = True
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        xp = backend_namespace(layer=self)
        x = in_compute_dtype(xp, inputs)
        rank = len(x.shape)
        if mask is not None and self.axis % rank != rank - 1:  # Keras's mask spans every axis but the LAST
            mask = xp.expand_dims(mask, axis=-1)  # (the core's rank ndim - 1 mask spans all but the feature axis)
        dtype = dtype_name(x)
        gamma = cast(xp, native(self.gamma), dtype) if self.scale else None
        beta = cast(xp, native(self.beta), dtype) if self.center else None
        train = bool(training) and self.trainable
        if train and self.renorm:
            y = self._renorm(xp, x, mask, gamma, beta)
        else:
            synchronized = train and self.synchronized
            batch_norm = _synchronized.batch_norm if synchronized else normkit.batch_norm
            extra = {"layer": self._description()} if synchronized else {}
            if train and self.virtual_batch_size is not None:  # never with synchronized (refused in __init__)
                extra["virtual_batch_size"] = self.virtual_batch_size
                x = _divisible_batch(x, self.virtual_batch_size, self._description())
            y, new_mean, new_var = batch_norm(
                x, cast(xp, native(self.moving_mean), dtype), cast(xp, native(self.moving_variance), dtype), gamma,
                beta, training=train, mask=mask if train else None, xp=xp, **core_arguments(self), **extra,
            )
            if train and not _recording.record(self, x, mask, xp):  # inside accumulate_statistics: recorded
                self.moving_mean.assign(new_mean)
                self.moving_variance.assign(new_var)
        return cast(xp, y, self.compute_dtype)

    def _description(self) -> str:
        return f"BatchNormalization {self.name!r}"

    def _renorm(self, xp, x, mask, gamma, beta):
        """Batch renormalization (Ioffe 2017) as Keras computes it: ``normalize(x) * (r * gamma) + (d * gamma + beta)``.

        ``r = clip(sqrt(var_B + eps) / renorm_stddev)`` and ``d = clip((mean_B - renorm_mean) / renorm_stddev)``
        carry no gradient. The EMAs of (mean, stddev) are the core's running update, with the
        stddev in the variance slot of a one-value ``Moments`` (``m2 / (count - 0) == stddev``).
        """
        eps = self.epsilon
        dtype = dtype_name(x)
        batch = None
        if self.synchronized:
            batch = _synchronized.global_moments(x, axis=self.axis, mask=mask, xp=xp, layer=self._description())
        synchronized = batch is not None
        if not synchronized:
            batch = normkit.batch_moments(x, axis=self.axis, mask=mask, xp=xp)
        mean, var = batch.mean, batch.var
        stddev = xp.sqrt(var + eps)
        renorm_mean = cast(xp, native(self.renorm_mean), dtype)
        renorm_stddev = cast(xp, native(self.renorm_stddev), dtype)
        floor = xp.asarray(eps**0.5, dtype=stddev.dtype)
        r = stddev / xp.maximum(renorm_stddev, floor)
        d = (mean - renorm_mean) / xp.maximum(renorm_stddev, floor)
        clipping = self.renorm_clipping or {}
        def bound(v):
            return xp.asarray(float(v), dtype=stddev.dtype)

        if clipping.get("rmin") is not None:
            r = xp.maximum(r, bound(clipping["rmin"]))
        if clipping.get("rmax") is not None:
            r = xp.minimum(r, bound(clipping["rmax"]))
        if clipping.get("dmax") is not None:
            d = xp.minimum(xp.maximum(d, bound(-float(clipping["dmax"]))), bound(clipping["dmax"]))
        r, d = keras.ops.stop_gradient(r), keras.ops.stop_gradient(d)
        weight = r if gamma is None else r * gamma
        bias = d if gamma is None else d * gamma
        if beta is not None:
            bias = bias + beta
        if synchronized:
            y = _synchronized.normalize(x, batch, weight, bias, eps=eps, axis=self.axis, mask=mask, xp=xp)
        else:
            y = normkit.normalize(x, mean, var, weight, bias, eps=eps, axis=self.axis, xp=xp)
        spread = normkit.Moments(count=1, mean=mean, m2=stddev)
        new_renorm_mean, new_renorm_stddev = normkit.update_running_stats(
            renorm_mean, renorm_stddev, spread, momentum=1.0 - float(self.renorm_momentum), correction=0, xp=xp)
        new_mean, new_stddev = normkit.update_running_stats(
            cast(xp, native(self.moving_mean), dtype), cast(xp, native(self.moving_stddev), dtype), spread,
            momentum=1.0 - self.momentum, correction=0, xp=xp)
        self.renorm_mean.assign(new_renorm_mean)
        self.renorm_stddev.assign(new_renorm_stddev)
        self.moving_mean.assign(new_mean)
        self.moving_stddev.assign(new_stddev)
        self.moving_variance.assign(xp.maximum(new_stddev * new_stddev - eps, xp.zeros_like(new_stddev)))
        return y
