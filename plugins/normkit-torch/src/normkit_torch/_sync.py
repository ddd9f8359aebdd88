"""A drop-in for torch.nn.SyncBatchNorm on any torch.distributed backend (gloo on CPU, NCCL on CUDA).

training, more than one rank: every rank's ``(count, mean, m2)`` from ``normkit.batch_moments``, one
``all_gather`` and Chan's merge (``normkit_torch.distributed``) give the statistics of the
concatenated batch; then, as one process on that batch,

    y = (x - mean) / sqrt(var + eps) * weight + bias                        (var biased, centred first)
    running stats: normkit.update_running_stats(..., correction=1) with the GLOBAL count (torch's unbiased)
    grad_input = weight * invstd * (dy - SUM(dy) / n - xhat * SUM(dy * xhat) / n)   (SUM: all ranks, one all_reduce)

``grad_weight = sum(dy * xhat)`` and ``grad_bias = sum(dy)`` stay local sums, which DDP then
averages, exactly as torch's SyncBatchNorm. A rank with an empty batch (count 0) joins both
collectives and contributes nothing. A single rank or no process group: the same function without
collectives; eval mode: ``normkit.normalize`` with the running statistics (torch.nn.BatchNorm's result).
Only public normkit API is used (``batch_moments``, ``Moments``, ``update_running_stats``, ``normalize``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import normkit
import torch
from normkit import Moments
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit_torch import _deploy
from normkit_torch.distributed import all_gather_moments, all_reduce_sums, is_synchronized, local_moments

__all__ = ["SyncBatchNorm"]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: global statistics (one all_gather) and the normalized output; backward: one all_reduce of two sums."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                process_group: Any, synchronize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        local = local_moments(input, axis=1)
        total = all_gather_moments(local, process_group) if synchronize else _per_feature_count(local)
        var = total.var  # biased; 0 for a feature no rank has values of
        invstd = torch.rsqrt(var + eps)
        if input.numel() > 0:
            output = normkit.normalize(input, total.mean, var, weight, bias, eps=eps, axis=1)
        else:
            output = torch.empty_like(input)
        ctx.save_for_backward(input, weight, total.mean, invstd, total.count)
        ctx.process_group = process_group if synchronize else None
        ctx.synchronize = synchronize
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(total.count, total.mean, total.m2)
        return output, total.count, total.mean, total.m2

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        input, weight, mean, invstd, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, shape = mean.dtype, _channel_shape(input)
        if input.numel() > 0:
            dy = grad_output.to(dtype)
            xhat = (input.to(dtype) - mean.reshape(shape)) * invstd.reshape(shape)  # centred first
            axes = [0] + list(range(2, input.ndim))
            sum_dy, sum_dy_xhat = dy.sum(axes), (dy * xhat).sum(axes)
        else:  # an empty rank: zeros in the collective, zero parameter gradients (DDP's hooks still fire)
            sum_dy = sum_dy_xhat = torch.zeros_like(mean)
        grad_input = None
        if need_input:  # torch's rule: the collective runs when the input needs a gradient (same on every rank)
            total_dy, total_dy_xhat = sum_dy, sum_dy_xhat
            if ctx.synchronize:
                total_dy, total_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat, process_group=ctx.process_group)
            if input.numel() > 0:  # dy * scale - scale * SUM(dy) / n - xhat * scale * SUM(dy * xhat) / n
                scale = invstd if weight is None else weight.to(dtype) * invstd
                shift = -scale * total_dy / count
                slope = -scale * total_dy_xhat / count
                grad_input = torch.addcmul(shift.reshape(shape), dy, scale.reshape(shape))
                grad_input = grad_input.addcmul_(xhat, slope.reshape(shape)).to(input.dtype)
            else:
                grad_input = torch.zeros_like(input)
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight and weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None


def _per_feature_count(moments: Moments) -> Moments:
    """``moments`` with its count as a per-feature tensor, the layout ``all_gather_moments`` returns."""
    count = torch.full_like(moments.mean, moments.count) if isinstance(moments.count, int) else moments.count
    return Moments(count=count, mean=moments.mean, m2=moments.m2)


def _check_batch_size(input: Tensor) -> None:
    """torch's check before a local batch norm in training: more than one value per channel."""
    size = input.size()
    count = size[0]
    for d in size[2:]:
        count = count * d
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` that works on every torch.distributed backend, CPU (gloo) included.

    Same constructor, parameters, buffers, ``state_dict``, ``repr`` and input checks as torch's.
    Statistics are merged exactly across the ranks of ``process_group`` (None: the world) from
    each rank's ``(count, mean, m2)``: uneven batch sizes and empty ranks give the statistics of
    the concatenated batch. Float16/bfloat16 input is reduced and normalized in float32.
    It is a ``_BatchNorm`` but not an ``nn.SyncBatchNorm`` instance: DistributedDataParallel
    refuses every ``nn.SyncBatchNorm`` instance in a CPU model ("SyncBatchNorm layers only work
    with GPU modules").
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None, dtype: Any = None,
                 *, bias: bool = True) -> None:
        extra = {} if bias else {"bias": False}  # only when needed: older torch has no bias=
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        self.process_group = process_group

    __init__.__signature__ = inspect.signature(nn.SyncBatchNorm.__init__)  # type: ignore[attr-defined]
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("SyncBatchNorm cannot be scripted (neither can torch.nn.SyncBatchNorm): replace it by "
                           "a batch norm first, e.g. normkit_torch.freeze(model) for inference")

    def forward(self, input: Tensor) -> Tensor:
        if _deploy.is_traced(input):  # torch.fx: a leaf, as torch.nn.SyncBatchNorm
            return _deploy.traced_call(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        tracked = self.num_batches_tracked if self.training and self.track_running_stats else None
        if tracked is not None:
            tracked.add_(1)
        running_mean, running_var = self.running_mean, self.running_var
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        if not self.training and running_mean is not None and running_var is not None:
            return normkit.normalize(input, running_mean, running_var, self.weight, self.bias, eps=self.eps, axis=1)
        group = self.process_group or None
        synchronize = self.training and is_synchronized(group)  # eval with batch statistics: never synchronized
        if not synchronize:
            _check_batch_size(input)
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        output, count, mean, m2 = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, group, synchronize)
        if self.training and running_mean is not None and running_var is not None:
            new_mean, new_var = normkit.update_running_stats(
                running_mean, running_var, Moments(count=count, mean=mean, m2=m2),
                momentum=self.momentum, correction=1, num_batches=tracked,
            )
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Every ``_BatchNorm`` in ``module`` (torch's, normkit's, a SyncBatchNorm) becomes this class, as torch's does.

        The new modules hold the very same Parameters and buffers and keep the train/eval mode and
        ``qconfig``; a root that is itself a batch norm is returned as a new module.
        """
        output = module
        if isinstance(module, _BatchNorm):
            kwargs = {} if module.bias is not None or not module.affine else {"bias": False}
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group, device="meta", **kwargs)
            if module.affine:
                output.weight = module.weight
                output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output
