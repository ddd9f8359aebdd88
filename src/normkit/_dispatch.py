"""The functional API's way to a plugin's fused kernel: one cached lookup per (op, namespace, device, dtype).

A kernel takes the normkit function's own (validated) arguments and returns its result, or
``NotImplemented`` where the arguments fall outside its contract; the generic core computes then.
While torch.compile traces, a configuration not yet looked up runs the core (a plugin-hook call
would break the graph); an eager call beforehand makes the compiled graph use the kernel too.
"""

from __future__ import annotations

from typing import Any

from normkit._backend import compiling
from normkit._namespace import device_of
from normkit.plugin import kernels

__all__ = ["call_kernel", "kernel_for"]


def kernel_for(op: str, xp: Any, x: Any) -> Any:
    """The kernel plugins offer for ``op`` on ``x``'s namespace, device and dtype, or None."""
    return kernels.lookup(op, xp, device_of(xp, x), x.dtype, resolve=not compiling())


def call_kernel(op: str, xp: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``kernel(*args, **kwargs)`` for ``op`` on ``x``, or ``NotImplemented`` when there is none."""
    kernel = kernel_for(op, xp, x)
    if kernel is None:
        return NotImplemented
    return kernel(*args, **kwargs)
