"""TensorFlow kernels for normkit's functional API (offered through ``normkit_kernel``; table in ``_plugin``).

Each takes the normkit function's own validated arguments and returns its result, or
``NotImplemented`` outside its contract (the core computes then): float32 ``tf.Tensor``, features
or normalized axes last, weights ``None`` or float32 tensors of the expected shape, no mask, not
inside an XLA (``jit_compile``) trace, where the core measured faster. Float32 data far from zero
(offset 1e4) stays exact: every kernel centres before it scales (figures in benchmarks/RESULTS.md).

- ``batch_norm``: ``FusedBatchNormV3`` (gradient ``FusedBatchNormGradV3``). Training runs on
  ``x - x[first row]`` (exact, no gradient through the shift): unshifted, the fused statistics
  drift at offset 1e4. Its batch variance is the unbiased one; it becomes ``Moments`` and the
  running update is ``normkit.update_running_stats``. Inference is the fused op, centred inside.
- ``layer_norm`` / ``group_norm``: written out in TensorFlow ops with a hand-written gradient;
  sums are matrix products (BLAS), two-pass with the residual folded back (``Centered``'s method).
"""

from __future__ import annotations

from typing import Any

import normkit

__all__ = ["batch_norm", "layer_norm", "group_norm", "in_xla_trace"]

_MIN_FUSED_EPS = 1.001e-5  # below it TF's fused kernel is refused on some devices (tf.nn.fused_batch_norm clamps)


class _Decline(Exception):
    """Arguments outside a kernel's contract: the caller returns NotImplemented."""


