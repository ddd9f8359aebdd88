"""Backends of the shared array matrix: how to make an array of each library, call a function, read it back.

A ``Backend`` speaks NumPy at its edges (``asarray`` in, ``to_numpy`` out) and wraps the call
(``call``) for the transforms a user applies: ``jax.jit``, ``tf.function``, dask's laziness.
Plugins add theirs through the ``normkit_test_backends`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Backend", "BackendSpec", "builtin_backends", "plain_call", "DEFAULT_BACKENDS"]


def plain_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Call ``fn`` as a user would, eagerly."""
    return fn(*args, **kwargs)


@dataclass
class Backend:
    """One array library (or one transform of it) in the matrix."""

    name: str
    xp: Any
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    call: Callable[[Callable[..., Any], tuple, dict], Any] = plain_call
    dtypes: tuple[str, ...] = ("float32", "float64")
    half_dtypes: tuple[str, ...] = ("float16",)
    notes: str = ""
    # the kernel policy every test of this backend runs under (normkit.plugin.kernels.use_policy):
    # "core" tests normkit's own math; "auto" lets plugins' fused kernels answer the functional API
    policy: str = "core"


@dataclass
class BackendSpec:
    """A backend by name, built on first use (so listing the matrix imports nothing)."""

    name: str
    make: Callable[[], Backend]
    default: bool = True


def _numpy() -> Backend:
    from array_api_compat import numpy as xp

    return Backend("numpy", xp, np.asarray, np.asarray, half_dtypes=("float16",))


def _strict() -> Backend:
    import array_api_strict as xp

    def to_numpy(a: Any) -> np.ndarray:
        return np.from_dlpack(a) if a.ndim else np.asarray(float(a))

    return Backend("array-api-strict", xp, xp.asarray, to_numpy, half_dtypes=(), notes="no float16 in the standard")


def _torch() -> Backend:
    import torch
    from array_api_compat import torch as xp

    return Backend(
        "torch", xp, lambda a: torch.asarray(np.require(a, requirements="C")),  # ascontiguousarray makes 0-d 1-d
        lambda t: t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.detach().float().cpu().numpy(),
        half_dtypes=("float16", "bfloat16"),
    )


def _torch_kernels() -> Backend:
    b = _torch()
    b.name, b.policy = "torch-kernels", "auto"
    b.notes = "torch tensors with kernel policy auto: the functional API may reach torch's own kernels"
    return b


def _enable_jax_x64() -> Any:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp


def _jax() -> Backend:
    jnp = _enable_jax_x64()
    return Backend("jax", jnp, jnp.asarray, lambda a: np.asarray(a, dtype=a.dtype), half_dtypes=("float16", "bfloat16"))


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _jit_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Trace ``fn`` with ``jax.jit``: arrays (positional or keyword) are traced, everything else is static."""
    import jax

    traced_pos = {i: a for i, a in enumerate(args) if _is_array(a)}
    traced_kw = {k: v for k, v in kwargs.items() if _is_array(v)}

    def traced(pos: dict, kw: dict) -> Any:
        full = tuple(pos[i] if i in pos else a for i, a in enumerate(args))
        return fn(*full, **{**kwargs, **kw})

    return jax.jit(traced)(traced_pos, traced_kw)


def _jax_jit() -> Backend:
    b = _jax()
    b.name, b.call = "jax-jit", _jit_call
    return b


class DaskComputedError(AssertionError):
    """A normkit function computed a dask graph before the user asked for it."""


def _refuse_compute(*args: Any, **kwargs: Any) -> Any:
    raise DaskComputedError("normkit computed a dask array during the call; it must stay lazy until .compute()")


def _dask_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Call ``fn`` with a scheduler that refuses to run: any compute inside the call fails the test."""
    import dask

    with dask.config.set(scheduler=_refuse_compute):
        return fn(*args, **kwargs)


def _dask() -> Backend:
    import dask.array as da
    from array_api_compat.dask import array as xp

    def asarray(a: np.ndarray) -> Any:
        chunks = tuple(max(1, (d + 1) // 2) if i == 0 else d for i, d in enumerate(a.shape))
        return da.from_array(a, chunks=chunks or -1)

    def to_numpy(a: Any) -> np.ndarray:
        import dask

        with dask.config.set(scheduler="synchronous"):
            return np.asarray(a.compute())

    return Backend("dask", xp, asarray, to_numpy, _dask_call)


def _cupy() -> Backend:
    import cupy
    from array_api_compat import cupy as xp

    return Backend("cupy", xp, cupy.asarray, cupy.asnumpy)


def _torch_cuda() -> Backend:
    import torch

    if not torch.cuda.is_available():
        raise ImportError("torch-cuda was requested but torch sees no CUDA device")
    b = _torch()
    b.name = "torch-cuda"
    b.asarray = lambda a: torch.asarray(np.ascontiguousarray(a), device="cuda")
    return b


def builtin_backends() -> list[BackendSpec]:
    """The core's backends. cupy and torch-cuda run only when named with ``--backends``.

    Every backend runs under the kernel policy "core" (normkit's own math) except "torch-kernels",
    the same torch tensors under "auto" (what a user gets by default where a plugin has kernels).
    """
    return [
        BackendSpec("numpy", _numpy),
        BackendSpec("array-api-strict", _strict),
        BackendSpec("torch", _torch),
        BackendSpec("torch-kernels", _torch_kernels),
        BackendSpec("jax", _jax),
        BackendSpec("jax-jit", _jax_jit),
        BackendSpec("dask", _dask),
        BackendSpec("cupy", _cupy, default=False),
        BackendSpec("torch-cuda", _torch_cuda, default=False),
    ]


DEFAULT_BACKENDS = tuple(s.name for s in builtin_backends() if s.default)
