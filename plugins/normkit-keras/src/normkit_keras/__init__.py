"""normkit's Keras 3 layers: drop-ins for ``keras.layers`` normalization layers, on every Keras backend.

Each layer subclasses its Keras twin (constructor, weights and config are Keras's; ``call`` is
normkit's), so ``isinstance(layer, keras.layers.BatchNormalization)`` holds. Importing this
package registers the layers with Keras's serialization (``_registration``) without importing
keras: the layers load on first access (PEP 562) or right after keras is imported. normkit's entry
module is the top-level ``_normkit_keras_plugin``, not a module of this package, so discovering
plugins never runs this registration.

On the TensorFlow backend the layers (and ``normkit``'s functions on ``tf.Tensor``) run
TensorFlow kernels where the plugin offers them; ``normkit_keras.set_kernel_policy("core")`` (or
``NORMKIT_KERAS_KERNELS=core``) forces the generic core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from normkit_keras._registration import register_with_keras

__version__ = "0.3.0"

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
    "set_kernel_policy": "normkit_keras._policy",
    "get_kernel_policy": "normkit_keras._policy",
    "get_state": "normkit_keras._state",
    "set_state": "normkit_keras._state",
    "from_state": "normkit_keras._state",
    "norm_states": "normkit_keras._state",
    "copy_norm_states": "normkit_keras._state",
    "fold_batch_norm": "normkit_keras._fold",
    "UnfoldedBatchNormWarning": "normkit_keras._fold",
    "freeze": "normkit_keras._freeze",
    "recalibrate": "normkit_keras._recalibrate",
    "convert": "normkit_keras._convert",
    "ConversionReport": "normkit_keras._convert",
    "UnconvertedNormWarning": "normkit_keras._convert",
    "accumulate_statistics": "normkit_keras._accumulate",
}

__all__ = list(_LAYERS) + list(_FUNCTIONS)

if TYPE_CHECKING:
    from normkit_keras._accumulate import (
        accumulate_statistics as accumulate_statistics,
    )
    from normkit_keras._batch_normalization import (
        BatchNormalization as BatchNormalization,
    )
    from normkit_keras._convert import (
        ConversionReport as ConversionReport,
        UnconvertedNormWarning as UnconvertedNormWarning,
        convert as convert,
    )
    from normkit_keras._family import (
        GroupNormalization as GroupNormalization,
        LayerNormalization as LayerNormalization,
        RMSNormalization as RMSNormalization,
        UnitNormalization as UnitNormalization,
    )
    from normkit_keras._fold import (
        UnfoldedBatchNormWarning as UnfoldedBatchNormWarning,
        fold_batch_norm as fold_batch_norm,
    )
    from normkit_keras._freeze import (
        freeze as freeze,
    )
    from normkit_keras._policy import (
        get_kernel_policy as get_kernel_policy,
        set_kernel_policy as set_kernel_policy,
    )
    from normkit_keras._preprocessing import (
        MinMaxScale as MinMaxScale,
        Standardize as Standardize,
    )
    from normkit_keras._recalibrate import (
        recalibrate as recalibrate,
    )
    from normkit_keras._state import (
        copy_norm_states as copy_norm_states,
        from_state as from_state,
        get_state as get_state,
        norm_states as norm_states,
        set_state as set_state,
    )


def __getattr__(name: str) -> Any:
    module = _LAYERS.get(name) or _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'normkit_keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


register_with_keras()
