"""Training-mode batch norm as one ``torch.autograd.Function``: lean forward, analytic backward.

``batch_norm_train(x, weight, bias, eps, axis) -> (y, mean, var_biased)`` is normkit's
``batch_norm(training=True)`` math written with torch kernels (the "kernel hook" for torch;
``normkit.batch_norm`` and ``normkit.batch_norm_backward`` stay the generic reference):

forward   mean = mean(x) (torch's cascade summation keeps it accurate); the output buffer receives
          x - mean chunk by chunk while the squares are summed from a cache-sized scratch (two-pass
          variance, no full-size temporary), then y = y * scale + bias in place.
backward  saves only x, mean and invstd (x is the caller's tensor: no extra memory);
          grad_bias = sum(dy), grad_weight = invstd * sum(dy * (x - mean)) - reduced by aten's fused
          ``native_batch_norm_backward`` with only the weight/bias outputs requested when it exists,
          else by chunked torch ops; grad_input = dy * a + (x - mean) * b + c with per-channel a, b, c
          (normkit.batch_norm_backward's formula), chunk by chunk, no other full-size temporary.
mean and var carry no autograd history. Double backward is refused with a RuntimeError.
float16/bfloat16 are computed in float32; y and grad_input come back in x's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["batch_norm_train", "batch_norm_eval", "BatchNormTrain"]

_CHUNK = 1 << 18  # elements per scratch chunk (1 MiB of float32): stays in cache
_ATEN_BWD = getattr(getattr(torch.ops, "aten", None), "native_batch_norm_backward", None)


def _layout(x: torch.Tensor, axis: int) -> tuple[int, tuple[int, ...], list[int], int]:
    ndim = x.dim()
    if ndim < 2:
        raise ValueError(f"batch_norm expects x with a batch axis and a feature axis (rank >= 2), got shape {tuple(x.shape)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for an input of rank {ndim}")
    f = axis % ndim
    dims = tuple(i for i in range(ndim) if i != f)
    bshape = [1] * ndim
    bshape[f] = x.shape[f]
    n = 1
    for d in dims:
        n *= x.shape[d]
    return f, dims, bshape, n


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunk_rows(x: torch.Tensor, f: int) -> int:
    """Slices of dim 0 per chunk, or 0 when x is small (or dim 0 is the feature axis): one pass then."""
    if f == 0 or x.numel() <= _CHUNK or x.shape[0] < 2:
        return 0
    per_row = x.numel() // x.shape[0]
    return max(1, _CHUNK // per_row)


def _center_into(x: torch.Tensor, mean: torch.Tensor, out: torch.Tensor, dims: tuple[int, ...], f: int) -> torch.Tensor:
    """out = x - mean; returns sum(out**2) over dims (keepdim). Chunked along dim 0: each centred
    chunk is squared into one cache-sized scratch while it is still in cache."""
    step = _chunk_rows(x, f)
    if step == 0:
        torch.sub(x, mean, out=out)
        return torch.mul(out, out).sum(dims, keepdim=True)
    total = None
    scratch = torch.empty_like(x[:step])
    for start in range(0, x.shape[0], step):
        o = out[start:start + step]
        torch.sub(x[start:start + step], mean, out=o)
        s = scratch[: o.shape[0]]
        torch.mul(o, o, out=s)
        part = s.sum(dims, keepdim=True)
        total = part if total is None else total.add_(part)
    return total


def _sums_for_backward(dy, x, mean, dims, f):
    """(sum(dy), sum(dy * (x - mean))) over dims, keepdim, with pure torch ops (chunked)."""
    step = _chunk_rows(x, f)
    if step == 0:
        t = torch.sub(x, mean)
        t.mul_(dy)
        return dy.sum(dims, keepdim=True), t.sum(dims, keepdim=True)
    sum_dy = dot = None
    scratch = torch.empty_like(x[:step])
    for start in range(0, x.shape[0], step):
        xs, ds = x[start:start + step], dy[start:start + step]
        s = scratch[: xs.shape[0]]
        torch.sub(xs, mean, out=s)
        s.mul_(ds)
        p_dy, p_dot = ds.sum(dims, keepdim=True), s.sum(dims, keepdim=True)
        if sum_dy is None:
            sum_dy, dot = p_dy, p_dot
        else:
            sum_dy.add_(p_dy)
            dot.add_(p_dot)
    return sum_dy, dot


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, f: int) -> torch.Tensor:
    """x * scale + shift (per-channel scale, shift) in the fewest passes for x's memory layout."""
    # the output is allocated like x: letting a broadcasting op pick its layout can choose strides
    # that make the write several times slower (seen on NCHW with a (1, C, 1, 1) operand)
    y = torch.empty_like(x)
    if x.stride(f) == 1:  # channels innermost: a vectorized ternary op
        return torch.addcmul(shift, x, scale, out=y)
    torch.mul(x, scale, out=y)
    return y.add_(shift)


