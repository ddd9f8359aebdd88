"""JAX kernels for normkit's functional API on CPU (offered through ``normkit_kernel``; table in ``_plugin``).

Keras on JAX computes its layers with ``jax.numpy``; these are normkit's math for float32 JAX
arrays with a hand-written backward (``jax.custom_vjp``), which XLA fuses into fewer passes than
the autodiff of the core's corrected two-pass (figures in benchmarks/RESULTS.md). Same contract
as ``_kernels``: the normkit function's own arguments, ``NotImplemented`` outside it (features or
normalized axes last, weights None or float32 arrays of the expected shape, no mask). Every
statistic is centred on a first mean and corrected by the residual, so float32 data far from zero
stays exact.

- ``batch_norm`` (training): ``(y, mean, var)`` over the rows of ``(R, C)``; the running update is
  ``normkit.update_running_stats``.
- ``layer_norm`` / ``rms_norm``: over the trailing axes of ``(R, D)``.
- ``group_norm``: the data shifted by each group's first channel mean, per (sample, channel) sums
  over the spatial axis merged per group (the ``(N, S, C)`` layout ``_kernels.group_norm`` uses).
"""

from __future__ import annotations

import functools
from typing import Any

import normkit

__all__ = ["batch_norm", "layer_norm", "group_norm", "rms_norm"]


class _Decline(Exception):
    """Arguments outside a kernel's contract."""


def _declines(kernel):  # noqa: ANN001, ANN202
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return kernel(*args, **kwargs)
        except _Decline:
            return NotImplemented

    wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__ = kernel.__name__, kernel.__doc__, kernel
    return wrapped


def _param(jnp: Any, value: Any, shape: tuple) -> Any:
    if value is None:
        return None
    if getattr(value, "dtype", None) != jnp.float32 or tuple(getattr(value, "shape", ())) != tuple(shape):
        raise _Decline("parameter")
    return value


def _static_size(dims: tuple) -> int:
    """The product of ``dims``; a symbolic dimension (shape-polymorphic export) declines."""
    n = 1
    for d in dims:
        if not isinstance(d, int):
            raise _Decline("symbolic dimension")
        n *= d
    return n


def _check_x(jnp: Any, x: Any) -> None:
    if x.dtype != jnp.float32 or any(d == 0 for d in x.shape):
        raise _Decline("x")


