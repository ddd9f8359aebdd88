"""normkit for PyTorch: drop-in replacements for torch.nn's normalization modules.

    from normkit_torch import BatchNorm2d        # same arguments, defaults and state_dict as torch.nn's
    model = normkit_torch.convert(model)         # swap every torch.nn norm module in a model
    model = normkit_torch.to_torch(model)        # and back

Every module's forward is one call to ``normkit_torch.functional`` (shaped like torch.nn.functional):
torch's own kernels by default, on every device (torch.nn's results and speed);
``normkit_torch.set_kernel_policy("core")`` (or ``NORMKIT_TORCH_KERNELS=core``) computes through the
normkit core instead, exact where torch's float32 kernels lose digits (data far from zero).
Importing this package does not import torch: names are loaded on first use, so the normkit
plugin host can read the entry point without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "BatchNorm": "_batchnorm",
    "BatchNorm1d": "_batchnorm",
    "BatchNorm2d": "_batchnorm",
    "BatchNorm3d": "_batchnorm",
    "LazyBatchNorm1d": "_batchnorm",
    "LazyBatchNorm2d": "_batchnorm",
    "LazyBatchNorm3d": "_batchnorm",
    "SyncBatchNorm": "_sync",
    "InstanceNorm1d": "_instancenorm",
    "InstanceNorm2d": "_instancenorm",
    "InstanceNorm3d": "_instancenorm",
    "LazyInstanceNorm1d": "_instancenorm",
    "LazyInstanceNorm2d": "_instancenorm",
    "LazyInstanceNorm3d": "_instancenorm",
    "LayerNorm": "_normalization",
    "GroupNorm": "_normalization",
    "RMSNorm": "_normalization",
    "Standardize": "_preprocessing",
    "MinMaxScale": "_preprocessing",
    "convert": "_convert",
    "ConversionReport": "_convert",
    "UnconvertedNormWarning": "_convert",
    "to_torch": "_convert",
    "register_conversion": "_conversions",
    "Float32RMSNorm": "_conversions",
    "accumulate_statistics": "_accumulate",
    "set_kernel_policy": "_functional",
    "get_kernel_policy": "_functional",
    "fold_batch_norm": "_fold",
    "UnfoldedBatchNormWarning": "_fold",
    "FrozenBatchNorm": "_frozen",
    "FrozenBatchNorm1d": "_frozen",
    "FrozenBatchNorm2d": "_frozen",
    "FrozenBatchNorm3d": "_frozen",
    "freeze": "_frozen",
    "unfreeze": "_frozen",
    "BatchRenorm1d": "_renorm",
    "BatchRenorm2d": "_renorm",
    "BatchRenorm3d": "_renorm",
    "recalibrate": "_recalibrate",
    "get_state": "_state",
    "set_state": "_state",
    "from_state": "_state",
    "norm_states": "_state",
    "copy_norm_states": "_state",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from normkit_torch._accumulate import (
        accumulate_statistics as accumulate_statistics,
    )
    from normkit_torch._batchnorm import (
        BatchNorm as BatchNorm,
        BatchNorm1d as BatchNorm1d,
        BatchNorm2d as BatchNorm2d,
        BatchNorm3d as BatchNorm3d,
        LazyBatchNorm1d as LazyBatchNorm1d,
        LazyBatchNorm2d as LazyBatchNorm2d,
        LazyBatchNorm3d as LazyBatchNorm3d,
    )
    from normkit_torch._conversions import (
        Float32RMSNorm as Float32RMSNorm,
        register_conversion as register_conversion,
    )
    from normkit_torch._convert import (
        ConversionReport as ConversionReport,
        UnconvertedNormWarning as UnconvertedNormWarning,
        convert as convert,
        to_torch as to_torch,
    )
    from normkit_torch._fold import (
        UnfoldedBatchNormWarning as UnfoldedBatchNormWarning,
        fold_batch_norm as fold_batch_norm,
    )
    from normkit_torch._frozen import (
        FrozenBatchNorm as FrozenBatchNorm,
        FrozenBatchNorm1d as FrozenBatchNorm1d,
        FrozenBatchNorm2d as FrozenBatchNorm2d,
        FrozenBatchNorm3d as FrozenBatchNorm3d,
        freeze as freeze,
        unfreeze as unfreeze,
    )
    from normkit_torch._functional import (
        get_kernel_policy as get_kernel_policy,
        set_kernel_policy as set_kernel_policy,
    )
    from normkit_torch._instancenorm import (
        InstanceNorm1d as InstanceNorm1d,
        InstanceNorm2d as InstanceNorm2d,
        InstanceNorm3d as InstanceNorm3d,
        LazyInstanceNorm1d as LazyInstanceNorm1d,
        LazyInstanceNorm2d as LazyInstanceNorm2d,
        LazyInstanceNorm3d as LazyInstanceNorm3d,
    )
    from normkit_torch._normalization import (
        GroupNorm as GroupNorm,
        LayerNorm as LayerNorm,
        RMSNorm as RMSNorm,
    )
    from normkit_torch._preprocessing import (
        MinMaxScale as MinMaxScale,
        Standardize as Standardize,
    )
    from normkit_torch._recalibrate import (
        recalibrate as recalibrate,
    )
    from normkit_torch._renorm import (
        BatchRenorm1d as BatchRenorm1d,
        BatchRenorm2d as BatchRenorm2d,
        BatchRenorm3d as BatchRenorm3d,
    )
    from normkit_torch._state import (
        copy_norm_states as copy_norm_states,
        from_state as from_state,
        get_state as get_state,
        norm_states as norm_states,
        set_state as set_state,
    )
    from normkit_torch._sync import (
        SyncBatchNorm as SyncBatchNorm,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normkit_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"normkit_torch.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
