"""A drop-in for torch.nn.SyncBatchNorm on any torch.distributed backend (gloo on CPU, NCCL on CUDA).

training, more than one rank: every rank's ``(count, mean, m2)`` from ``normkit.batch_moments`` and a
signature (feature count, dtype, whether a backward follows, parameters, eps, momentum) go through
ONE ``all_gather`` (``normkit_torch.distributed.agreed_moments``): a rank that differs makes every
rank raise ``SyncMismatchError`` naming what differs; else Chan's merge gives the statistics of the
concatenated batch, and as one process on that batch

    y = (x - mean) / sqrt(var + eps) * weight + bias                        (var biased, centred first)
    running stats: normkit.update_running_stats(..., correction=1) with the GLOBAL count (torch's unbiased)

The gather is differentiable (its backward is ONE ``all_reduce``, itself differentiable), so autograd
gives the input gradient of the whole batch, second derivatives and gradient penalties included;
``grad_weight`` and ``grad_bias`` stay local sums, which DDP then averages, as torch's SyncBatchNorm.
A rank with an empty batch (count 0) joins every collective and contributes nothing; a total of one
value per channel over all ranks raises torch's "Expected more than 1 value per channel" on every
rank. A single rank or no process group: the same math without collectives, plain torch ops (so
``torch.func`` transforms work wherever torch.nn.BatchNorm's do); eval mode with running statistics:
``normkit.normalize`` with them. Eval mode never communicates (as torch's): with
``track_running_stats=False`` it uses this rank's batch statistics.
Only public normkit API is used (``batch_moments``, ``Moments``, ``update_running_stats``, ``normalize``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit import Moments
from normkit_torch import _deploy, _twins
from normkit_torch._recording import skip_running_update
from normkit_torch.distributed import agreed_moments, is_synchronized, local_moments, signature

__all__ = ["SyncBatchNorm"]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> Tensor:
    """``normkit.normalize``; an empty batch gets the same broadcast expression, still on the autograd graph
    (its rank must reach the backward's collective)."""
    if x.numel() > 0:
        return normkit.normalize(x, mean, var, weight, bias, eps=eps, axis=1)
    shape = _channel_shape(x)
    scale = torch.rsqrt(var + eps) if weight is None else torch.rsqrt(var + eps) * weight
    y = (x - mean.reshape(shape)) * scale.reshape(shape)
    return (y if bias is None else y + bias.reshape(shape)).to(x.dtype)


def _check_batch_size(input: Tensor) -> None:
    """torch's check before a local batch norm in training: more than one value per channel."""
    size = input.size()
    count = size[0]
    for d in size[2:]:
        count = count * d
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_total_count(input: Tensor, count: Tensor, world: int) -> None:
    """torch's check on the count over every rank (the same on all of them, so all raise)."""
    if count.numel() and bool((count == 1).all()):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()} "
                         f"(1 value per channel in total over the {world} ranks)")


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
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # one rounding, at the end
        local = local_moments(x, axis=1)
        if synchronize:
            total = agreed_moments(local, self._signature(input, running_mean is not None), process_group=group,
                                   state=self.__dict__.setdefault("_normkit_agreement", {}), layer=self._layer())
            _check_total_count(input, total.count, torch.distributed.get_world_size(group))
        else:
            total = local
        output = _normalize(x, total.mean, total.var, self.weight, self.bias, self.eps).to(input.dtype)
        if self.training and running_mean is not None and running_var is not None \
                and not skip_running_update(self, total):  # a checkpoint's recomputation, accumulate_statistics
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
            count = total.count.detach() if isinstance(total.count, Tensor) else total.count
            new_mean, new_var = normkit.update_running_stats(
                running_mean, running_var, Moments(count=count, mean=total.mean.detach(), m2=total.m2.detach()),
                momentum=self.momentum, correction=1, num_batches=tracked,
            )
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return output

    def _signature(self, input: Tensor, running_stats: bool) -> tuple[float, ...]:
        return signature(input, weight=self.weight is not None, bias=self.bias is not None,
                         running_stats=running_stats, eps=self.eps, momentum=self.momentum)

    def _layer(self) -> str:
        return f"SyncBatchNorm({self.num_features})"

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


_twins.register({nn.SyncBatchNorm: SyncBatchNorm})
