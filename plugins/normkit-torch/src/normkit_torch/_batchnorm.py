"""Batch normalization modules: drop-ins for torch.nn.BatchNorm1d/2d/3d and their Lazy variants.

Each class subclasses its torch.nn twin, so the constructor, defaults, parameters and buffers
(names, shapes, dtypes, order), ``extra_repr``, ``reset_parameters``, ``reset_running_stats``,
``_load_from_state_dict`` (checkpoints without ``num_batches_tracked``) and every
``isinstance(m, nn.BatchNorm2d)`` / ``_BatchNorm`` check (``swa_utils.update_bn``, FSDP's
mixed-precision rule, weight-decay filters) are torch's own. Only ``forward`` differs: it computes
through the normkit core, or through the fused kernel the plugin hook offers for the input's
device, dtype and layout (``normkit_torch._plugin`` has the decision table and its measurements).

Kernel choice: each module keeps a plain dict ``_normkit_kernels`` {(op, device type, dtype,
layout): kernel}, filled once at construction (``reset_parameters``; for the module's device and
every float dtype and layout) and again after ``.to()`` / ``.cuda()`` / ``.double()`` (``_apply``); a configuration not
in it is resolved on its first eager call. It is not in the state_dict, and deep-copies and pickles
(kernels are module-level functions). A forward call only computes the layout key
(``_functional.layout_of``: shape and stride checks) and reads the dict, so torch.compile
(fullgraph=True) traces it without a graph break; while compiling, a configuration missing from the
dict uses the generic core.

The aten path: where the chosen kernel is aten's (``_kernels.native_batch_norm_*``, or
``function_or_native`` when autograd records) and the per-channel tensors are already in the dtype
aten takes, ``forward`` calls ``torch.batch_norm`` exactly as ``F.batch_norm`` does, with the module's
running buffers: aten updates them in place (torch.nn's own update, bit for bit) and checks the
feature counts itself (torch's messages), so no ``(y, mean, var_biased)`` round trip, zero buffers
or ``lerp_`` remain on the call path. Parameters and buffers are read from ``_parameters`` /
``_buffers`` (``Module.__getattr__`` costs about 0.6 us a name), falling back to attribute access for
a name moved out of them (``torch.nn.utils.parametrize``). Every other kernel (the core, ``_autograd``,
dtype conversions) keeps the contract below. ``normkit_torch.set_kernel_policy("core")`` or
``NORMKIT_TORCH_KERNELS=core`` makes every module use the generic core (the reference).

training:  y = (x - mean_B) / sqrt(var_B + eps) * weight + bias   (var_B biased)
           running_mean <- (1 - m) * running_mean + m * mean_B
           running_var  <- (1 - m) * running_var + m * var_B * n / (n - 1)   (unbiased)
           num_batches_tracked += 1; momentum=None: m = 1 / num_batches_tracked (cumulative average)
inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
           (batch statistics when the module has no running statistics)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit_torch import _functional, _kernels
from normkit_torch._functional import _POLICY

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


def check_batch_size(input: Tensor) -> None:
    """torch's ``_verify_batch_size``: training needs more than one value per channel."""
    size = input.size()
    count = size[0]
    for d in size[2:]:
        count = count * d
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_features(channels: int, **tensors: Optional[Tensor]) -> None:
    """torch's kernel check: every per-channel tensor holds ``channels`` elements (first offender named)."""
    for name, t in tensors.items():
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OPS = ("batch_norm_train", "batch_norm_eval")
_CORE = {"batch_norm_train": _functional.batch_norm_train, "batch_norm_eval": _functional.batch_norm_eval}
_NATIVE_TRAIN = _kernels.native_batch_norm_train
_NATIVE_EVAL = _kernels.native_batch_norm_eval
_HYBRID_TRAIN = _kernels.function_or_native_batch_norm_train


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters(recurse=False):
        return t.device
    for t in module.buffers(recurse=False):
        return t.device
    return torch.device("cpu")


