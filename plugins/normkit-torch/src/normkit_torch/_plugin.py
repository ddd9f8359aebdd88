"""normkit's entry point for PyTorch (group ``normkit``, name ``torch``).

Thin on purpose: loading it never imports torch; the layers module, the harness and the kernels
are named or imported only when a hook is called.

Kernels (``normkit_kernel``): for the torch namespace, every op of the family on every device and
float dtype is torch's own kernel (``normkit_torch._kernels``: aten wrapped to the normkit
function's contract, pure). ``TABLE`` names cpu and cuda and a device ``"any"`` that every other
device (mps, xpu, ...) falls back to. ``POLICY`` (``_policy``: ``NORMKIT_TORCH_KERNELS``, ``set_kernel_policy``)
switches every kernel off: ``"core"`` computes through the generic core, the reference.
"""

from __future__ import annotations

import sys
from typing import Any

from normkit import hookimpl
from normkit.plugin.kernels import KernelTable
from normkit_torch._policy import POLICY

OPS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
DEVICES = ("cpu", "cuda", "any")  # "any": the entry every device not named here gets
DTYPES = ("float16", "bfloat16", "float32", "float64")
_TORCH_NAMESPACES = ("array_api_compat.torch", "torch")


def _torch_namespace(xp: Any) -> bool:
    return getattr(xp, "__name__", None) in _TORCH_NAMESPACES and "torch" in sys.modules


TABLE = KernelTable(
    {(op, device, dtype, "any"): f"normkit_torch._kernels:{op}" for op in OPS for device in DEVICES for dtype in DTYPES},
    namespaces=_torch_namespace,
    policy=POLICY,
)


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    """The torch framework: its layers live in ``normkit_torch``."""
    return {"torch": "normkit_torch"}


@hookimpl
def normkit_test_harnesses() -> list[Any]:
    """The conformance harness of normkit_torch's modules against torch.nn's."""
    from normkit_torch.testing import TorchHarness

    return [TorchHarness()]


@hookimpl
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Any:
    """torch's kernel for ``op`` per ``TABLE`` (a device it does not name: the ``"any"`` entry); None otherwise."""
    return TABLE.lookup(op, xp, device, dtype, layout) or TABLE.lookup(op, xp, "any", dtype, layout)
