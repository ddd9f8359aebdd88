"""normkit's Flax NNX layers: drop-ins for ``flax.nnx`` normalization layers, with exact statistics.

``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm`` subclass their ``flax.nnx``
twins (constructor, Variables, train/eval are Flax's; ``__call__`` is normkit's where exactness is
asked for: ``use_fast_variance=False``, ``axis_name``, or kernel policy ``"core"``). The tools move
states between frameworks (``get_state``, ``set_state``, ``from_state``, ``norm_states``,
``copy_norm_states``) and edit models (``recalibrate``, ``freeze``, ``fold_batch_norm``). Written
against normkit's public API and hooks only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_NAMES = {
    "BatchNorm": "normkit_flax._layers",
    "LayerNorm": "normkit_flax._layers",
    "RMSNorm": "normkit_flax._layers",
    "GroupNorm": "normkit_flax._layers",
    "InstanceNorm": "normkit_flax._layers",
    "set_kernel_policy": "normkit_flax._policy",
    "get_kernel_policy": "normkit_flax._policy",
    "get_state": "normkit_flax._state",
    "set_state": "normkit_flax._state",
    "from_state": "normkit_flax._state",
    "norm_states": "normkit_flax._state",
    "copy_norm_states": "normkit_flax._state",
    "recalibrate": "normkit_flax._tools",
    "freeze": "normkit_flax._tools",
    "fold_batch_norm": "normkit_flax._tools",
    "FrozenBatchNorm": "normkit_flax._tools",
}

__all__ = list(_NAMES)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and the API reference (nothing is imported at run time)
    from normkit_flax._layers import (
        BatchNorm as BatchNorm,
        GroupNorm as GroupNorm,
        InstanceNorm as InstanceNorm,
        LayerNorm as LayerNorm,
        RMSNorm as RMSNorm,
    )
    from normkit_flax._policy import get_kernel_policy as get_kernel_policy, set_kernel_policy as set_kernel_policy
    from normkit_flax._state import (
        copy_norm_states as copy_norm_states,
        from_state as from_state,
        get_state as get_state,
        norm_states as norm_states,
        set_state as set_state,
    )
    from normkit_flax._tools import (
        FrozenBatchNorm as FrozenBatchNorm,
        fold_batch_norm as fold_batch_norm,
        freeze as freeze,
        recalibrate as recalibrate,
    )


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'normkit_flax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
