"""Per-sample normalization modules: drop-ins for torch.nn.LayerNorm, GroupNorm and RMSNorm.

layer: y = (x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape) axes.
group: channels (axis 1) split into num_groups; moments per sample and group; affine per channel.
rms:   y = x / sqrt(mean(x**2) + eps) * weight over the last axes; eps=None is the machine epsilon
       of the compute dtype (float32's for float16/bfloat16 input, as torch).
Each class subclasses its torch.nn twin (arguments, parameters, repr, reset are torch's); ``forward``
is one call to its ``normkit_torch.functional`` dispatch: torch's kernel by default (torch.nn's
numerics), the exact normkit core under ``set_kernel_policy("core")`` (torch's float32 layer and
group norm are ~3e-3 off at data offset 1e4). Each forward scripts (TorchScript compiles the
``torch.nn.functional`` namesake); torch.fx sees the torch.nn twin (``torch_twin``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy

from normkit_torch import _deploy, _twins
from normkit_torch._functional import _is_scripting, group_norm, layer_norm, rms_norm
from normkit_torch._twins import RMSNormBase as _RMSNormBase  # torch.nn.RMSNorm, or its stand-in on torch < 2.4

__all__ = ["LayerNorm", "GroupNorm", "RMSNorm"]


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``."""

    torch_twin = _deploy.TWIN_PROPERTY
    __jit_unused_properties__ = ["torch_twin"]

    def forward(self, input: Tensor) -> Tensor:
        if not _is_scripting():
            if isinstance(input, Proxy):
                return _deploy.traced_call(self, input)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm``: input ``(N, C, *)``."""

    torch_twin = _deploy.TWIN_PROPERTY
    __jit_unused_properties__ = ["torch_twin"]

    def forward(self, input: Tensor) -> Tensor:
        if not _is_scripting():
            if isinstance(input, Proxy):
                return _deploy.traced_call(self, input)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(_RMSNormBase):
    """Drop-in for ``torch.nn.RMSNorm``."""

    torch_twin = _deploy.TWIN_PROPERTY
    __jit_unused_properties__ = ["torch_twin"]

    def forward(self, x: Tensor) -> Tensor:
        if not _is_scripting():
            if isinstance(x, Proxy):
                return _deploy.traced_call(self, x)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


_twins.register({nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm})
if hasattr(nn, "RMSNorm"):
    _twins.register({nn.RMSNorm: RMSNorm})
