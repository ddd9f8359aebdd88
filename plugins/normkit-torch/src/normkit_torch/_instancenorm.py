"""Instance normalization modules: drop-ins for torch.nn.InstanceNorm1d/2d/3d and their Lazy variants.

y = (x - mean) / sqrt(var + eps) * weight + bias, moments per sample and channel over the spatial
axes (var biased). torch's quirks are kept: ``affine=False`` and ``track_running_stats=False`` by
default (the Lazy variants default to True for both); unbatched input is accepted; with running
statistics, training updates them with the batch average of the per-instance mean and *unbiased*
variance; ``momentum=None`` means no update; ``num_batches_tracked`` never counts. ``forward`` is
torch.nn's checks plus one call to ``normkit_torch.functional.instance_norm``: torch's kernel by
default, the exact normkit core under ``set_kernel_policy("core")`` (~1e-3 apart at data offset 1e4).
The forward scripts (``F.instance_norm`` in TorchScript); torch.fx sees the torch.nn twin (``torch_twin``).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules.instancenorm import _InstanceNorm

from normkit_torch import _deploy, _twins
from normkit_torch._functional import _is_scripting, instance_norm

__all__ = [
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
]


class _NormkitInstanceNorm(_InstanceNorm):
    """``forward`` of every normkit instance-norm module; the rest is the torch.nn class it is mixed into
    (``_get_no_batch_dim``: the rank of an input without its batch axis)."""

    torch_twin = _deploy.TWIN_PROPERTY
    __jit_unused_properties__ = ["torch_twin"]

    def forward(self, input: Tensor) -> Tensor:
        if not _is_scripting():
            if isinstance(input, Proxy):  # torch.fx: one call of the torch.nn twin
                return _deploy.traced_call(self, input)
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == self._get_no_batch_dim():
            return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_NormkitInstanceNorm, nn.InstanceNorm1d):
    """Drop-in for ``torch.nn.InstanceNorm1d``: input ``(N, C, L)`` or unbatched ``(C, L)``."""


class InstanceNorm2d(_NormkitInstanceNorm, nn.InstanceNorm2d):
    """Drop-in for ``torch.nn.InstanceNorm2d``: input ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""


class InstanceNorm3d(_NormkitInstanceNorm, nn.InstanceNorm3d):
    """Drop-in for ``torch.nn.InstanceNorm3d``: input ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``."""


class LazyInstanceNorm1d(_deploy.TraceableLazy, _NormkitInstanceNorm, nn.LazyInstanceNorm1d):
    """Drop-in for ``torch.nn.LazyInstanceNorm1d``; becomes InstanceNorm1d after the first input."""

    cls_to_become = InstanceNorm1d  # type: ignore[assignment]


class LazyInstanceNorm2d(_deploy.TraceableLazy, _NormkitInstanceNorm, nn.LazyInstanceNorm2d):
    """Drop-in for ``torch.nn.LazyInstanceNorm2d``; becomes InstanceNorm2d after the first input."""

    cls_to_become = InstanceNorm2d  # type: ignore[assignment]


class LazyInstanceNorm3d(_deploy.TraceableLazy, _NormkitInstanceNorm, nn.LazyInstanceNorm3d):
    """Drop-in for ``torch.nn.LazyInstanceNorm3d``; becomes InstanceNorm3d after the first input."""

    cls_to_become = InstanceNorm3d  # type: ignore[assignment]


_twins.register({nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d,
                 nn.InstanceNorm3d: InstanceNorm3d, nn.LazyInstanceNorm1d: LazyInstanceNorm1d,
                 nn.LazyInstanceNorm2d: LazyInstanceNorm2d, nn.LazyInstanceNorm3d: LazyInstanceNorm3d})
