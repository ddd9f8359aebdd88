"""normkit's entry point for PyTorch (group ``normkit``, name ``torch``).

Thin on purpose: loading it never imports torch; the layers module, the harness and the kernels
are named or imported only when a hook is called.

Kernels (``normkit_kernel``). For the torch namespace the batch-norm modules ask, once per module
and (op, device, dtype, layout), for:

- ``"batch_norm_train"``: ``(x, weight, bias, eps, axis) -> (y, mean, var_biased)``
- ``"batch_norm_eval"``: ``(x, running_mean, running_var, weight, bias, eps, axis) -> y``

(the contracts of ``normkit_torch._functional.batch_norm_train`` / ``batch_norm_eval``, the generic
core's path and the reference). Candidates: the core; ``_autograd`` (a hand-written
autograd.Function); ``aten`` (torch's own batch norm, ``_kernels.native_batch_norm_*``);
``function-or-aten`` (``_autograd``'s forward when autograd will not record the call, else aten).

Decision table (``KERNELS``), CPU:

| op | dtype | layout | kernel |
|---|---|---|---|
| batch_norm_train | float32 | contiguous (NCHW, NCL, NCDHW) | function-or-aten |
| batch_norm_train | float32 | small, dense, channels_last, strided | aten |
| batch_norm_train | float64, float16, bfloat16 | every layout | aten |
| batch_norm_eval | float32, float64, float16, bfloat16 | every layout | aten |
| anything else (other namespaces, devices, dtypes, ops) | | | None: the generic core |

Measured: time of the normkit_torch module with each candidate / time of torch.nn.BatchNorm*d
(below 1: faster; ``benchmarks/torch_kernels.py``), one thread on CPU 0 (taskset), interleaved, median of 11 paired rounds
(``benchmarks/run.py``'s harness), torch 2.13 CPU, a shared 2-CPU Xeon (load about 2.3; a second
run with 7 rounds agreed on every choice). Columns core / _autograd / aten; "fwd" is a training
step under no_grad, where function-or-aten runs _autograd's forward.

| float32 input (layout) | fwd train | fwd+bwd | eval |
|---|---|---|---|
| conv 32x64x56x56 NCHW (contiguous) | 4.33 / 0.78 [1] / 1.28 | 3.74 / 1.07 / 0.94 [2] | 2.61 / 2.34 / 1.13 |
| conv 8x256x28x28 NCHW (contiguous) | 1.26 / 0.77 / 1.02 | 3.14 / 1.21 / 0.97 | 2.15 / 1.61 / 1.00 |
| seq 32x64x1024 NCL (contiguous) | 1.16 / 0.80 / 1.00 | 3.09 / 1.29 / 0.97 | 2.21 / 1.62 / 1.02 |
| mid 16x32x16x16 NCHW (contiguous) | 1.32 / 0.88 / 1.15 | 3.09 / 1.73 / 1.19 | 2.73 / 1.89 / 1.08 |
| vol 8x32x16x16x16 NCDHW (contiguous; 7 rounds) | 3.59 / 0.85 / 1.08 | 3.88 / 1.21 / 1.06 | 2.06 / 1.62 / 1.00 |
| conv 32x64x56x56 NHWC (channels_last) | 5.71 / 2.22 / 0.71 | 8.04 / 1.92 / 1.07 | 3.03 / 1.09 / 1.03 |
| conv 8x256x28x28 NHWC (channels_last) | 3.01 / 1.76 / 1.10 | 8.00 / 1.85 / 1.06 | 2.09 / 1.06 / 1.03 |
| dense 256x1024 (dense) | 3.40 / 2.33 / 1.29 | 3.72 / 2.00 / 1.16 | 2.34 / 1.27 / 1.04 |
| dense 4096x64 (dense) | 3.48 / 2.33 / 1.27 | 3.86 / 2.04 / 1.15 | 2.52 / 1.36 / 1.06 |
| small 16x16x8x8 NCHW (small) | 2.90 / 2.01 / 1.48 | 4.12 / 3.13 / 1.40 | 3.28 / 2.61 / 1.09 |
| small 8x32x8x8 NHWC (small) | 4.71 / 3.03 / 1.85 | 5.17 / 3.73 / 1.47 | 3.10 / 2.21 / 1.09 |
| small dense 64x128 (small) | 5.25 / 3.39 / 1.90 | 4.62 / 3.99 / 1.54 | 3.38 / 2.45 / 1.10 |

[1] function-or-aten (its _autograd forward under no_grad); _autograd alone 1.17 in this run, 0.73 in the 7-round run.
[2] function-or-aten (aten under autograd); aten alone 1.23 in this run, 0.80 in the 7-round run.

float64 (7 rounds), core / _autograd / aten: conv 8x256x28x28 NCHW fwd 3.15 / 1.40 / 1.12, fwd+bwd
4.16 / 1.15 / 0.71; seq 32x64x1024 NCL fwd 6.23 / 1.49 / 1.10; NHWC fwd 7.37 / 1.90 / 1.03; dense
fwd+bwd 3.53 / 1.63 / 1.06; small fwd+bwd 4.57 / 3.23 / 1.37: aten everywhere (_autograd's forward
does not win in float64). bfloat16 (5 rounds): aten 1.04-1.21 fwd+bwd where core is 4.3-11.0 and
_autograd 2.9-4.5. float16 (5 rounds): aten 0.96-1.24 fwd+bwd where core is 4.9-13.8 and _autograd
3.1-5.9; aten's forward 1.07-1.23 against _autograd's 3.6-4.8 (small inputs: aten 1.9-2.4).

What the numbers say: the generic core is never the fastest on CPU; _autograd's forward is the
fastest on row-major input in float32 (0.77-0.88x native) but its forward+backward is not (1.07-1.73x
vs aten's 0.94-1.19x), hence function-or-aten there; aten wins every other cell. The remaining gap on
small inputs (aten 1.4-1.9x) was the module's per-call Python and per-channel ops (running-stat
update, the contract's biased variance), not the kernel: the modules now call aten with their own
buffers where it is chosen (``_batchnorm``'s "aten path"), which brought the small and dense cells
to about 0.8-1.05x (benchmarks/run.py). CUDA and other devices are not in the
table: not measured here (no GPU), so the generic core stays their default until they are.
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