def _fill_grad_input(out, x, dy, mean, k, b, c, f) -> None:
    """out = (x - mean) * b + (dy * k + c), chunk by chunk so the four steps reuse a chunk in cache."""
    step = _chunk_rows(x, f) or x.shape[0]
    inner = x.stride(f) == 1
    for start in range(0, x.shape[0], step):
        o, xs, ds = out[start:start + step], x[start:start + step], dy[start:start + step]
        torch.sub(xs, mean, out=o)
        if inner:
            torch.addcmul(c, o, b, out=o)
        else:
            o.mul_(b).add_(c)
        o.addcmul_(ds, k)


class BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm; see the module docstring. Use ``batch_norm_train``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, axis: int):
        f, dims, bshape, n = _layout(x, axis)
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        xc = _compute(x)
        mean = xc.mean(dims, keepdim=True)
        y = torch.empty_like(xc)  # laid out like x (channels_last stays channels_last)
        var = _center_into(xc, mean, y, dims, f).div_(n)
        invstd = torch.rsqrt(var + eps)
        # y = (x - mean) * scale + bias, in place on y: centring first keeps float32 data far from
        # zero (mean 1e4) accurate, and costs no extra pass (the centring pass also gave the variance)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype).view(bshape)
        if bias is None:
            y.mul_(scale)
        elif xc.stride(f) == 1:
            torch.addcmul(bias.to(invstd.dtype).view(bshape), y, scale, out=y)
        else:
            y.mul_(scale).add_(bias.to(invstd.dtype).view(bshape))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        mean_c, var_c, invstd_c = mean.view(-1), var.view(-1), invstd.view(-1)
        ctx.save_for_backward(x, mean_c, invstd_c, weight)
        ctx.axis = f
        ctx.has_bias = bias is not None
        ctx.eps = eps
        ctx.mark_non_differentiable(mean_c, var_c)
        return y, mean_c, var_c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor, _dmean: Any, _dvar: Any):
        x, mean, invstd, weight = ctx.saved_tensors
        f = ctx.axis
        _, dims, bshape, n = _layout(x, f)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        xc, dyc = _compute(x), _compute(dy)
        if _ATEN_BWD is not None and f == 1:
            _, dot_inv, sum_dy = _ATEN_BWD(dyc, xc, None, None, None, mean, invstd, True, ctx.eps, [False, True, True])
            sum_dy, dot = sum_dy.view(bshape), (dot_inv / invstd).view(bshape)
        else:
            sum_dy, dot = _sums_for_backward(dyc, xc, mean.view(bshape), dims, f)
        inv = invstd.view(bshape)
        grad_x = grad_w = grad_b = None
        if need_x:
            k = inv if weight is None else inv * weight.to(inv.dtype).view(bshape)
            # dx = (x - mean) * b + dy * k + c, with x - mean formed first (accurate far from zero)
            b = k * inv * inv * dot * (-1.0 / n)
            c = -(k * sum_dy) / n
            grad_x = torch.empty_like(xc)
            _fill_grad_input(grad_x, xc, dyc, mean.view(bshape), k, b, c, f)
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        if need_w and weight is not None:
            grad_w = (dot * inv).view(-1).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = sum_dy.view(-1).to(weight.dtype if weight is not None else sum_dy.dtype)
        return grad_x, grad_w, grad_b, None, None


def batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, axis: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize ``x`` with its batch statistics along feature axis ``axis``.

    Returns ``(y, mean, var_biased)``: ``y = (x - mean) / sqrt(var_biased + eps) * weight + bias``
    in x's dtype and memory format; ``mean`` and ``var_biased`` have shape ``(C,)``, in float32 for
    half-precision x (else x's dtype), and carry no gradient. The caller folds them into running
    statistics (torch's running_var is unbiased: multiply by n / (n - 1)).
    """
    return BatchNormTrain.apply(x, weight, bias, float(eps), int(axis))


def batch_norm_eval(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    axis: int,
) -> torch.Tensor:
    """Inference batch norm: ``y = x * scale + shift`` with per-channel ``scale = weight / sqrt(running_var + eps)``.

    One multiply-add over x into an output laid out like x (two passes on NCHW, where torch's
    ternary ``addcmul`` is slower than ``mul`` then ``add_``). Differentiable when autograd needs it.
    """
    f, _, bshape, _ = _layout(x, axis)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    scale, shift = scale.view(bshape), shift.view(bshape)
    xc = _compute(x)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        y = torch.addcmul(shift, xc, scale)
    else:
        y = _affine(xc, scale, shift, f)
    return y if y.dtype == x.dtype else y.to(x.dtype)
