"""normkit's entry point for Keras and TensorFlow (group ``normkit``, name ``keras``).

Thin on purpose: importing this module imports neither keras nor tensorflow. A type is only
looked at when its library is already in ``sys.modules`` (an array of a library that was never
imported cannot exist), as array-api-compat does.

Kernels: ``KERNELS`` lists what ``normkit_kernel`` offers for the TensorFlow namespace, whatever
the device (TensorFlow places its ops; the kernels decline inside ``jit_compile``), and
``JAX_KERNELS`` for ``jax.numpy`` arrays on the CPU (Keras on JAX computes with them). The
functional API and the layers (whose ``call`` is one ``normkit`` function call) reach them alike;
``normkit_keras.set_kernel_policy("core")`` or ``NORMKIT_KERAS_KERNELS=core`` turns them off.
Contracts and measurements: ``_kernels`` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
from typing import Any

from normkit import hookimpl
from normkit.plugin.kernels import KernelTable
from normkit.plugin.manager import imported_module
from normkit_keras._policy import POLICY

__all__ = [
    "KERNELS",
    "JAX_KERNELS",
    "normkit_array_namespace",
    "normkit_frameworks",
    "normkit_kernel",
    "normkit_test_backends",
    "normkit_test_harnesses",
]


def _is_tensorflow_array(array: Any) -> bool:
    tf = imported_module("tensorflow")  # never a module another thread is still importing
    if tf is None:
        return False
    return isinstance(array, (tf.Tensor, tf.Variable))


def _is_keras_tensor(array: Any) -> bool:
    if "keras" not in sys.modules:
        return False
    keras_tensor = imported_module("keras.src.backend.common.keras_tensor")
    return keras_tensor is not None and isinstance(array, keras_tensor.KerasTensor)


def _keras_variable_class() -> Any:
    variables = imported_module("keras.src.backend.common.variables")
    return None if variables is None else variables.Variable


@hookimpl
def normkit_array_namespace(array: Any) -> Any:
    """TensorFlow's namespace for tf.Tensor / tf.Variable; keras.ops' for KerasTensor; None otherwise.

    A ``keras.Variable`` gets the namespace of the arrays it holds on the current Keras backend.
    """
    if _is_keras_tensor(array):
        from normkit_keras._namespaces import keras_ops_namespace

        return keras_ops_namespace()
    variable = _keras_variable_class()
    if variable is not None and isinstance(array, variable):
        from normkit_keras._backend import backend_name, namespace_of_backend

        return namespace_of_backend(backend_name())
    if _is_tensorflow_array(array):
        from normkit_keras._namespaces import tensorflow_namespace

        return tensorflow_namespace()
    return None


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    return {"keras": "normkit_keras"}


@hookimpl
def normkit_test_backends() -> list[Any]:
    from normkit_keras.testing import tensorflow_backends

    return tensorflow_backends()


@hookimpl
def normkit_test_harnesses() -> list[Any]:
    from normkit_keras.testing import KerasHarness

    return [KerasHarness()]


# (op, device, dtype, layout) -> kernel; device "tf": wherever TensorFlow places the op
KERNELS = KernelTable(
    {
        ("batch_norm", "tf", "float32", "any"): "normkit_keras._kernels:batch_norm",
        ("layer_norm", "tf", "float32", "any"): "normkit_keras._kernels:layer_norm",
        ("group_norm", "tf", "float32", "any"): "normkit_keras._kernels:group_norm",
    },
    namespaces=lambda xp: _tensorflow_namespace() is xp,
    policy=POLICY,
)

# the same ops for float32 jax.numpy arrays on the CPU (Keras on JAX; custom_vjp, measured faster there)
JAX_KERNELS = KernelTable(
    {
        ("batch_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:batch_norm",
        ("layer_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:layer_norm",
        ("group_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:group_norm",
        ("rms_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:rms_norm",
    },
    namespaces=lambda xp: xp is sys.modules.get("jax.numpy"),
    policy=POLICY,
)


def _tensorflow_namespace() -> Any:
    if "tensorflow" not in sys.modules:
        return None
    from normkit_keras._namespaces import tensorflow_namespace

    return tensorflow_namespace()


@hookimpl
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Any:
    """A TensorFlow kernel (any device) from ``KERNELS``, a JAX one from ``JAX_KERNELS``; None otherwise."""
    if xp is sys.modules.get("jax.numpy") and device is None:  # traced by jax.jit: the default backend's device
        device = sys.modules["jax"].default_backend()
    # the namespace first: the policy (which may raise for a bad NORMKIT_KERAS_KERNELS) is read for our arrays only
    if KERNELS.namespaces(xp):
        return KERNELS.lookup(op, xp, "tf", dtype, layout)
    if JAX_KERNELS.namespaces(xp):
        return JAX_KERNELS.lookup(op, xp, device, dtype, layout)
    return None
