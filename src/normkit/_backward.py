"""Analytic batch-norm backward on any Array API namespace: input, weight and bias gradients.

With ``xhat = (x - mean) * invstd`` over the ``n`` values of each feature, ``y = xhat * weight + bias``
and ``dy`` the gradient of the loss with respect to ``y``:

    grad_bias   = sum(dy)
    grad_weight = sum(dy * xhat) = invstd * sum(dy * (x - mean))
    training:  grad_input = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    inference: grad_input = weight * invstd * dy      (mean and invstd are constants)

The training form is evaluated as ``dy * a + (x - mean) * b + c`` with per-feature ``a, b, c``, so
no full-size array beyond ``x - mean`` (already needed for ``grad_weight``) is built; ``x - mean``
is formed before scaling, so data far from zero (mean 1e4, std 1, float32) keeps its accuracy.
Half precision is computed in float32; ``grad_input`` comes back in ``x``'s dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from normkit._namespace import array_namespace
from normkit._validate import compute_dtype, feature_axis, static_count

__all__ = ["batch_norm_backward", "BatchNormGrads"]


class BatchNormGrads(NamedTuple):
    """``(grad_input, grad_weight, grad_bias)``; an entry is None where ``output_mask`` declined it."""

    grad_input: Any
    grad_weight: Any
    grad_bias: Any


def _per_feature(xp: Any, a: Any, name: str, c: int, dtype: Any) -> Any:
    if tuple(a.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one value per feature), got shape {tuple(a.shape)}")
    return a if a.dtype == dtype else xp.astype(a, dtype)


def batch_norm_backward(
    grad_output: Any,
    x: Any,
    mean: Any,
    invstd: Any,
    weight: Any = None,
    *,
    axis: int = 1,
    training: bool = True,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    xp: Any = None,
) -> BatchNormGrads:
    """Gradients of ``batch_norm`` with respect to ``x``, ``weight`` and ``bias``.

    ``mean`` and ``invstd`` (shape ``(C,)``) are what normalized ``x``: in training the batch mean
    and ``1 / sqrt(var_biased + eps)``, in inference the running ones. ``weight`` None means 1.
    ``output_mask`` says which of the three gradients to compute (the others come back None).
    ``grad_weight`` and ``grad_bias`` are returned in ``weight``'s dtype, or the compute dtype
    (float32 for half-precision ``x``) when there is no weight.
    """
    if xp is None:
        xp = array_namespace(
            ("grad_output", grad_output), ("x", x), ("mean", mean), ("invstd", invstd), ("weight", weight)
        )
    if tuple(grad_output.shape) != tuple(x.shape):
        raise ValueError(f"grad_output must have x's shape {tuple(x.shape)}, got shape {tuple(grad_output.shape)}")
    if x.ndim < 2:
        raise ValueError(f"batch_norm_backward expects x with a batch axis and a feature axis (rank >= 2), got shape {tuple(x.shape)}")
    want_input, want_weight, want_bias = (bool(m) for m in output_mask)
    f = feature_axis(axis, x.ndim)
    c = x.shape[f]
    axes = tuple(i for i in range(x.ndim) if i != f)
    dtype = compute_dtype(xp, x.dtype)
    bshape = tuple(c if i == f else 1 for i in range(x.ndim))
    mean = _per_feature(xp, mean, "mean", c, dtype)
    invstd = _per_feature(xp, invstd, "invstd", c, dtype)
    w = None if weight is None else _per_feature(xp, weight, "weight", c, dtype)
    param_dtype = dtype if weight is None else weight.dtype

    dy = grad_output if grad_output.dtype == dtype else xp.astype(grad_output, dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)

    need_dot = want_weight or (want_input and training)
    need_sum = want_bias or (want_input and training)
    sum_dy = xp.sum(dy, axis=axes) if need_sum else None
    centered = dot = None
    if need_dot:
        centered = xc - xp.reshape(mean, bshape)
        dot = xp.sum(dy * centered, axis=axes)

    grad_input = None
    if want_input:
        k = invstd if w is None else invstd * w
        if training:
            n = static_count(tuple(x.shape), axes)
            if n is None:
                raise ValueError("batch_norm_backward(training=True) needs the reduced dimensions of x to be known")
            b = -(k * invstd * invstd * dot) / n
            shift = -(k * sum_dy) / n
            grad_input = (dy * xp.reshape(k, bshape) + centered * xp.reshape(b, bshape)) + xp.reshape(shift, bshape)
        else:
            grad_input = dy * xp.reshape(k, bshape)
        if grad_input.dtype != x.dtype:
            grad_input = xp.astype(grad_input, x.dtype)

    grad_weight = dot * invstd if want_weight else None
    grad_bias = sum_dy if want_bias else None
    if grad_weight is not None and grad_weight.dtype != param_dtype:
        grad_weight = xp.astype(grad_weight, param_dtype)
    if grad_bias is not None and grad_bias.dtype != param_dtype:
        grad_bias = xp.astype(grad_bias, param_dtype)
    return BatchNormGrads(grad_input, grad_weight, grad_bias)
