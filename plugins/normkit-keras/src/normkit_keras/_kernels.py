"""Batch-norm kernels the Keras plugin may hand out through ``normkit_kernel`` (see ``_plugin``), and the policy.

Every kernel keeps one contract, that of the core's training path as ``BatchNormalization`` calls it:

``batch_norm_train(x, gamma, beta, eps) -> (y, mean, var_biased)``
    ``x`` float32 with the features on the last axis; ``gamma`` / ``beta`` of shape ``(C,)`` or
    None; ``y`` like ``x``; ``mean`` and ``var_biased`` of shape ``(C,)`` (the batch mean and the
    biased batch variance, for Keras's moving statistics), with no gradient. A batch with one value
    per channel gives ``y = beta`` and a zero variance (Keras's ``allow_single_value``).

``tensorflow_fused_batch_norm_train`` is TensorFlow's fused kernel (``FusedBatchNormV3``, the one
behind ``tf.nn.fused_batch_norm``; its gradient is TF's fused ``FusedBatchNormGradV3``), wrapped to
that contract:

- shifted first: the kernel runs on ``x - x[first sample]`` (per channel, no gradient through the
  shift). Batch norm's output and variance do not change under a per-channel shift, the mean gets
  the shift back. Without it the fused kernel's float32 statistics drift on data far from zero
  (mean 1e4, std 1: output off the float64 reference by 1.3e-3 on 64x4 and 2.3e-2 on 4096x64),
  and under XLA (``jit_compile``), whose lowering uses ``E[x**2] - E[x]**2``, they are NaN. With
  the shift: at most 5e-5 (eager, graph and XLA, up to 32x28x28x32).
- ranks 2 and 3 are reshaped (free, row-major) to 4-D NHWC: ``(N, C) -> (N, 1, 1, C)``,
  ``(N, L, C) -> (N, 1, L, C)``.
- the batch variance ``FusedBatchNormV3`` reports in training is the unbiased one (TF 2.x CPU,
  eager, graph and XLA alike; ``_reports_unbiased`` checks it once per process on a two-value
  batch): it is scaled by ``(n - 1) / n`` back to the biased one, and set to 0 where ``n <= 1``.

Policy (whether offered kernels are used at all; ``"core"`` is the reference every kernel is tested
equal to):

    NORMKIT_KERAS_KERNELS=core                    # environment, read at import: always the core
    normkit_keras.set_kernel_policy("core")       # the same at run time ("auto" gives kernels back)

The policy is read when a layer's ``call`` runs in Python: on TensorFlow that is when a
``tf.function`` (a Keras ``fit``/``predict`` step) traces, so a function already traced keeps the
path it traced with; retrace (or build a new model / recompile) after changing it.
"""

from __future__ import annotations

from typing import Any

from normkit.plugin.kernels import KERNEL_POLICIES, KernelPolicy

__all__ = [
    "KERNEL_POLICIES",
    "set_kernel_policy",
    "get_kernel_policy",
    "kernels_enabled",
    "layout_of",
    "device_of_trace",
    "tensorflow_fused_batch_norm_train",
]

_POLICY = KernelPolicy("NORMKIT_KERAS_KERNELS")


def set_kernel_policy(policy: str) -> str:
    """Choose how ``BatchNormalization`` computes; returns the previous policy.

    ``"auto"`` (default): the kernel the plugin hook offers for the backend's namespace, dtype and
    layout, where one is offered (the generic core otherwise). ``"core"``: always the generic
    normkit core. Takes effect the next time a layer's ``call`` runs in Python (a ``tf.function``
    already traced keeps its path). Initial value: ``NORMKIT_KERAS_KERNELS``.
    """
    return _POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return _POLICY.value


def kernels_enabled() -> bool:
    """True when the policy lets layers use plugin kernels."""
    return _POLICY.value == "auto"


# rank -> layout key for features on the last axis
_LAYOUTS = {2: "nc", 3: "nlc", 4: "nhwc", 5: "ndhwc"}


