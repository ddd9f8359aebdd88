"""The backend layer: every fact about a framework that normkit's algorithms need, in one place.

``backend(xp)`` is the namespace's ``Backend``, chosen once per namespace and cached: how it cuts
autograd history (``stop_gradient``), whether its float32 sums need a float64 accumulator
(``accumulation_dtype``), and the in-place fast path it has (``fast_for``; NumPy's C-contiguous arrays).
``compiling()`` says whether torch.compile traces now; ``concrete_scalar`` reads a 0-d value where it is
known now; ``python_scalar`` turns a NumPy scalar argument into the Python number it holds. The algorithm
modules call these and never name a framework (tests/test_core_knows_no_framework.py).
A plugin's namespace states its own facts as attributes: ``stop_gradient(x)`` and ``normkit_sums_naively``.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from normkit import _numpy_fast
from normkit._imports import imported_module
from normkit.plugin.manager import on_plugins_changed

__all__ = ["Backend", "backend", "clear_cache", "compiling", "concrete_scalar", "python_scalar"]


def _identity(a: Any) -> Any:
    return a


def _detach(a: Any) -> Any:
    """torch: ``a.detach()`` for a tensor; anything else (a Python count) as it is."""
    return a.detach() if type(a).__module__.startswith("torch") else a


def _jax_stop_gradient(a: Any) -> Any:
    """jax: ``lax.stop_gradient(a)`` for a jax array or tracer; anything else (a Python count) as it is."""
    if not type(a).__module__.startswith("jax"):
        return a
    import jax

    return jax.lax.stop_gradient(a)


@dataclass(frozen=True)
class Backend:
    """What the algorithms need to know about one array namespace.

    ``stop_gradient(a)``: ``a`` without autograd history (identity where there is none).
    ``sums_naively``: the namespace's float32 sums accumulate a long axis naively (1e6 rows at mean 1e4:
    the mean comes out 131 off in numpy and TensorFlow), so the algorithms accumulate them in float64.
    ``fast``: a module of in-place fast paths (``_numpy_fast``'s entry points), or None.
    """

    name: str
    stop_gradient: Callable[[Any], Any] = _identity
    sums_naively: bool = False
    fast: Any = None

    def accumulation_dtype(self, xp: Any, x: Any) -> Any:
        """float64 where this namespace sums float32 naively and has float64, else None (the sum is accurate)."""
        if not self.sums_naively or x.dtype != xp.float32:
            return None
        return getattr(xp, "float64", None)

    def fast_for(self, x: Any) -> Any:
        """The fast-path module for ``x`` (a non-empty C-contiguous ndarray on NumPy), else None."""
        fast = self.fast
        return fast if fast is not None and fast.applies(x) else None


# the namespaces array-api-compat serves, with their facts; built at import (nothing imported), so that
# torch.compile traces a dict read only
_BUILT_IN = {
    "array_api_compat.numpy": Backend("array_api_compat.numpy", sums_naively=True, fast=_numpy_fast),
    "array_api_strict": Backend("array_api_strict", sums_naively=True),
    "array_api_compat.dask.array": Backend("array_api_compat.dask.array", sums_naively=True),
    "array_api_compat.torch": Backend("array_api_compat.torch", stop_gradient=_detach),
    "torch": Backend("torch", stop_gradient=_detach),
    "jax.numpy": Backend("jax.numpy", stop_gradient=_jax_stop_gradient),
    "jax": Backend("jax", stop_gradient=_jax_stop_gradient),
}
_CACHE: dict[int, tuple[Any, Backend]] = {}
_LOCK = threading.Lock()


def _name(xp: Any) -> str:
    name = getattr(xp, "__name__", None)
    return name if isinstance(name, str) else f"{type(xp).__module__}.{type(xp).__qualname__}"


def _build(xp: Any) -> Backend:
    """The table's backend for ``xp``'s name (else a plain one), with the facts ``xp``'s own attributes state."""
    name = _name(xp)
    base = _BUILT_IN.get(name) or Backend(name)
    fn = getattr(xp, "stop_gradient", None)
    naive = getattr(xp, "normkit_sums_naively", None)
    return Backend(name, stop_gradient=base.stop_gradient if fn is None else fn,
                   sums_naively=base.sums_naively if naive is None else bool(naive), fast=base.fast)


def backend(xp: Any) -> Backend:
    """The ``Backend`` of namespace ``xp``: the table's for array-api-compat's namespaces, else from ``xp``'s attributes.

    A namespace's attributes (``stop_gradient``, ``normkit_sums_naively``) override the table.
    """
    if getattr(xp, "stop_gradient", None) is None and getattr(xp, "normkit_sums_naively", None) is None:
        found = _BUILT_IN.get(getattr(xp, "__name__", None))
        if found is not None:
            return found
    entry = _CACHE.get(id(xp))
    if entry is not None and entry[0] is xp:
        return entry[1]
    with _LOCK:
        built = _build(xp)
        _CACHE[id(xp)] = (xp, built)
    return built


def clear_cache() -> None:
    """Forget the backends built from namespaces' attributes (a plugin was registered or removed)."""
    with _LOCK:
        _CACHE.clear()


on_plugins_changed(clear_cache)


def compiling() -> bool:
    """True while torch.compile traces (a plugin-hook call or a host sync would break its graph).

    Not a fact of one namespace: dynamo traces NumPy code too.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _torch_value_unknown(torch: Any, a: Any) -> bool:
    """True while torch traces (torch.compile, a CUDA graph capture): ``float()`` of a tensor would break
    the graph or fail, so its value is not known now."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return True
    return a.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def concrete_scalar(a: Any) -> float | None:
    """The value of a 0-d array (or NumPy scalar) as a float where it is known now, else None.

    Known: NumPy, array-api-strict, eager torch (one device sync on a GPU), concrete jax arrays, eager
    TensorFlow. Unknown (None): jax tracers (jit, grad, vmap), torch while compiling or capturing a CUDA
    graph, dask (lazy: computing would break its laziness), symbolic tensors (tf.function, KerasTensor).
    """
    module = type(a).__module__.split(".")[0]
    if module == "dask":
        return None
    if module == "torch":
        torch = imported_module("torch")
        if torch is not None and isinstance(a, torch.Tensor) and _torch_value_unknown(torch, a):
            return None
    if module in ("jax", "jaxlib"):
        jax = imported_module("jax")
        if jax is not None and isinstance(a, jax.core.Tracer):
            return None
    try:
        return float(a)
    except Exception:  # noqa: BLE001 - a symbolic value of any library: not known now
        return None


def python_scalar(value: Any) -> Any:
    """A NumPy scalar (``np.float32(0.1)``) as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value