class _NormkitBatchNorm:
    """``forward`` of every normkit batch-norm module; the rest comes from the torch.nn class it is mixed into."""

    def reset_parameters(self: Any) -> None:
        """torch's, then the kernels are chosen (torch calls this from ``__init__`` and after a lazy module's
        first input; overriding it keeps the constructor's signature torch's own)."""
        super().reset_parameters()
        self._normkit_reset_kernels()

    def _normkit_reset_kernels(self: Any) -> None:
        """Resolve the kernels once for the module's device (and the CPU) and every float dtype and layout."""
        table: dict = {}
        device = _module_device(self)
        devices = [device] if device.type == "cpu" else [device, torch.device("cpu")]
        if _functional.kernels_enabled():
            for dev in devices:
                for dtype in _FLOAT_DTYPES:
                    for layout in _functional.LAYOUTS:
                        for op in _OPS:
                            table[(op, dev.type, dtype, layout)] = _functional.resolve_kernel(op, dev, dtype, layout)
        self._normkit_kernels = table

    def _apply(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        self._normkit_reset_kernels()
        return out

    def _normkit_kernel(self: Any, op: str, x: Tensor) -> Any:
        """The kernel for ``op`` on ``x``: the one chosen for its configuration, never a hook call when known."""
        if not _functional.kernels_enabled():
            return _CORE[op]
        key = (op, x.device.type, x.dtype, _functional.layout_of(x))
        table = self.__dict__.get("_normkit_kernels")
        if table is None:  # a module made without __init__ (e.g. copy.copy of an old pickle)
            table = self._normkit_kernels = {}
        found = table.get(key)
        if found is not None:
            return found
        if _functional.is_compiling():  # no hook call inside a graph: the reference path
            return _CORE[op]
        found = table[key] = _functional.resolve_kernel(op, x.device, x.dtype, key[3])
        return found

    def forward(self: Any, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # parameters and buffers straight from their dicts (Module.__getattr__ costs ~0.6 us a name);
        # a name moved out of them (parametrize, weight hooks) is read as an attribute
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        running_mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
        running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        training = self.training
        momentum: Any = self.momentum
        if training and self.track_running_stats:
            tracked = buffers["num_batches_tracked"] if "num_batches_tracked" in buffers else self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                if momentum is None:  # cumulative moving average
                    if _functional.is_compiling():  # no float(tensor) in a graph: a 0-d tensor instead
                        momentum = 1.0 / tracked.to(running_mean.dtype)
                    else:
                        momentum = 1.0 / float(tracked)
        if momentum is None:
            momentum = 0.0
        if training:
            batch_stats = True
            if not self.track_running_stats:
                running_mean = running_var = None
        else:
            batch_stats = running_mean is None and running_var is None
        eps = self.eps
        # the kernel of this configuration, chosen once per module (see _normkit_kernel)
        table = self.__dict__.get("_normkit_kernels") if _POLICY.value == "auto" else None
        if table is not None:
            kernel = table.get((
                "batch_norm_train" if batch_stats else "batch_norm_eval",
                "cpu" if input.is_cpu else input.device.type,
                input.dtype,
                _functional.layout_of(input),
            ))
            if kernel is None:
                kernel = self._normkit_kernel("batch_norm_train" if batch_stats else "batch_norm_eval", input)
        else:
            kernel = self._normkit_kernel("batch_norm_train" if batch_stats else "batch_norm_eval", input)
        # aten's batch norm: called the way F.batch_norm calls it, with the module's own buffers (aten
        # updates them in place, torch.nn's exact update; it checks the feature counts itself)
        if (
            kernel is _NATIVE_TRAIN
            or kernel is _NATIVE_EVAL
            or (kernel is _HYBRID_TRAIN and _records_grad(input, weight, bias))
        ) and _aten_dtypes(input, weight, bias, running_mean, running_var) and not isinstance(momentum, Tensor):
            _check_mode_args(input, batch_stats, eps)
            return torch.batch_norm(
                input, weight, bias, running_mean, running_var, batch_stats, momentum, eps,
                False if input.is_cpu else torch.backends.cudnn.enabled,
            )
        return _batch_norm(input, running_mean, running_var, weight, bias, batch_stats, momentum, eps, kernel)


def _check_mode_args(input: Tensor, training: bool, eps: float) -> None:
    """torch's checks before a batch norm: more than one value per channel and eps > 0 in training, eps >= 0 otherwise."""
    if training:
        check_batch_size(input)
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _records_grad(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """True when autograd will record a batch-norm call on these tensors (function_or_native's test)."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _aten_dtypes(input: Tensor, *per_channel: Optional[Tensor]) -> bool:
    """True when aten takes these tensors as they are: every per-channel tensor in the statistics dtype
    (float32 for half-precision input, else the input's). Anything else goes through the kernel's
    wrapper, which converts."""
    dtype = input.dtype
    if dtype is torch.float16 or dtype is torch.bfloat16:
        dtype = torch.float32
    for t in per_channel:
        if t is not None and t.dtype is not dtype:
            return False
    return True


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Any,
    eps: float,
    kernel: Any = None,
) -> Tensor:
    """``F.batch_norm``'s contract: validate as torch does, compute through ``kernel`` (the core's
    function of the mode when None), update the buffers in place."""
    _check_mode_args(input, training, eps)
    check_features(input.shape[1], running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if not training:
        return (kernel or _functional.batch_norm_eval)(input, running_mean, running_var, weight, bias, eps, 1)
    output, mean, var = (kernel or _functional.batch_norm_train)(input, weight, bias, eps, 1)
    if running_mean is not None and running_var is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        _functional.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return output


class BatchNorm1d(_NormkitBatchNorm, nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``; statistics over all but C."""


class BatchNorm2d(_NormkitBatchNorm, nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``, any memory format (channels_last is kept)."""


class BatchNorm3d(_NormkitBatchNorm, nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``."""


class BatchNorm(_NormkitBatchNorm, _BatchNorm):
    """Batch norm over input of any rank >= 2 (channels on axis 1), with BatchNorm1d's arguments.

    ``normkit_torch.convert`` turns a ``torch.nn.SyncBatchNorm`` into this module. It computes
    the statistics of the local batch only: it does not synchronize them across processes.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class LazyBatchNorm1d(_NormkitBatchNorm, nn.LazyBatchNorm1d):
    """Drop-in for ``torch.nn.LazyBatchNorm1d``: ``num_features`` from the first input; becomes BatchNorm1d."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_NormkitBatchNorm, nn.LazyBatchNorm2d):
    """Drop-in for ``torch.nn.LazyBatchNorm2d``: ``num_features`` from the first input; becomes BatchNorm2d."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_NormkitBatchNorm, nn.LazyBatchNorm3d):
    """Drop-in for ``torch.nn.LazyBatchNorm3d``: ``num_features`` from the first input; becomes BatchNorm3d."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]