def in_xla_trace() -> bool:
    """True while a ``jit_compile`` function traces (XLA compiles the graph)."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - a TensorFlow without this helper: assume no XLA
        return False


def _tensor(tf: Any, value: Any, shape: tuple, name: str) -> Any:
    """``value`` (None, or a float32 tf.Tensor / tf.Variable of ``shape``) as a tensor; else _Decline."""
    if value is None:
        return None
    if not isinstance(value, (tf.Tensor, tf.Variable)) or value.dtype != tf.float32:
        raise _Decline(name)
    if tuple(value.shape) != tuple(shape):
        raise _Decline(name)
    return tf.convert_to_tensor(value)


def _check_x(tf: Any, x: Any) -> None:
    if not isinstance(x, tf.Tensor) or x.dtype != tf.float32 or in_xla_trace():
        raise _Decline("x")
    if any(d == 0 for d in x.shape):
        raise _Decline("empty")


def _declines(kernel):  # noqa: ANN001, ANN202
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return kernel(*args, **kwargs)
        except _Decline:
            return NotImplemented

    wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__ = kernel.__name__, kernel.__doc__, kernel
    return wrapped


# --------------------------------------------------------------------------- batch norm


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


def _fused_train(tf: Any, x: Any, scale: Any, offset: Any, eps: float) -> tuple[Any, normkit.Moments]:
    """``(y, Moments)`` of training-mode batch norm over every axis but the last, on ``x - x[first row]``."""
    c = x.shape[-1]
    x4 = tf.reshape(x, [-1, 1, 1, c])  # rows as the batch: faster than one image of all rows (measured)
    rows = x4.shape[0]
    # the first row of the batch (zeros for an empty one), per channel, carries no gradient
    shift = tf.stop_gradient(tf.reduce_sum(x4[:1], axis=(0, 1, 2)))
    out = tf.raw_ops.FusedBatchNormV3(
        x=x4 - shift, scale=tf.ones([c]) if scale is None else scale, offset=tf.zeros([c]) if offset is None else offset,
        mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=float(eps), exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True,
    )
    y = tf.reshape(out.y, tf.shape(x))
    count: Any = int(rows) if rows is not None else tf.cast(tf.shape(x4)[0], tf.float32)
    n = float(count) if isinstance(count, int) else count
    var = out.batch_variance
    if _reports_unbiased():  # m2 = unbiased var * (n - 1)
        m2 = var * (n - 1.0) if isinstance(n, float) else var * tf.maximum(n - 1.0, 0.0)
    else:
        m2 = var * n
    return y, normkit.Moments(count=count, mean=out.batch_mean + shift, m2=m2)


@_declines
def batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, training: bool, momentum: Any,
               eps: float, axis: int, mask: Any, correction: float, allow_single_value: bool, num_batches: Any,
               virtual_batch_size: Any = None) -> Any:
    """``normkit.batch_norm`` through ``FusedBatchNormV3``: features last, rank 2 or more, float32, no mask, no
    ``virtual_batch_size`` (ghost batch norm; given only when it splits a training batch)."""
    if virtual_batch_size is not None:
        raise _Decline("virtual batches")
    import tensorflow as tf

    from normkit_keras._namespaces import tensorflow_namespace

    _check_x(tf, x)
    rank = len(x.shape)
    c = x.shape[-1]
    if mask is not None or rank < 2 or axis != rank - 1 or c is None or eps < _MIN_FUSED_EPS:
        raise _Decline("layout")
    scale, offset = _tensor(tf, weight, (c,), "weight"), _tensor(tf, bias, (c,), "bias")
    if running_mean is not None and not all(
        isinstance(s, (tf.Tensor, tf.Variable)) and tuple(s.shape) == (c,) for s in (running_mean, running_var)
    ):
        raise _Decline("running statistics")
    if not training:
        mean, var = (tf.cast(s, tf.float32) for s in (running_mean, running_var))
        out = tf.raw_ops.FusedBatchNormV3(
            x=tf.reshape(x, [-1, 1, 1, c]), scale=tf.ones([c]) if scale is None else scale,
            offset=tf.zeros([c]) if offset is None else offset, mean=mean, variance=var, epsilon=float(eps),
            exponential_avg_factor=1.0, data_format="NHWC", is_training=False,
        )
        return normkit.BatchNormResult(tf.reshape(out.y, tf.shape(x)), running_mean, running_var)
    rows = 1
    for d in x.shape[:-1]:
        rows = None if rows is None or d is None else rows * int(d)
    if rows is not None and rows <= 1:  # one value per channel: the core's error or Keras's beta
        raise _Decline("single value")
    y, stats = _fused_train(tf, x, scale, offset, eps)
    if running_mean is None:
        return normkit.BatchNormResult(y, None, None)
    new_mean, new_var = normkit.update_running_stats(
        running_mean, running_var, stats, momentum=momentum, correction=correction, num_batches=num_batches,
        xp=tensorflow_namespace(),
    )
    return normkit.BatchNormResult(y, new_mean, new_var)


# --------------------------------------------------------------------------- layer norm


def _layer_norm_rows(tf: Any, x2: Any, gamma: Any, beta: Any, eps: float) -> Any:
    """Layer norm of each row of ``x2`` (R, D), affine over D; float32, exact at large offsets."""
    d = int(x2.shape[1])
    mean_of = tf.fill([d], 1.0 / d)

    def forward(x2: Any, *params: Any) -> Any:
        g = params[0] if gamma is not None else None
        b = params[-1] if beta is not None else None
        m = tf.linalg.matvec(x2, mean_of)[:, None]
        c = x2 - m  # centred on a float32 mean; the residual r corrects it
        r = tf.linalg.matvec(c, mean_of)[:, None]
        var = tf.maximum(tf.linalg.matvec(c * c, mean_of)[:, None] - r * r, 0.0)
        inv = tf.math.rsqrt(var + eps)
        xhat = (c - r) * inv
        y = xhat if g is None else xhat * g
        if b is not None:
            y = tf.nn.bias_add(y, b)

        def backward(dy: Any) -> Any:
            grads = []
            gd = mean_of if g is None else g / d
            z = dy * xhat
            a = tf.linalg.matvec(dy, gd)[:, None] * inv
            bb = tf.linalg.matvec(z, gd)[:, None] * inv
            dyg = dy if g is None else dy * g
            dx = (dyg * inv - a) - xhat * bb
            if g is not None:
                grads.append(tf.reduce_sum(z, axis=0))
            if b is not None:
                grads.append(tf.reduce_sum(dy, axis=0))
            return (dx, *grads)

        return y, backward

    params = [p for p in (gamma, beta) if p is not None]
    return tf.custom_gradient(forward)(x2, *params)


@_declines
def layer_norm(x: Any, weight: Any, bias: Any, *, axis: tuple[int, ...], eps: float) -> Any:
    """``normkit.layer_norm`` over trailing axes (any rank), float32."""
    import tensorflow as tf

    _check_x(tf, x)
    rank = len(x.shape)
    axes = tuple(sorted(axis))
    if not axes or axes != tuple(range(rank - len(axes), rank)):
        raise _Decline("axes")
    pshape = tuple(x.shape[a] for a in axes)
    if any(d is None for d in pshape):
        raise _Decline("unknown normalized shape")
    d = 1
    for s in pshape:
        d *= int(s)
    gamma, beta = _tensor(tf, weight, pshape, "weight"), _tensor(tf, bias, pshape, "bias")
    def flat(p):
        return None if p is None else tf.reshape(p, [d])

    y2 = _layer_norm_rows(tf, tf.reshape(x, [-1, d]), flat(gamma), flat(beta), eps)
    return tf.reshape(y2, tf.shape(x))


# --------------------------------------------------------------------------- group norm


def _group_norm_nsc(tf: Any, x3: Any, groups: int, gamma: Any, beta: Any, eps: float) -> Any:
    """Group norm of ``x3`` (N, S, C): per sample and group of C // groups consecutive channels, over S too.

    Per (sample, channel) means and squared deviations over S are matrix products; the groups
    merge them with Chan's formula around the group's first channel mean, so float32 data far
    from zero stays exact. ``y = c * P + Q`` with ``c = x - mean_(n, c)`` and per-(n, c) P, Q.
    """
    ch = int(x3.shape[2])
    cg = ch // groups
    s_dyn = tf.shape(x3)[1]
    s = tf.cast(s_dyn, tf.float32)

    def per_group(t: Any) -> Any:  # (N, 1, C) -> (N, 1, G, Cg)
        return tf.reshape(t, [-1, 1, groups, cg])

    def per_channel(t: Any) -> Any:  # (N, 1, G, 1 or Cg) -> (N, 1, C)
        return tf.reshape(tf.broadcast_to(t, tf.stack([tf.shape(t)[0], 1, groups, cg])), [-1, 1, ch])

    def forward(x3: Any, *params: Any) -> Any:
        g = params[0] if gamma is not None else None
        b = params[-1] if beta is not None else None
        ones = tf.ones(tf.stack([1, 1, s_dyn]))
        mean_s = ones / s
        m = tf.linalg.matmul(mean_s, x3)  # (N, 1, C): mean over S per sample and channel
        c = x3 - m
        r = tf.linalg.matmul(mean_s, c)
        v = tf.linalg.matmul(mean_s, c * c) - r * r
        m4, r4, v4 = per_group(m), per_group(r), per_group(v)
        ref = m4[..., :1]
        dev = (m4 - ref) + r4  # channel mean - group's first channel mean, exact
        dg = tf.reduce_mean(dev, axis=-1, keepdims=True)
        spread = dev - dg
        vg = tf.maximum(tf.reduce_mean(v4, axis=-1, keepdims=True) + tf.reduce_mean(spread * spread, axis=-1, keepdims=True), 0.0)
        inv = tf.math.rsqrt(vg + eps)  # (N, 1, G, 1)
        e = (m4 - ref) - dg  # x - group mean == c + e
        g4 = 1.0 if g is None else tf.reshape(g, [1, 1, groups, cg])
        p4 = inv * g4
        q4 = e * p4
        if b is not None:
            q4 = q4 + tf.reshape(b, [1, 1, groups, cg])
        y = c * per_channel(p4) + per_channel(q4)

        def backward(dy: Any) -> Any:
            total_b = tf.linalg.matmul(ones, dy)  # (N, 1, C): sum over S of dy
            total_a = tf.linalg.matmul(ones, dy * c)
            b4, a4 = per_group(total_b), per_group(total_a)
            h4 = inv * (a4 + e * b4)  # sum over S of dy * xhat
            k = s * cg
            a_g = tf.reduce_sum(g4 * b4, axis=-1, keepdims=True) / k
            b_g = tf.reduce_sum(g4 * h4, axis=-1, keepdims=True) / k
            u4 = -(inv * inv) * b_g
            v4 = -inv * a_g + u4 * e
            dx = (dy * per_channel(p4) + c * per_channel(u4)) + per_channel(v4)
            grads = []
            if g is not None:
                grads.append(tf.reshape(tf.reduce_sum(h4, axis=(0, 1)), [ch]))
            if b is not None:
                grads.append(tf.reshape(tf.reduce_sum(b4, axis=(0, 1)), [ch]))
            return (dx, *grads)

        return y, backward

    params = [p for p in (gamma, beta) if p is not None]
    return tf.custom_gradient(forward)(x3, *params)


@_declines
def group_norm(x: Any, num_groups: int, weight: Any, bias: Any, *, axis: int, eps: float) -> Any:
    """``normkit.group_norm`` with channels last (rank 2 or more), float32."""
    import tensorflow as tf

    _check_x(tf, x)
    rank = len(x.shape)
    ch = x.shape[-1]
    if rank < 2 or axis != rank - 1 or ch is None or int(ch) % int(num_groups):
        raise _Decline("layout")
    gamma, beta = _tensor(tf, weight, (ch,), "weight"), _tensor(tf, bias, (ch,), "bias")
    x3 = tf.reshape(x, tf.stack([tf.shape(x)[0], -1, int(ch)]))
    x3 = tf.ensure_shape(x3, [x.shape[0], None, int(ch)])
    y = _group_norm_nsc(tf, x3, int(num_groups), gamma, beta, eps)
    return tf.reshape(y, tf.shape(x))
