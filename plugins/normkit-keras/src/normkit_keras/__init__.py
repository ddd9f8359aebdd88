"""normkit's Keras 3 layers: drop-ins for ``keras.layers`` normalization layers, on every Keras backend.

The layers are imported on first access (PEP 562), so that normkit's entry module
``normkit_keras._plugin`` can be loaded without importing keras or tensorflow.

On the TensorFlow backend ``BatchNormalization`` trains through TensorFlow's fused kernel where the
plugin's measurements found it faster; ``normkit_keras.set_kernel_policy("core")`` (or
``NORMKIT_KERAS_KERNELS=core``) forces the generic core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAYERS = {
    "BatchNormalization": "normkit_keras._batch_normalization",
    "LayerNormalization": "normkit_keras._family",
    "GroupNormalization": "normkit_keras._family",
    "RMSNormalization": "normkit_keras._family",
    "UnitNormalization": "normkit_keras._family",
    "Standardize": "normkit_keras._preprocessing",
    "MinMaxScale": "normkit_keras._preprocessing",
}

_FUNCTIONS = {
    "set_kernel_policy": "normkit_keras._kernels",
    "get_kernel_policy": "normkit_keras._kernels",
    "get_state": "normkit_keras._state",
    "set_state": "normkit_keras._state",
    "from_state": "normkit_keras._state",
    "norm_states": "normkit_keras._state",
    "copy_norm_states": "normkit_keras._state",
    "fold_batch_norm": "normkit_keras._fold",
    "UnfoldedBatchNormWarning": "normkit_keras._fold",
    "freeze": "normkit_keras._freeze",
    "recalibrate": "normkit_keras._recalibrate",
}

__all__ = list(_LAYERS) + list(_FUNCTIONS)

if TYPE_CHECKING:
    from normkit_keras._batch_normalization import BatchNormalization
    from normkit_keras._kernels import get_kernel_policy, set_kernel_policy
    from normkit_keras._family import GroupNormalization, LayerNormalization, RMSNormalization, UnitNormalization
    from normkit_keras._fold import UnfoldedBatchNormWarning, fold_batch_norm
    from normkit_keras._freeze import freeze
    from normkit_keras._recalibrate import recalibrate
    from normkit_keras._preprocessing import MinMaxScale, Standardize
    from normkit_keras._state import copy_norm_states, from_state, get_state, norm_states, set_state


def __getattr__(name: str) -> Any:
    module = _LAYERS.get(name) or _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'normkit_keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