def layout_of(rank: int, axis: int) -> str:
    """The layout key of a batch-norm input of ``rank`` normalized over feature ``axis``.

    ``"nc"``, ``"nlc"``, ``"nhwc"``, ``"ndhwc"`` for features on the last axis; ``"other"`` else.
    """
    if rank < 2 or axis % rank != rank - 1:
        return "other"
    return _LAYOUTS.get(rank, "other")


def device_of_trace() -> str:
    """``"xla"`` while a ``jit_compile`` function traces (XLA compiles the graph), else ``"tf"``.

    Part of the kernel's configuration: under XLA the fused kernel measured slower in a ``fit`` step
    (1.29-1.31x Keras's layer against the core's 1.01-1.04x), so the table offers nothing there.
    """
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return "xla" if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()) else "tf"
    except Exception:  # noqa: BLE001 - a TF without this helper: assume no XLA
        return "tf"


_UNBIASED: list[bool] = []


def _reports_unbiased() -> bool:
    """Whether ``FusedBatchNormV3`` reports the unbiased batch variance in training (asked once, eagerly)."""
    if not _UNBIASED:
        import tensorflow as tf

        with tf.init_scope():
            out = tf.raw_ops.FusedBatchNormV3(
                x=tf.constant([0.0, 2.0], shape=(2, 1, 1, 1)), scale=tf.ones(1), offset=tf.zeros(1),
                mean=tf.zeros(0), variance=tf.zeros(0), epsilon=1e-3, exponential_avg_factor=1.0,
                data_format="NHWC", is_training=True,
            )
            var = float(out.batch_variance.numpy()[0])
        if abs(var - 2.0) < 1e-6:
            _UNBIASED.append(True)
        elif abs(var - 1.0) < 1e-6:
            _UNBIASED.append(False)
        else:
            raise RuntimeError(f"FusedBatchNormV3's batch variance of [0, 2] is {var}, neither 1 nor 2")
    return _UNBIASED[0]


def tensorflow_fused_batch_norm_train(x: Any, gamma: Any, beta: Any, eps: float) -> tuple[Any, Any, Any]:
    """TensorFlow's fused training-mode batch norm (float32, features last), shifted for accuracy.

    See the module docstring for the contract, the shift and the variance conversion.
    """
    import tensorflow as tf

    rank = len(x.shape)
    c = x.shape[-1]
    if rank == 4:
        x4 = x
    elif rank == 2:
        x4 = tf.reshape(x, [-1, 1, 1, c])
    elif rank == 3:
        shape = tf.shape(x)
        x4 = tf.reshape(x, [shape[0], 1, shape[1], c])
    else:
        raise ValueError(f"tensorflow_fused_batch_norm_train takes ranks 2, 3 and 4, got shape {x.shape}")
    dims = x4.shape[:3]
    if all(d is not None for d in dims):
        n = tf.constant(float(dims[0] * dims[1] * dims[2]))
    else:
        n = tf.cast(tf.reduce_prod(tf.shape(x4)[:3]), tf.float32)
    # the first sample of the batch (zeros for an empty one), per channel, carries no gradient
    shift = tf.stop_gradient(tf.reduce_sum(x4[:1, :1, :1, :], axis=(0, 1, 2)))
    scale = tf.ones([c], dtype=x.dtype) if gamma is None else gamma
    offset = tf.zeros([c], dtype=x.dtype) if beta is None else beta
    out = tf.raw_ops.FusedBatchNormV3(
        x=x4 - shift, scale=scale, offset=offset, mean=tf.zeros([0], dtype=tf.float32),
        variance=tf.zeros([0], dtype=tf.float32), epsilon=float(eps), exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True,
    )
    y = out.y if rank == 4 else tf.reshape(out.y, tf.shape(x))
    mean = tf.stop_gradient(out.batch_mean) + shift
    var = tf.stop_gradient(out.batch_variance)
    if _reports_unbiased():
        var = tf.where(n > 1.0, var * ((n - 1.0) / tf.maximum(n, 1.0)), tf.zeros_like(var))
    return y, mean, var
