"""Array namespace lookup: a direct check for the common types, then array-api-compat, then the plugin hook.

The answer is cached per array type, so the lookup costs one dict access after the first call.
The direct checks come first because array-api-compat's own cached lookup makes torch.compile
warn and break graphs; a plain ``isinstance`` against a module already in ``sys.modules`` does not.
A module another thread is still importing is never touched (``imported_module``): it may not
have its classes yet (``partially initialized module 'torch' has no attribute 'Tensor'``).
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType
from typing import Any

from normkit._imports import imported_module
from normkit.plugin.manager import on_plugins_changed, plugin_manager

__all__ = [
    "array_namespace", "is_array", "device_of", "type_name", "clear_cache", "warm_up", "imported_module",
]

_CACHE: dict[type, Any] = {}
_NDARRAY = __import__("numpy").ndarray
_LOCK = threading.Lock()
_SUPPORTED = "numpy, torch, jax, dask, cupy, array-api-strict, or TensorFlow (through normkit-keras)"


def type_name(a: object) -> str:
    """``module.Class`` of ``a``, as errors show it."""
    t = type(a)
    module = t.__module__.split(".")[0]
    return f"{module}.{t.__qualname__}"


def _torch_namespace(a: object) -> Any | None:
    torch = imported_module("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        from array_api_compat import torch as torch_xp

        return torch_xp
    return None


def _numpy_namespace(a: object) -> Any | None:
    import numpy as np

    if isinstance(a, np.ndarray) and type(a) is not np.ndarray:
        _refuse_ndarray_subclass(a)
    if isinstance(a, (np.ndarray, np.generic)):
        from array_api_compat import numpy as numpy_xp

        return numpy_xp
    return None


def _refuse_ndarray_subclass(a: object) -> None:
    """np.ma and np.matrix change what reductions mean: refuse them instead of giving wrong statistics."""
    import numpy as np

    if isinstance(a, np.ma.MaskedArray):
        raise _Refused(
            "is a numpy masked array (np.ma.MaskedArray), whose mask normkit would not see: pass "
            "x.filled(np.nan) to standardize, min_max_scale or Moments (they ignore NaN), or x.data "
            "with mask=~x.mask to batch_norm / batch_moments"
        )
    if isinstance(a, np.matrix):
        raise _Refused("is a np.matrix, which keeps two dimensions through every reduction: pass np.asarray(x)")


class _Refused(TypeError):
    """A value normkit will not take as an array; ``array_namespace`` prefixes the argument's name."""


def _jax_namespace(a: object) -> Any | None:
    jax = imported_module("jax")
    if jax is not None and isinstance(a, jax.Array):
        import jax.numpy as jnp

        return jnp
    return None


# the modules array-api-compat reads classes from (sys.modules[name].Tensor, ...) to name a namespace
_PROBED = ("cupy", "torch", "dask.array", "jax", "sparse", "ndonnx", "array_api_strict")


def _await_imports() -> None:
    """Let the imports of the probed libraries that other threads have in flight finish first.

    array-api-compat reads their classes straight from ``sys.modules`` and fails on a module that
    is still importing; importing it here waits for the importing thread.
    """
    for name in _PROBED:
        if name in sys.modules and imported_module(name) is None:
            importlib.import_module(name)


def _lookup(a: object) -> Any:
    """Direct checks, then array-api-compat, then the plugins (for the types array-api-compat rejects).

    array-api-compat goes before the plugins: a plugin's hook may inspect a library that another
    thread is still importing; array-api-compat waits for such an import to finish.
    """
    for direct in (_numpy_namespace, _torch_namespace, _jax_namespace):
        xp = direct(a)
        if xp is not None:
            return xp
    import array_api_compat

    _await_imports()
    try:
        return array_api_compat.array_namespace(a)
    except TypeError:
        pass
    xp = plugin_manager().hook.normkit_array_namespace(array=a)
    if xp is not None:
        return xp
    raise _Refused(
        f"is a {type_name(a)}: normkit has no array namespace for {type_name(a)}; expected an array of "
        f"{_SUPPORTED}, or of a library a normkit plugin serves"
    )


def _direct(a: object) -> Any | None:
    """The namespace of a torch, numpy or jax array without touching the cache (torch.compile-friendly)."""
    torch = imported_module("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return _torch_namespace(a)
    return None


def clear_cache() -> None:
    """Forget every cached namespace answer (plugins were registered or removed)."""
    with _LOCK:
        _CACHE.clear()


on_plugins_changed(clear_cache)


def warm_up() -> None:
    """Import the torch namespace now if torch is loaded, so a first call under torch.compile imports nothing."""
    if imported_module("torch") is not None:
        import array_api_compat.torch  # noqa: F401


def _cached(a: object) -> Any:
    t = type(a)
    xp = _CACHE.get(t)
    if xp is None:
        with _LOCK:
            xp = _CACHE.get(t)
            if xp is None:
                xp = _lookup(a)
                _CACHE[t] = xp
    return xp


def is_array(a: object) -> bool:
    """True for anything that has a shape and a dtype (Python scalars and sequences are not arrays)."""
    # the number test first: torch.compile traces a float argument as a symbolic float that passes it
    # (and on which hasattr cannot be traced)
    return not isinstance(a, (int, float, bool)) and hasattr(a, "shape") and hasattr(a, "dtype")


def array_namespace(*named: tuple[str, Any]) -> Any:
    """The one namespace shared by every named array; ``None`` values and Python scalars are skipped.

    ``named`` holds ``(argument_name, value)`` pairs so that an error can name the argument whose
    library differs from the first array's: normkit never copies across libraries or devices.
    The first pair is the function's input and must be an array; the others may be None or scalars.
    NumPy masked arrays and ``np.matrix`` are refused (reductions would ignore the mask or keep
    two dimensions), naming the argument and what to pass instead.
    """
    found: Any = None
    first_name = first_value = None
    if named and not is_array(named[0][1]):
        name, value = named[0]
        got = "None" if value is None else type(value).__name__
        raise TypeError(f"{name} must be an array of {_SUPPORTED}; got {got}")
    for name, value in named:
        if value is None or not is_array(value):
            continue
        xp = _direct(value)
        if xp is None:
            try:
                xp = _cached(value)
            except _Refused as exc:
                raise TypeError(f"{name} {exc}") from None
        if found is None:
            found, first_name, first_value = xp, name, value
        elif xp is not found:
            raise TypeError(
                f"{name} is a {type_name(value)} but {first_name} is a {type_name(first_value)}: "
                "normkit does not mix arrays of two libraries; convert one of them first"
            )
    if found is None:
        raise TypeError("normkit needs at least one array; got only Python scalars or None")
    return found


def device_of(xp: ModuleType | Any, x: Any) -> Any:
    """The device of ``x`` (array-api-compat's helper works for every namespace we serve)."""
    if type(x) is _NDARRAY:
        return "cpu"
    if hasattr(xp, "normkit_device"):
        return xp.normkit_device(x)
    torch = imported_module("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device  # direct: array-api-compat's helper makes torch.compile warn (rule 11)
    from array_api_compat import device

    return device(x)
