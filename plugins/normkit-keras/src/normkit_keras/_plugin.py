"""normkit's hooks for Keras and TensorFlow, under the package's name (its tests and modules name them here).

The entry module itself is the top-level ``_normkit_keras_plugin`` (it says why): discovering plugins imports
that module alone, so this package's ``__init__`` (the layers' registration with Keras) never runs then.
"""

from __future__ import annotations

from _normkit_keras_plugin import (
    JAX_KERNELS as JAX_KERNELS,
    TENSORFLOW_KERNELS as TENSORFLOW_KERNELS,
    normkit_array_namespace as normkit_array_namespace,
    normkit_frameworks as normkit_frameworks,
    normkit_kernel as normkit_kernel,
    normkit_test_backends as normkit_test_backends,
    normkit_test_harnesses as normkit_test_harnesses,
)

__all__ = [
    "TENSORFLOW_KERNELS",
    "JAX_KERNELS",
    "normkit_array_namespace",
    "normkit_frameworks",
    "normkit_kernel",
    "normkit_test_backends",
    "normkit_test_harnesses",
]
