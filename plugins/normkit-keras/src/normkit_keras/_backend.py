"""The Array API namespace of the current Keras backend's own arrays, and small per-backend helpers.

Layers compute through the normkit core on the backend's native arrays (tf.Tensor, jax.Array,
torch.Tensor), never through ``keras.ops``: on JAX and torch ``keras.ops`` would downcast float64.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["backend_name", "backend_namespace", "namespace_of_backend", "native", "dtype_name", "cast", "in_compute_dtype"]

_NAMESPACES: dict[str, Any] = {}


def backend_name() -> str:
    return keras.backend.backend()


def backend_namespace(name: str | None = None, *, layer: Any = None) -> Any:
    """``xp`` for the arrays Keras hands a layer's ``call`` on this process's backend (or on backend ``name``:
    a ``tf.data`` pipeline runs a preprocessing layer on TensorFlow whatever the Keras backend). Every layer's
    ``call`` starts here, so a bad ``NORMKIT_KERAS_KERNELS`` is reported here (``_policy``), and a float64
    ``layer`` on JAX without x64 is named in a warning (JAX computes it in float32, as for Keras's layers)."""
    from normkit_keras._policy import POLICY

    POLICY.check()
    name = name or backend_name()
    if layer is not None and name == "jax" and layer.compute_dtype == "float64":
        _warn_without_x64(layer)
    return namespace_of_backend(name)


_WARNED_X64: set[int] = set()


def _warn_without_x64(layer: Any) -> None:
    """Once per layer: a float64 layer on JAX whose float64 arrays JAX truncates (``jax_enable_x64`` off)."""
    import jax

    if jax.config.jax_enable_x64 or id(layer) in _WARNED_X64:
        return
    _WARNED_X64.add(id(layer))
    import warnings

    warnings.warn(
        f"{type(layer).__name__} {layer.name!r} has dtype float64, but on the JAX backend without jax_enable_x64 "
        "every float64 array is float32: it computes and returns float32 (as Keras's layers do). Set "
        "jax.config.update('jax_enable_x64', True) at start-up for float64", UserWarning, stacklevel=3)


def namespace_of_backend(name: str) -> Any:
    """``xp`` of backend ``name``'s arrays, built once."""
    xp = _NAMESPACES.get(name)
    if xp is None:
        xp = _NAMESPACES[name] = _namespace_of(name)
    return xp


def _namespace_of(name: str) -> Any:
    if name == "tensorflow":
        from normkit_keras._namespaces import tensorflow_namespace

        return tensorflow_namespace()
    if name == "jax":
        import jax.numpy as jnp

        return jnp
    if name == "torch":
        from array_api_compat import torch as torch_xp

        return torch_xp
    if name == "numpy":
        from array_api_compat import numpy as numpy_xp

        return numpy_xp
    raise NotImplementedError(f"normkit_keras does not support the Keras backend {name!r} (tensorflow, jax, torch, numpy)")


def native(value: Any) -> Any:
    """The backend array behind a ``keras.Variable`` (read each call: JAX's stateless scopes swap it)."""
    if isinstance(value, keras.Variable):
        return value.value
    return value


def dtype_name(x: Any) -> str:
    """Keras's name of ``x``'s dtype (``"float32"``), whatever the backend's dtype object."""
    return keras.backend.standardize_dtype(x.dtype)


def cast(xp: Any, x: Any, name: str) -> Any:
    """``x`` as dtype ``name`` (a no-op when it already is)."""
    return x if dtype_name(x) == name else xp.astype(x, getattr(xp, name))


def in_compute_dtype(xp: Any, x: Any) -> Any:
    """``x`` in the dtype Keras's normalization layers compute in: half precision as float32, integers and
    booleans as ``result_type(dtype, "float32")`` (float32); float32 and float64 as they are."""
    name = dtype_name(x)
    if name in ("float32", "float64"):
        return x
    if name in ("float16", "bfloat16"):
        return cast(xp, x, "float32")
    return cast(xp, x, keras.backend.result_type(name, "float32"))
