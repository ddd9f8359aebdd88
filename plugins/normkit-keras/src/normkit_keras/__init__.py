"""normkit's Keras 3 layers: drop-ins for ``keras.layers`` normalization layers, on every Keras backend.

The layers are imported on first access (PEP 562), so that normkit's entry module
``normkit_keras._plugin`` can be loaded without importing keras or tensorflow.
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

__all__ = list(_LAYERS)

if TYPE_CHECKING:
    from normkit_keras._batch_normalization import BatchNormalization
    from normkit_keras._family import GroupNormalization, LayerNormalization, RMSNormalization, UnitNormalization
    from normkit_keras._preprocessing import MinMaxScale, Standardize


def __getattr__(name: str) -> Any:
    module = _LAYERS.get(name)
    if module is None:
        raise AttributeError(f"module 'normkit_keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
