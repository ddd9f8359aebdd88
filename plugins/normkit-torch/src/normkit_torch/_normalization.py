"""Per-sample normalization modules: drop-ins for torch.nn.LayerNorm, GroupNorm and RMSNorm.

layer: y = (x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape) axes.
group: channels (axis 1) split into num_groups; moments per sample and group; affine per channel.
rms:   y = x / sqrt(mean(x**2) + eps) * weight over the last axes; eps=None is the machine epsilon
       of the compute dtype (float32's for float16/bfloat16 input, as torch).
Each class subclasses its torch.nn twin (arguments, parameters, repr, reset are torch's); only
``forward`` computes through the normkit core, after torch's own input checks and messages.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from normkit_torch import _functional

__all__ = ["LayerNorm", "GroupNorm", "RMSNorm"]


def _check_trailing(input: Tensor, normalized_shape: tuple[int, ...], star: str) -> None:
    """torch's message when the input's trailing dimensions are not ``normalized_shape``."""
    n = len(normalized_shape)
    if input.dim() < n or tuple(input.shape[input.dim() - n :]) != tuple(normalized_shape):
        dims = ", ".join(str(d) for d in normalized_shape)
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape [{star}{dims}], "
            f"but got input of size{list(input.shape)}"
        )


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``."""

    def forward(self, input: Tensor) -> Tensor:
        _check_trailing(input, self.normalized_shape, "*, ")
        return _functional.layer_norm(input, len(self.normalized_shape), self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm``: input ``(N, C, *)``."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
        channels = input.shape[1]
        if channels % self.num_groups != 0:
            raise RuntimeError(
                "Expected number of channels in input to be divisible by num_groups, but got input of shape "
                f"{list(input.shape)} and num_groups={self.num_groups}"
            )
        for name in ("weight", "bias"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or t.numel() != channels):
                raise RuntimeError(
                    f"Expected {name} to be a vector of size equal to the number of channels in input, "
                    f"but got {name} of shape {list(t.shape)} and input of shape {list(input.shape)}"
                )
        output = _functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        if input.dim() > 2 and not input.is_contiguous() and output.is_contiguous():
            output = _keep_layout(input, output)
        return output


def _keep_layout(input: Tensor, output: Tensor) -> Tensor:
    """Give ``output`` the channels-last layout of ``input`` (torch's GroupNorm keeps it)."""
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if input.dim() == rank and input.is_contiguous(memory_format=fmt):
            return output.contiguous(memory_format=fmt)
    return output


if hasattr(nn, "RMSNorm"):
    _RMSNormBase = nn.RMSNorm
else:  # torch < 2.4 has no nn.RMSNorm: the same arguments, parameters and repr, written out

    class _RMSNormBase(nn.Module):  # type: ignore[no-redef]
        __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

        def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                     device=None, dtype=None) -> None:
            super().__init__()
            if isinstance(normalized_shape, int):
                normalized_shape = (normalized_shape,)
            self.normalized_shape = tuple(normalized_shape)
            self.eps = eps
            self.elementwise_affine = elementwise_affine
            if elementwise_affine:
                self.weight = Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("weight", None)
            self.reset_parameters()

        def reset_parameters(self) -> None:
            if self.elementwise_affine:
                init.ones_(self.weight)

        def extra_repr(self) -> str:
            return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


class RMSNorm(_RMSNormBase):
    """Drop-in for ``torch.nn.RMSNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.normalized_shape)
        if x.dim() < n:
            raise ValueError(f"Input tensor must have at least {n} dimensions, but got {x.dim()}")
        _check_trailing(x, self.normalized_shape, "*")
        return _functional.rms_norm(x, n, self.weight, self.eps)
