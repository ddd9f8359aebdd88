"""Batch normalization modules: drop-ins for torch.nn.BatchNorm1d/2d/3d and their Lazy variants.

training:  y = (x - mean_B) / sqrt(var_B + eps) * weight + bias   (var_B biased)
           running <- (1 - m) * running + m * batch (running_var unbiased); num_batches_tracked += 1;
           momentum=None: m = 1 / num_batches_tracked (cumulative average)
inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
           (batch statistics when the module has no running statistics)

Each class subclasses its torch.nn twin, so the constructor, parameters, buffers, repr, resets,
state_dict loading and every ``isinstance(m, nn.BatchNorm2d)`` check are torch's own. ``forward`` is
torch.nn's (input checks, ``num_batches_tracked`` bookkeeping) with one call to
``normkit_torch.functional.batch_norm``: torch's kernel by default, torch.nn's numerics; the exact
normkit core under ``set_kernel_policy("core")`` (torch's float32 kernel is ~1e-3 off at data offset 1e4).
The forward scripts (TorchScript compiles it with ``F.batch_norm``: a scripted module is torch.nn's);
torch.fx and torch's fusers see the torch.nn twin (``torch_twin``, see ``normkit_torch._deploy``).

Ghost batch norm: the keyword-only ``virtual_batch_size=V`` (not in torch.nn; Keras 2's name) makes
training normalize each run of V consecutive samples by its own statistics, through the core
(``normkit.batch_norm``); the running statistics take one update per call with the whole batch's
(the merge of the virtual batches'), ``num_batches_tracked += 1``. Inference is unchanged. Such a
module has no torch.nn twin: torch.fx records it as a leaf, and a scripted one runs in eval mode only.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit_torch import _deploy, _twins
from normkit_torch._functional import _is_scripting, batch_norm, cumulative_momentum
from normkit_torch._recording import scratch_copies, skip_running_update

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


def _with_virtual_batch_size(torch_cls: type) -> Callable[..., None]:
    """An ``__init__`` with ``torch_cls``'s signature plus the keyword-only ``virtual_batch_size=None``."""
    torch_init = torch_cls.__init__

    def __init__(self: Any, *args: Any, virtual_batch_size: Optional[int] = None, **kwargs: Any) -> None:
        torch_init(self, *args, **kwargs)
        self.virtual_batch_size = normkit.check_virtual_batch_size(virtual_batch_size)

    signature = inspect.signature(torch_init)
    extra = inspect.Parameter("virtual_batch_size", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Optional[int])
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(parameters=params + [extra] + rest)  # type: ignore[attr-defined]
    __init__.__doc__ = torch_init.__doc__
    return __init__


class _NormkitBatchNorm(_BatchNorm):
    """``forward`` of every normkit batch-norm module; the rest comes from the torch.nn class it is mixed into."""

    torch_twin = _deploy.TWIN_PROPERTY
    __jit_unused_properties__ = ["torch_twin"]
    __constants__ = [*_BatchNorm.__constants__, "virtual_batch_size"]
    virtual_batch_size: Optional[int] = None  # a module whose class convert swapped in place has no __init__ of ours

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.virtual_batch_size is None else f"{text}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        if not _is_scripting():
            if isinstance(input, Proxy):  # torch.fx: one call of the torch.nn twin
                return _deploy.traced_call(self, input)
        self._check_input_dim(input)
        exponential_average_factor = 0.0
        if self.momentum is not None:
            exponential_average_factor = self.momentum
        running_mean, running_var = self.running_mean, self.running_var
        track = self.training and self.track_running_stats
        if not _is_scripting():
            if track and skip_running_update(self, input):  # a checkpoint's recomputation, accumulate_statistics:
                track = False  # the kernel updates copies (the same ops: checkpoint compares what they save)
                running_mean, running_var = scratch_copies(running_mean, running_var)
        if track:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = cumulative_momentum(self.num_batches_tracked, self.running_mean)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            running_mean if use_buffers else None,
            running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            self.virtual_batch_size if self.training else None,
        )


class BatchNorm1d(_NormkitBatchNorm, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``; statistics over all but C."""

    __init__ = _with_virtual_batch_size(nn.BatchNorm1d)


class BatchNorm2d(_NormkitBatchNorm, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``, any memory format (channels_last is kept)."""

    __init__ = _with_virtual_batch_size(nn.BatchNorm2d)


class BatchNorm3d(_NormkitBatchNorm, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``."""

    __init__ = _with_virtual_batch_size(nn.BatchNorm3d)


class BatchNorm(_NormkitBatchNorm, _BatchNorm):
    """Batch norm over input of any rank >= 2 (channels on axis 1), with BatchNorm1d's arguments.

    It computes the statistics of the local batch only; ``normkit_torch.SyncBatchNorm`` synchronizes
    them across processes (``normkit_torch.convert`` turns a ``torch.nn.SyncBatchNorm`` into that one).
    No torch.nn twin: ``normkit_torch.to_torch`` leaves it as it is.
    """

    __init__ = _with_virtual_batch_size(_BatchNorm)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class LazyBatchNorm1d(_deploy.TraceableLazy, _NormkitBatchNorm, nn.LazyBatchNorm1d):
    """Drop-in for ``torch.nn.LazyBatchNorm1d``: ``num_features`` from the first input; becomes BatchNorm1d."""

    __init__ = _with_virtual_batch_size(nn.LazyBatchNorm1d)
    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_deploy.TraceableLazy, _NormkitBatchNorm, nn.LazyBatchNorm2d):
    """Drop-in for ``torch.nn.LazyBatchNorm2d``: ``num_features`` from the first input; becomes BatchNorm2d."""

    __init__ = _with_virtual_batch_size(nn.LazyBatchNorm2d)
    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_deploy.TraceableLazy, _NormkitBatchNorm, nn.LazyBatchNorm3d):
    """Drop-in for ``torch.nn.LazyBatchNorm3d``: ``num_features`` from the first input; becomes BatchNorm3d."""

    __init__ = _with_virtual_batch_size(nn.LazyBatchNorm3d)
    cls_to_become = BatchNorm3d  # type: ignore[assignment]


_twins.register({nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
                 nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
                 nn.LazyBatchNorm3d: LazyBatchNorm3d})
_deploy.register_fusers({nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d})
