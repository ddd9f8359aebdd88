"""normkit's entry point for PyTorch (group ``normkit``, name ``torch``).

Thin on purpose: loading it never imports torch; the layers module and the harness are named or
imported only when a hook is called.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from normkit import hookimpl


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    """The torch framework: its layers live in ``normkit_torch``."""
    return {"torch": "normkit_torch"}


@hookimpl
def normkit_test_harnesses() -> list[Any]:
    """The conformance harness of normkit_torch's modules against torch.nn's."""
    from normkit_torch.testing import TorchHarness

    return [TorchHarness()]



_NATIVE_TRAIN = "normkit_torch._kernels:native_batch_norm_train"
_NATIVE_EVAL = "normkit_torch._kernels:native_batch_norm_eval"
_HYBRID_TRAIN = "normkit_torch._kernels:function_or_native_batch_norm_train"
_TORCH_NAMESPACES = ("array_api_compat.torch", "torch")
_DTYPES = ("float32", "float64", "float16", "bfloat16")
_LAYOUTS = ("small", "dense", "contiguous", "channels_last", "strided")

# (op, device type, dtype name, layout) -> "module:function"; anything absent: None (generic core)
KERNELS: dict[tuple[str, str, str, str], str] = {}
for _dtype in _DTYPES:
    for _layout in _LAYOUTS:
        KERNELS[("batch_norm_eval", "cpu", _dtype, _layout)] = _NATIVE_EVAL
        KERNELS[("batch_norm_train", "cpu", _dtype, _layout)] = _NATIVE_TRAIN
KERNELS[("batch_norm_train", "cpu", "float32", "contiguous")] = _HYBRID_TRAIN
del _dtype, _layout


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@hookimpl
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Any:
    """torch's batch-norm kernels per ``KERNELS`` (the table above); None (the generic core) otherwise."""
    if getattr(xp, "__name__", None) not in _TORCH_NAMESPACES or "torch" not in sys.modules:
        return None
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    dtype_name = str(dtype).rpartition(".")[2]
    target = KERNELS.get((op, device_type, dtype_name, layout))
    return None if target is None else _load(target)
