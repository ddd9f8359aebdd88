"""Batch-norm kernels the torch plugin may hand out through ``normkit_kernel`` (see ``_plugin``).

Every kernel keeps the contract of the ``normkit_torch._functional`` function it stands in for:

``batch_norm_train(x, weight, bias, eps, axis) -> (y, mean, var_biased)``
    ``y`` in x's dtype and memory format; ``mean`` and ``var_biased`` of shape ``(C,)``, float32 for
    half-precision x (else x's dtype), with no autograd history. A batch with one value per
    channel raises ValueError("Expected more than 1 value per channel when training, ...").
``batch_norm_eval(x, running_mean, running_var, weight, bias, eps, axis) -> y``

The ones here are torch's own aten batch norm (``torch.nn.functional.batch_norm``, the kernel behind
``torch.nn.BatchNorm*d``), wrapped to that contract; ``normkit_torch._autograd`` holds the
hand-written ``torch.autograd.Function``. All are plain module-level functions, so a module that
keeps one in an attribute still deep-copies and pickles.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["native_batch_norm_train", "native_batch_norm_eval", "function_or_native_batch_norm_train"]

_HALF = (torch.float16, torch.bfloat16)


def native_batch_norm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, axis: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's training-mode batch norm, returning the batch statistics too.

    aten reports the batch statistics only through the running buffers it updates, so it gets two
    fresh zero buffers and ``momentum=1``: afterwards they hold exactly the batch mean and the
    unbiased batch variance (``1 * batch + 0 * 0``), from which the biased one is recovered.
    Float32 buffers for half-precision x are aten's "mixed type" path, which also needs float32
    weight and bias; half-precision parameters are widened for the call (gradients flow back in
    their dtype through autograd).
    """
    f = axis % x.dim()
    xm = x if f == 1 else x.movedim(f, 1)
    c = xm.shape[1]
    n = xm.numel() // c if c else 0
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    sdtype = torch.float32 if x.dtype in _HALF else x.dtype
    mean, var = torch.zeros((2, c), dtype=sdtype, device=x.device).unbind(0)
    if weight is not None and weight.dtype != sdtype:
        weight = weight.to(sdtype)
    if bias is not None and bias.dtype != sdtype:
        bias = bias.to(sdtype)
    # torch.batch_norm is what F.batch_norm calls after its Python checks (cudnn where it applies)
    y = torch.batch_norm(xm, weight, bias, mean, var, True, 1.0, eps, torch.backends.cudnn.enabled)
    var_biased = var * ((n - 1) / n)
    if f != 1:
        y = y.movedim(1, f)
    return y, mean, var_biased


def native_batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    axis: int = 1,
) -> Tensor:
    """torch's inference-mode batch norm with the given running statistics."""
    f = axis % x.dim()
    xm = x if f == 1 else x.movedim(f, 1)
    if x.dtype in _HALF:
        sdtype = torch.float32
        running_mean, running_var = running_mean.to(sdtype), running_var.to(sdtype)
        if weight is not None:
            weight = weight.to(sdtype)
        if bias is not None:
            bias = bias.to(sdtype)
    y = torch.batch_norm(xm, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return y if f == 1 else y.movedim(1, f)


def function_or_native_batch_norm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, axis: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """``_autograd.batch_norm_train`` when autograd will not record the call, else ``native_batch_norm_train``.

    On row-major (NCHW, NCL) input the hand-written forward is faster than aten's, but its forward
    plus backward is slower: this picks per call on grad mode and ``requires_grad`` (both guarded
    by torch.compile, no graph break), the way aten itself dispatches.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return native_batch_norm_train(x, weight, bias, eps, axis)
    from normkit_torch._autograd import batch_norm_train

    return batch_norm_train(x, weight, bias, eps, axis)
