"""normkit's entry point for Keras and TensorFlow (group ``normkit``, name ``keras``).

Thin on purpose: importing this module imports neither keras nor tensorflow. A type is only
looked at when its library is already in ``sys.modules`` (an array of a library that was never
imported cannot exist), as array-api-compat does.

Kernels (``normkit_kernel``). ``BatchNormalization`` asks, once per layer and (dtype, layout) on
the TensorFlow backend, for ``"batch_norm_train"``: ``(x, gamma, beta, eps) -> (y, mean,
var_biased)`` with features on the last axis (contract in ``_kernels``). Layout keys: ``"nc"``
(rank 2), ``"nlc"`` (rank 3), ``"nhwc"`` (rank 4), ``"ndhwc"`` (rank 5), features last. Masks,
renorm, synchronized replicas, inference and ``trainable=False`` never ask: they stay on the core.

Decision table (``KERNELS``), TensorFlow namespace; device ``"tf"`` (TF places the op) or
``"xla"`` (the layer is traced inside ``jit_compile``, ``_kernels.device_of_trace``):

| op | device | dtype | layout | kernel |
|---|---|---|---|---|
| batch_norm_train | tf | float32 (float16/bfloat16 input is computed as float32) | nhwc, nlc, nc | fused (``_kernels.tensorflow_fused_batch_norm_train``) |
| batch_norm_train | xla | | | None: the core (fused measured 1.29-1.31x Keras in a jit ``fit`` step, core 1.01-1.04x) |
| anything else (float64: no fused kernel in TF; ndhwc, other axes, eval, other namespaces) | | | | None: the generic core |

Measured (``benchmarks/run.py``'s Keras part and the table in ``README.md``): time of the layer
with the kernel / time of ``keras.layers.BatchNormalization``, inside ``tf.function``, one thread.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from normkit import hookimpl

__all__ = [
    "normkit_array_namespace",
    "normkit_frameworks",
    "normkit_kernel",
    "normkit_test_backends",
    "normkit_test_harnesses",
]


def _is_tensorflow_array(array: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    return isinstance(array, (tf.Tensor, tf.Variable))


def _is_keras_tensor(array: Any) -> bool:
    if "keras" not in sys.modules:
        return False
    keras_tensor = sys.modules.get("keras.src.backend.common.keras_tensor")
    return keras_tensor is not None and isinstance(array, keras_tensor.KerasTensor)


def _keras_variable_class() -> Any:
    variables = sys.modules.get("keras.src.backend.common.variables")
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
        from normkit_keras._backend import backend_namespace

        return backend_namespace()
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


_FUSED_TRAIN = "normkit_keras._kernels:tensorflow_fused_batch_norm_train"

# (op, device, dtype name, layout) -> "module:function"; device "tf" (TF's own placement) or "xla"
# (a jit_compile trace); anything absent: None (the generic core)
KERNELS: dict[tuple[str, str, str, str], str] = {
    ("batch_norm_train", "tf", "float32", "nhwc"): _FUSED_TRAIN,
    ("batch_norm_train", "tf", "float32", "nlc"): _FUSED_TRAIN,
    ("batch_norm_train", "tf", "float32", "nc"): _FUSED_TRAIN,
}


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@hookimpl
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Any:
    """TensorFlow's fused batch norm per ``KERNELS`` for the TensorFlow namespace; None otherwise."""
    if "tensorflow" not in sys.modules:
        return None
    from normkit_keras._namespaces import tensorflow_namespace

    if xp is not tensorflow_namespace():
        return None
    dtype_name = getattr(dtype, "name", None) or str(dtype).rpartition(".")[2]
    target = KERNELS.get((op, str(device), dtype_name, layout))
    return None if target is None else _load(target)
