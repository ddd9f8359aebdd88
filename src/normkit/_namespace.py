"""Array namespace lookup: a direct check for the common types, then the plugin hook, then array-api-compat.

The answer is cached per array type, so the lookup costs one dict access after the first call.
The direct checks come first because array-api-compat's own cached lookup makes torch.compile
warn and break graphs; a plain ``isinstance`` against a module already in ``sys.modules`` does not.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["array_namespace", "is_array", "stop_gradient", "device_of", "type_name", "clear_cache", "warm_up"]

_CACHE: dict[type, Any] = {}
_NDARRAY = __import__("numpy").ndarray
_LOCK = threading.Lock()


def type_name(a: object) -> str:
    """``module.Class`` of ``a``, as errors show it."""
    t = type(a)
    module = t.__module__.split(".")[0]
    return f"{module}.{t.__qualname__}"


def _torch_namespace(a: object) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        from array_api_compat import torch as torch_xp

        return torch_xp
    return None


def _numpy_namespace(a: object) -> Any | None:
    import numpy as np

    if isinstance(a, (np.ndarray, np.generic)):
        from array_api_compat import numpy as numpy_xp

        return numpy_xp
    return None


def _jax_namespace(a: object) -> Any | None:
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(a, jax.Array):
        import jax.numpy as jnp

        return jnp
    return None


def _lookup(a: object) -> Any:
    for direct in (_numpy_namespace, _torch_namespace, _jax_namespace):
        xp = direct(a)
        if xp is not None:
            return xp
    from normkit.plugin.manager import plugin_manager

    xp = plugin_manager().hook.normkit_array_namespace(array=a)
    if xp is not None:
        return xp
    import array_api_compat

    try:
        return array_api_compat.array_namespace(a)
    except TypeError:
        raise TypeError(
            f"normkit has no array namespace for {type_name(a)}: expected an array of numpy, torch, "
            "jax, dask, cupy, array-api-strict, or of a library a normkit plugin serves "
            "(TensorFlow through normkit-keras)"
        ) from None


def _direct(a: object) -> Any | None:
    """The namespace of a torch, numpy or jax array without touching the cache (torch.compile-friendly)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return _torch_namespace(a)
    return None


def clear_cache() -> None:
    """Forget every cached namespace answer (plugins were registered or removed)."""
    with _LOCK:
        _CACHE.clear()


def warm_up() -> None:
    """Import the torch namespace now if torch is loaded, so a first call under torch.compile imports nothing."""
    if "torch" in sys.modules:
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
    return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, (int, float, bool))


def array_namespace(*named: tuple[str, Any]) -> Any:
    """The one namespace shared by every named array; ``None`` values and Python scalars are skipped.

    ``named`` holds ``(argument_name, value)`` pairs so that an error can name the argument whose
    library differs from the first array's: normkit never copies across libraries or devices.
    """
    found: Any = None
    first_name = first_value = None
    for name, value in named:
        if value is None or not is_array(value):
            continue
        xp = _direct(value)
        if xp is None:
            xp = _cached(value)
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
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device  # direct: array-api-compat's helper makes torch.compile warn (rule 11)
    from array_api_compat import device

    return device(x)


def stop_gradient(xp: Any, a: Any) -> Any:
    """``a`` without autograd history; running statistics must never carry it."""
    fn = getattr(xp, "stop_gradient", None)
    if fn is not None:
        return fn(a)
    module = type(a).__module__
    if module.startswith("torch"):
        return a.detach()
    if module.startswith("jax"):
        import jax

        return jax.lax.stop_gradient(a)
    return a