def _sum_rows(t: Any) -> Any:
    """``sum(t, axis=0, keepdims=True)`` of a 2-D array as a matrix product: XLA's CPU column reduction is slower
    than its dot (measured); full float32 precision whatever the platform's default."""
    import jax
    import jax.numpy as jnp

    return jnp.matmul(jnp.ones((1, t.shape[0]), t.dtype), t, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def _rows_norm(axis: int, eps: float) -> Any:
    """``(y, mean, var)`` normalizing a 2-D array over ``axis`` (0: batch norm, 1: layer norm), affine on the other."""
    import jax
    import jax.numpy as jnp

    def forward(x, w, b):
        first = jnp.mean(x, axis=axis, keepdims=True)
        c = x - first
        r = jnp.mean(c, axis=axis, keepdims=True)
        var = jnp.maximum(jnp.mean(c * c, axis=axis, keepdims=True) - r * r, 0.0)
        inv = jax.lax.rsqrt(var + eps)
        xhat = (c - r) * inv
        y = xhat * w + b
        return (y, first + r, var), (c, r, inv, w)

    def backward(res, cotangents):
        c, r, inv, w = res
        dy = cotangents[0]  # the statistics carry no gradient (the running update stops it)
        xhat = (c - r) * inv
        n = c.shape[axis]
        db = _sum_rows(dy)  # the weights are (1, columns): their gradients sum the rows
        dw = _sum_rows(dy * xhat)
        if axis == 0:  # statistics over the rows: the same sums as the weights' gradients
            a, bb = w * db / n, w * dw / n
        else:
            dxh = dy * w
            a = jnp.mean(dxh, axis=axis, keepdims=True)
            bb = jnp.mean(dxh * xhat, axis=axis, keepdims=True)
        dx = inv * ((dy * w - a) - xhat * bb)
        return dx, dw, db

    @jax.custom_vjp
    def norm(x, w, b):
        return forward(x, w, b)[0]

    norm.defvjp(forward, backward)
    return norm


@_declines
def batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, training: bool, momentum: Any,
               eps: float, axis: int, mask: Any, correction: float, allow_single_value: bool, num_batches: Any,
               virtual_batch_size: Any = None) -> Any:
    """``normkit.batch_norm`` in training, features last, float32, no mask, no
    ``virtual_batch_size`` (ghost batch norm; given only when it splits a training batch)."""
    if virtual_batch_size is not None:
        raise _Decline("virtual batches")
    import jax.numpy as jnp

    _check_x(jnp, x)
    c = x.shape[-1]
    if not training or mask is not None or x.ndim < 2 or axis != x.ndim - 1:
        raise _Decline("layout")
    rows = _static_size(x.shape[:-1])
    if rows <= 1:
        raise _Decline("single value")
    w = _param(jnp, weight, (c,))
    b = _param(jnp, bias, (c,))
    w = jnp.ones((1, c), jnp.float32) if w is None else w[None]
    b = jnp.zeros((1, c), jnp.float32) if b is None else b[None]
    y, mean, var = _rows_norm(0, float(eps))(jnp.reshape(x, (rows, c)), w, b)
    y = jnp.reshape(y, x.shape)
    if running_mean is None:
        return normkit.BatchNormResult(y, None, None)
    stats = normkit.Moments(count=rows, mean=jnp.reshape(mean, (c,)), m2=jnp.reshape(var, (c,)) * rows)
    new_mean, new_var = normkit.update_running_stats(running_mean, running_var, stats, momentum=momentum,
                                                     correction=correction, num_batches=num_batches, xp=jnp)
    return normkit.BatchNormResult(y, new_mean, new_var)


@_declines
def layer_norm(x: Any, weight: Any, bias: Any, *, axis: tuple[int, ...], eps: float) -> Any:
    """``normkit.layer_norm`` over trailing axes, float32."""
    import jax.numpy as jnp

    _check_x(jnp, x)
    axes = tuple(sorted(axis))
    if not axes or axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise _Decline("axes")
    pshape = tuple(x.shape[a] for a in axes)
    d = _static_size(pshape)
    w, b = _param(jnp, weight, pshape), _param(jnp, bias, pshape)
    w = jnp.ones((1, d), jnp.float32) if w is None else jnp.reshape(w, (1, d))
    b = jnp.zeros((1, d), jnp.float32) if b is None else jnp.reshape(b, (1, d))
    y, _, _ = _rows_norm(1, float(eps))(jnp.reshape(x, (-1, d)), w, b)
    return jnp.reshape(y, x.shape)


