"""normkit's entry point for Keras and TensorFlow (group ``normkit``, name ``keras``): outside ``normkit_keras`` on purpose.

Discovering normkit's plugins imports this module and registers its hooks, nothing else: it imports neither
keras nor tensorflow nor the package ``normkit_keras``. That package's ``__init__`` registers the layers with
Keras's serialization, which needs an import hook while keras is not imported (``normkit_keras._registration``);
Python runs a package's ``__init__`` before any module inside it, so an entry module inside ``normkit_keras``
would give that hook to every process that merely discovers plugins (a torch-only user calling
``normkit.batch_norm``). Here, the registration runs only when ``normkit_keras`` is imported: by the user, or for
an array this plugin serves (a KerasTensor or keras.Variable: keras is imported then, so no hook; a tf.Tensor; a
kernel for TensorFlow's or JAX's namespace, whose kernels and policy live in the package).

A type is only looked at when its library is already in ``sys.modules`` (an array of a library that was never
imported cannot exist), as array-api-compat does; the TensorFlow namespace is normkit_keras's own object, so a
namespace is only compared with it once ``normkit_keras._namespaces`` is imported.

Kernels: ``TENSORFLOW_KERNELS`` lists what ``normkit_kernel`` offers for the TensorFlow namespace, whatever the
device (TensorFlow places its ops; the kernels decline inside ``jit_compile``), and ``JAX_KERNELS`` for
``jax.numpy`` arrays on the CPU (Keras on JAX computes with them). The functional API and the layers (whose
``call`` is one ``normkit`` function call) reach them alike; ``normkit_keras.set_kernel_policy("core")`` or
``NORMKIT_KERAS_KERNELS=core`` turns them off. Contracts and measurements: ``normkit_keras._kernels`` and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from normkit import hookimpl
from normkit.plugin.kernels import KernelTable
from normkit.plugin.manager import imported_module

__all__ = [
    "TENSORFLOW_KERNELS",
    "JAX_KERNELS",
    "normkit_array_namespace",
    "normkit_frameworks",
    "normkit_kernel",
    "normkit_test_backends",
    "normkit_test_harnesses",
]

# (op, device, dtype, layout) -> kernel; device "tf": wherever TensorFlow places the op
TENSORFLOW_KERNELS = {
    ("batch_norm", "tf", "float32", "any"): "normkit_keras._kernels:batch_norm",
    ("layer_norm", "tf", "float32", "any"): "normkit_keras._kernels:layer_norm",
    ("group_norm", "tf", "float32", "any"): "normkit_keras._kernels:group_norm",
}

# the same ops for float32 jax.numpy arrays on the CPU (Keras on JAX; custom_vjp, measured faster there)
JAX_KERNELS = {
    ("batch_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:batch_norm",
    ("layer_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:layer_norm",
    ("group_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:group_norm",
    ("rms_norm", "cpu", "float32", "any"): "normkit_keras._jax_kernels:rms_norm",
}


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


def _is_tensorflow_namespace(xp: Any) -> bool:
    namespaces = imported_module("normkit_keras._namespaces")  # its namespace cannot exist before it is imported
    return namespaces is not None and "tensorflow" in sys.modules and namespaces.tensorflow_namespace() is xp


def _is_jax_numpy(xp: Any) -> bool:
    return xp is not None and xp is sys.modules.get("jax.numpy")


@functools.cache
def _tables() -> tuple[KernelTable, KernelTable]:
    """(TensorFlow's, JAX's) tables under the plugin's policy; built at the first lookup for one of those namespaces."""
    from normkit_keras._policy import POLICY

    return (KernelTable(TENSORFLOW_KERNELS, namespaces=_is_tensorflow_namespace, policy=POLICY),
            KernelTable(JAX_KERNELS, namespaces=_is_jax_numpy, policy=POLICY))


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


@hookimpl
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Any:
    """A TensorFlow kernel (any device) from ``TENSORFLOW_KERNELS``, a JAX one from ``JAX_KERNELS``; None otherwise."""
    # the namespace first: the policy (which may raise for a bad NORMKIT_KERAS_KERNELS) is read for our arrays only
    if _is_tensorflow_namespace(xp):
        return _tables()[0].lookup(op, xp, "tf", dtype, layout)
    if _is_jax_numpy(xp):
        if device is None:  # traced by jax.jit: the default backend's device
            device = sys.modules["jax"].default_backend()
        return _tables()[1].lookup(op, xp, device, dtype, layout)
    return None