@functools.lru_cache(maxsize=None)
def _group_norm_nsc(groups: int, eps: float) -> Any:
    """Group norm of ``(N, S, C)``: the data shifted per (sample, group) by its first channel's mean, per-channel
    sums over S of the shifted data and its square, merged per group (the shift is within the group's spread,
    so the squares lose nothing; every full-size value derives from the one shifted tensor, which keeps the
    math exact however XLA fuses and contracts it)."""
    import jax
    import jax.numpy as jnp

    def shapes(x3):
        n, s, ch = x3.shape
        cg = ch // groups

        def per_group(t):  # (N, 1, C) -> (N, 1, G, Cg)
            return jnp.reshape(t, (n, 1, groups, cg))

        def per_channel(t):  # (N, 1, G, 1 or Cg) -> (N, 1, C)
            return jnp.reshape(jnp.broadcast_to(t, (n, 1, groups, cg)), (n, 1, ch))

        return s, cg, per_group, per_channel

    def forward(x3, w, b):
        s, cg, per_group, per_channel = shapes(x3)
        # each group's first channel mean, (N, 1, G, 1); a static slice (strided indexing of a batch-polymorphic
        # array becomes a gather, which the TFLite converter refuses)
        first_channel = jax.lax.slice_in_dim(jnp.reshape(x3, (-1, s, groups, cg)), 0, 1, axis=3)
        shift = per_channel(jnp.mean(first_channel, axis=1, keepdims=True))
        c = x3 - shift
        d4 = jnp.mean(per_group(jnp.mean(c, axis=1, keepdims=True)), axis=-1, keepdims=True)  # group mean - shift
        q4 = jnp.mean(per_group(jnp.mean(c * c, axis=1, keepdims=True)), axis=-1, keepdims=True)
        inv = jax.lax.rsqrt(jnp.maximum(q4 - d4 * d4, 0.0) + eps)  # (N, 1, G, 1)
        g4 = jnp.reshape(w, (1, 1, groups, cg))
        p4 = inv * g4
        y = c * per_channel(p4) + per_channel(jnp.reshape(b, (1, 1, groups, cg)) - d4 * p4)
        return y, (x3, shift, d4, inv, g4, p4)

    def backward(res, dy):
        x3, shift, d4, inv, g4, p4 = res
        s, cg, per_group, per_channel = shapes(x3)
        c = x3 - shift
        b4 = per_group(jnp.sum(dy, axis=1, keepdims=True))  # per (sample, channel) sums over S
        a4 = per_group(jnp.sum(dy * c, axis=1, keepdims=True))
        h4 = inv * (a4 - d4 * b4)  # sum over S of dy * xhat
        k = s * cg
        a_g = jnp.sum(g4 * b4, axis=-1, keepdims=True) / k
        b_g = jnp.sum(g4 * h4, axis=-1, keepdims=True) / k
        u4 = -(inv * inv) * b_g
        dx = dy * per_channel(p4) + c * per_channel(u4) + per_channel(-inv * a_g - u4 * d4)
        ch = x3.shape[2]
        return dx, jnp.reshape(jnp.sum(h4, axis=(0, 1)), (ch,)), jnp.reshape(jnp.sum(b4, axis=(0, 1)), (ch,))

    @jax.custom_vjp
    def norm(x3, w, b):
        return forward(x3, w, b)[0]

    norm.defvjp(forward, backward)
    return norm


@_declines
def group_norm(x: Any, num_groups: int, weight: Any, bias: Any, *, axis: int, eps: float) -> Any:
    """``normkit.group_norm`` with channels last (rank 2 or more), float32."""
    import jax.numpy as jnp

    _check_x(jnp, x)
    ch = x.shape[-1]
    if x.ndim < 2 or axis != x.ndim - 1 or int(ch) % int(num_groups):
        raise _Decline("layout")
    w, b = _param(jnp, weight, (ch,)), _param(jnp, bias, (ch,))
    w = jnp.ones((ch,), jnp.float32) if w is None else w
    b = jnp.zeros((ch,), jnp.float32) if b is None else b
    x3 = jnp.reshape(x, (x.shape[0], -1, ch))
    return jnp.reshape(_group_norm_nsc(int(num_groups), float(eps))(x3, w, b), x.shape)


@functools.lru_cache(maxsize=None)
def _rms_rows(eps: float) -> Any:
    """``x * rsqrt(mean(x**2) + eps) * w`` over the rows of ``(R, D)``; JAX differentiates it (no centring to
    protect, and XLA fuses autodiff's backward better than a hand-written one: 1.0-1.1x Keras's vs 1.1-1.3x)."""
    import jax
    import jax.numpy as jnp

    def norm(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + eps) * w

    return norm


@_declines
def rms_norm(x: Any, weight: Any, *, axis: tuple[int, ...], eps: float) -> Any:
    """``normkit.rms_norm`` over trailing axes, float32."""
    import jax.numpy as jnp

    _check_x(jnp, x)
    axes = tuple(sorted(axis))
    if not axes or axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise _Decline("axes")
    pshape = tuple(x.shape[a] for a in axes)
    d = _static_size(pshape)
    w = _param(jnp, weight, pshape)
    w = jnp.ones((1, d), jnp.float32) if w is None else jnp.reshape(w, (1, d))
    return jnp.reshape(_rms_rows(float(eps))(jnp.reshape(x, (-1, d)), w), x.shape)
