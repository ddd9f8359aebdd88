"""torch's kernels: the functional API's (``normkit.*`` on torch tensors) and the modules' dispatch.

- Every kernel the hook hands out equals the normkit core and torch.nn.functional: outputs, running
  statistics after 3 steps, input/weight/bias gradients, for every op, layout and mode; exactly
  (float64 round-off) in float64, within float32/half round-off otherwise. A spy proves the kernel
  computed (no silent fallback to the core) or declined where it must.
- Outside aten's contract a kernel declines and the core answers; kernels never mutate their inputs.
- The table serves every device; the choice is made once per configuration; the policy (set, from
  the environment, or ``normkit.plugin.kernels.use_policy``) takes effect; torch.compile traces the
  dispatch in one graph under both policies.
- At data offset 1e4 in float32, "core" is exact where "auto" is torch.nn's own (about 1e-3 off).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
import normkit_torch as nkt
import normkit_torch.functional as NF
from conftest import F64, randomize
from normkit.plugin import kernels
from normkit.plugin.manager import plugin_manager
from normkit.testing import reference
from normkit_torch import _functional, _kernels, _plugin

OPS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
XP = _functional.xp
TIGHT = dict(rtol=1e-10, atol=1e-12)
HALF = (torch.float16, torch.bfloat16)


def hook_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str = "any") -> Any:
    """The plugins' answer to the ``normkit_kernel`` hook itself, uncached (``kernels.lookup`` caches it)."""
    return plugin_manager().hook.normkit_kernel(op=op, xp=xp, device=device, dtype=dtype, layout=layout)


def _bump_generation() -> None:
    """Forget every cached kernel choice (a policy round trip bumps the generation)."""
    previous = nkt.set_kernel_policy("core")
    nkt.set_kernel_policy("auto")
    nkt.set_kernel_policy(previous)


@pytest.fixture(autouse=True)
def _auto_policy():
    previous = nkt.set_kernel_policy("auto")
    yield
    nkt.set_kernel_policy(previous)


@pytest.fixture
def served(monkeypatch):
    """Records, per kernel call, ``(op, computed)``: False where the kernel declined (NotImplemented)."""
    log: list[tuple[str, bool]] = []
    for op in OPS:
        real = getattr(_kernels, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            out = _real(*args, **kwargs)
            log.append((_op, out is not NotImplemented))
            return out

        spy.nn_functional = real.nn_functional
        monkeypatch.setattr(_kernels, op, spy)
    _bump_generation()  # the hook loads the spies
    yield log
    monkeypatch.undo()
    _bump_generation()


# ---------------------------------------------------------------- the functional API's kernels


@dataclass
class Case:
    """One call of a normkit function on torch tensors, and torch.nn.functional's twin of it."""

    id: str
    op: str
    shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)  # the normkit function's options
    axis: Any = 1
    channels_last: bool = False
    params: str = "wb"  # "wb": weight and bias, "w": weight only, "": neither
    stats: bool = False  # running statistics given
    declines_below_float64: bool = False  # aten is not exact enough there in float32/half


def _bn(id, shape, axis=1, cl=False, declines=False, **kw):
    return Case(id, "batch_norm", shape, kw, axis, cl, kw.pop("params", "wb"), kw.pop("stats", True), declines)


CASES = [
    _bn("bn-NCHW-train", (4, 3, 5, 6), training=True, momentum=0.3),
    _bn("bn-NCHW-cumulative", (4, 3, 5, 6), training=True, momentum=None),
    _bn("bn-NCHW-eval", (4, 3, 5, 6), training=False),
    _bn("bn-NCHW-no-stats-no-affine", (4, 3, 5, 6), training=True, stats=False, params=""),
    _bn("bn-NCL-train", (4, 3, 7), training=True, momentum=0.1),
    _bn("bn-NCDHW-train", (2, 3, 4, 3, 5), training=True, momentum=0.1, params="w"),
    _bn("bn-channels_last-train", (4, 3, 5, 6), cl=True, declines=True, training=True, momentum=0.1),
    _bn("bn-channels_last-eval", (4, 3, 5, 6), cl=True, training=False),
    _bn("bn-NHWC-axis-1-train", (4, 5, 6, 3), axis=-1, declines=True, training=True, momentum=0.1),
    _bn("bn-NHWC-axis-1-eval", (4, 5, 6, 3), axis=-1, training=False),
    _bn("bn-dense-train", (16, 5), declines=True, training=True, momentum=0.1),
    _bn("bn-dense-eval", (16, 5), training=False),
    _bn("bn-one-feature-train", (16, 1), declines=True, training=True, momentum=0.1),  # (N, 1): naive sums too
    _bn("bn-no-spatial-extent-train", (8, 1, 1, 1), declines=True, training=True, momentum=0.1),
    _bn("bn-one-channel-NCL-train", (4, 1, 7), training=True, momentum=0.1),  # a spatial extent: pairwise sums
    Case("ln-last", "layer_norm", (4, 5, 6), axis=-1),
    Case("ln-last-two", "layer_norm", (4, 5, 6), axis=(-2, -1)),
    Case("ln-no-affine", "layer_norm", (4, 5, 6), axis=-1, params=""),
    Case("gn-NCL", "group_norm", (4, 6, 5), {"num_groups": 3}),
    Case("gn-NCHW-no-affine", "group_norm", (2, 6, 4, 5), {"num_groups": 2}, params=""),
    Case("gn-NLC-axis-1", "group_norm", (4, 5, 6), {"num_groups": 2}, axis=-1),
    Case("gn-NHWC-axis-1", "group_norm", (2, 4, 5, 6), {"num_groups": 3}, axis=-1, declines_below_float64=True),
    Case("in-train-stats", "instance_norm", (2, 3, 5, 6), {"use_input_stats": True, "momentum": 0.2}, stats=True),
    Case("in-eval-stats", "instance_norm", (2, 3, 5, 6), {"use_input_stats": False}, stats=True),
    Case("in-no-stats", "instance_norm", (2, 3, 5, 6), {"use_input_stats": True}, params="w"),
    Case("rms-last", "rms_norm", (4, 5, 6), axis=-1, params="w"),
    Case("rms-last-two-eps", "rms_norm", (4, 5, 6), {"eps": 1e-3}, axis=(-2, -1), params="w"),
    Case("rms-no-weight", "rms_norm", (4, 5, 6), axis=-1, params=""),
]
HALF_CASES = [c for c in CASES if c.id in ("bn-NCHW-train", "bn-NCHW-eval", "ln-last", "gn-NCL", "in-train-stats", "rms-last")]


def _feature_shape(case: Case) -> tuple[int, ...]:
    """Shape of weight/bias (and the running statistics: channels only)."""
    if case.op in ("layer_norm", "rms_norm"):
        axes = case.axis if isinstance(case.axis, tuple) else (case.axis,)
        return tuple(case.shape[a] for a in axes)
    return (case.shape[case.axis],)


def _tensor(shape, seed, dtype, offset=0.0, cl=False, scale=2.0):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale + 0.5 + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def _params(case: Case, dtype: torch.dtype) -> dict:
    """Random weight/bias (in the statistics dtype: float32 for half input, as torch.nn's modules) and
    running statistics near the data's (mean 0.5, variance 4)."""
    pdtype = torch.float32 if dtype in HALF else dtype
    shape = _feature_shape(case)
    out = {
        "weight": 1.0 + 0.5 * _tensor(shape, 101, pdtype, -0.5, scale=1.0) if "w" in case.params else None,
        "bias": 0.5 * _tensor(shape, 102, pdtype, -0.5, scale=1.0) if "b" in case.params else None,
    }
    if case.stats:
        out["running_mean"] = _tensor(shape, 103, pdtype, scale=0.3)
        out["running_var"] = 4.0 + _tensor(shape, 104, pdtype, -0.5, scale=1.0).abs()
    return out


def _call_normkit(case: Case, x, p, step) -> tuple[Any, Any, Any]:
    """``normkit.<op>`` as a user calls it; returns (output, new running mean, new running var)."""
    w, b = p["weight"], p["bias"]
    if case.op == "batch_norm":
        nb = step + 1 if case.kwargs.get("momentum", 0.1) is None else None
        return tuple(normkit.batch_norm(x, p.get("running_mean"), p.get("running_var"), w, b, axis=case.axis,
                                        num_batches=nb, **case.kwargs))
    if case.op == "instance_norm":
        return tuple(normkit.instance_norm(x, p.get("running_mean"), p.get("running_var"), w, b, axis=case.axis,
                                           **case.kwargs))
    if case.op == "layer_norm":
        return normkit.layer_norm(x, w, b, axis=case.axis, **case.kwargs), None, None
    if case.op == "group_norm":
        return normkit.group_norm(x, case.kwargs["num_groups"], w, b, axis=case.axis), None, None
    return normkit.rms_norm(x, w, axis=case.axis, **case.kwargs), None, None


def _call_torch(case: Case, x, p, step) -> tuple[Any, Any, Any]:
    """torch.nn.functional's twin (features moved to axis 1 where torch needs them there)."""
    w, b = p["weight"], p["bias"]
    rm = None if p.get("running_mean") is None else p["running_mean"].clone()
    rv = None if p.get("running_var") is None else p["running_var"].clone()
    if case.op in ("batch_norm", "group_norm") and case.axis != 1:
        moved = x.movedim(case.axis, 1)
    else:
        moved = x
    if case.op == "batch_norm":
        momentum = case.kwargs.get("momentum", 0.1)
        momentum = 1.0 / (step + 1) if momentum is None else momentum
        y = F.batch_norm(moved, rm, rv, w, b, training=case.kwargs["training"], momentum=momentum)
    elif case.op == "group_norm":
        y = F.group_norm(moved, case.kwargs["num_groups"], w, b)
    elif case.op == "instance_norm":
        y = F.instance_norm(x, rm, rv, w, b, **case.kwargs)
        return y, rm, rv
    elif case.op == "layer_norm":
        return F.layer_norm(x, _feature_shape(case), w, b), None, None
    else:
        return F.rms_norm(x, _feature_shape(case), None if w is None else w.to(x.dtype), **case.kwargs), None, None
    y = y if moved is x else y.movedim(1, case.axis)
    return y, rm, rv


def _run(case: Case, dtype: torch.dtype, call: Callable) -> dict:
    """Three steps, each from the previous step's running statistics: outputs, statistics, gradients."""
    p = _params(case, dtype)
    seen = {"y": [], "dx": [], "dw": [], "db": [], "running_mean": [], "running_var": []}
    for step in range(3):
        x = _tensor(case.shape, step, dtype, cl=case.channels_last).requires_grad_(True)
        leaves = {k: (v.detach().clone().requires_grad_(True) if k in ("weight", "bias") and v is not None else v)
                  for k, v in p.items()}
        y, rm, rv = call(case, x, leaves, step)
        up = _tensor(case.shape, 50 + step, dtype, cl=case.channels_last)
        wanted = [t for t in (x, leaves["weight"], leaves["bias"]) if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, up))
        seen["y"].append(y.detach())
        seen["dx"].append(next(grads))
        seen["dw"].append(next(grads) if leaves["weight"] is not None else None)
        seen["db"].append(next(grads) if leaves["bias"] is not None else None)
        if rm is not None:
            assert rm.grad_fn is None and rv.grad_fn is None, "running statistics carry autograd history"
            seen["running_mean"].append(rm)
            seen["running_var"].append(rv)
            p = dict(p, running_mean=rm.detach(), running_var=rv.detach())
    return seen


def _tolerance(case: Case, dtype: torch.dtype, want: torch.Tensor) -> dict:
    """Two implementations fed ``dtype`` data: each sum of n terms is off by about sqrt(n) * eps of its scale
    (random-sign rounding; n: the input's size), a few operations follow (factor 4), the errors of both add
    (factor 2). eps is the input dtype's: half-precision kernels may round intermediates to half."""
    if dtype == F64:
        return TIGHT
    n = 1
    for d in case.shape:
        n *= d
    unit = 8.0 * float(np.sqrt(n)) * torch.finfo(dtype).eps
    return dict(rtol=unit, atol=unit * max(float(want.abs().max()), 1.0))


def _assert_same(got: dict, want: dict, case: Case, dtype: torch.dtype, what: str) -> None:
    for key in got:
        assert len(got[key]) == len(want[key]), f"{what}: {key}"
        for step, (u, v) in enumerate(zip(got[key], want[key])):
            if v is None:
                assert u is None, f"{what}: {key} step {step}"
                continue
            assert u.dtype == v.dtype and u.shape == v.shape, f"{what}: {key} step {step}: {u.dtype} {v.dtype}"
            torch.testing.assert_close(u, v, msg=lambda m, k=key, s=step: f"{what}: {k} step {s}: {m}",
                                       **_tolerance(case, dtype, v))


def _check(case: Case, dtype: torch.dtype, served: list) -> None:
    got = _run(case, dtype, _call_normkit)  # policy auto: the hook's kernel
    served_here = [ok for op, ok in served if op == case.op]
    declines = case.declines_below_float64 and dtype != F64
    assert served_here and all(ok is not declines for ok in served_here), (served_here, declines)
    with kernels.use_policy("core"):
        core = _run(case, dtype, _call_normkit)
    _assert_same(got, core, case, dtype, "kernel vs core")
    _assert_same(got, _run(case, dtype, _call_torch), case, dtype, "kernel vs torch.nn.functional")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_equals_core_and_torch(case, dtype, served):
    _check(case, dtype, served)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # F.rms_norm, mixed dtypes
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_kernel_equals_core_and_torch_half(case, dtype, served):
    _check(case, dtype, served)


def test_cases_cover_every_op():
    assert {c.op for c in CASES} == set(OPS)
    assert {c.op for c in HALF_CASES} == set(OPS)


# ---------------------------------------------------------------- outside the contract: the core answers


def _x(shape=(4, 3, 5, 6), dtype=F64, seed=0):
    return _tensor(shape, seed, dtype)


def _stats3(dtype=F64):
    return torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)


DECLINED = {
    "mask": lambda: _kernels.batch_norm(_x(), *_stats3(), None, None, training=True, momentum=0.1, eps=1e-5, axis=1,
                                        mask=torch.ones(4, 5, 6, dtype=torch.bool)),
    "biased running variance": lambda: _kernels.batch_norm(_x(), *_stats3(), None, None, training=True, momentum=0.1,
                                                           eps=1e-5, axis=1, correction=0),
    "one value, allowed": lambda: _kernels.batch_norm(_x((1, 3)), *_stats3(), None, None, training=True, momentum=0.1,
                                                      eps=1e-5, axis=1, allow_single_value=True),
    "traced momentum": lambda: _kernels.batch_norm(_x(), *_stats3(), None, None, training=True,
                                                   momentum=torch.tensor(0.1), eps=1e-5, axis=1),
    "traced num_batches": lambda: _kernels.batch_norm(_x(), *_stats3(), None, None, training=True, momentum=None,
                                                      eps=1e-5, axis=1, num_batches=torch.tensor(3)),
    "float64 stats, float32 input": lambda: _kernels.batch_norm(_x(dtype=torch.float32), *_stats3(), None, None,
                                                                training=True, momentum=0.1, eps=1e-5, axis=1),
    "stats with history": lambda: _kernels.batch_norm(_x(), torch.zeros(3, dtype=F64, requires_grad=True),
                                                      torch.ones(3, dtype=F64), None, None, training=True,
                                                      momentum=0.1, eps=1e-5, axis=1),
    "weight as a list": lambda: _kernels.batch_norm(_x(), *_stats3(), [1.0, 2.0, 3.0], None, training=False,
                                                    momentum=0.1, eps=1e-5, axis=1),
    "weight of another shape": lambda: _kernels.layer_norm(_x(), torch.ones(1, 6, dtype=F64), None, axis=(3,), eps=1e-5),
    "NLC batch norm (a strided copy)": lambda: _kernels.batch_norm(_x((4, 7, 3)), *_stats3(), None, None,
                                                                   training=True, momentum=0.1, eps=1e-5, axis=2),
    "float32 channels_last training": lambda: _kernels.batch_norm(
        _x(dtype=torch.float32).contiguous(memory_format=torch.channels_last), *_stats3(torch.float32), None, None,
        training=True, momentum=0.1, eps=1e-5, axis=1),
    "float32 channels_last group norm": lambda: _kernels.group_norm(_x((2, 5, 6, 4), torch.float32), 2, None, None,
                                                                    axis=3, eps=1e-5),
    "non-trailing layer norm": lambda: _kernels.layer_norm(_x(), None, None, axis=(1, 2), eps=1e-5),
    "non-trailing rms norm": lambda: _kernels.rms_norm(_x(), None, axis=(0, 3), eps=1e-5),
    "instance norm, channels last": lambda: _kernels.instance_norm(_x(), None, None, None, None, use_input_stats=True,
                                                                   momentum=0.1, eps=1e-5, axis=3),
    "instance norm, one statistic": lambda: _kernels.instance_norm(_x(), torch.zeros(3, dtype=F64), None, None, None,
                                                                   use_input_stats=True, momentum=0.1, eps=1e-5, axis=1),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_kernel_declines_outside_its_contract(name):
    assert DECLINED[name]() is NotImplemented


def test_declined_calls_give_the_core_result(served):
    """The functional API falls back to the core where the kernel declines: the same answer as under "core"."""
    x = _x()
    mask = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    calls = [
        lambda: normkit.batch_norm(x, *_stats3(), None, None, training=True, mask=mask),
        lambda: normkit.batch_norm(x, *_stats3(), None, None, training=True, correction=0),
        lambda: normkit.batch_norm(x[:1, :, :1, :1], None, None, torch.ones(3, dtype=F64), torch.arange(3.0, dtype=F64),
                                   training=True, allow_single_value=True),
        lambda: normkit.batch_norm(x.movedim(1, -1)[:, :, 0], *_stats3(), training=True, axis=-1),
        lambda: normkit.layer_norm(x, None, None, axis=(1, 2)),
    ]
    for call in calls:
        got = call()
        with kernels.use_policy("core"):
            want = call()
        for u, v in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert served and not any(ok for _, ok in served)


@pytest.mark.parametrize("shape", [(10**6, 1), (10**6, 1, 1, 1), (250_000, 4)], ids=["N1", "N111", "NC"])
def test_training_statistics_exact_where_aten_sums_naively(shape):
    """The functional API under "auto" on float32 batches whose aten statistics are a naive float32 sum over the
    batch (every input without a spatial extent, one feature included): 10**6 values at mean 1e4, std 1, where
    aten's running mean is about 21 off; normkit's mean, variance and output stay within float32 round-off of
    the float64 formula on the same float32 data."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64) + 1e4).float()
    c = shape[1]
    out = normkit.batch_norm(x, torch.zeros(c), torch.ones(c), training=True, momentum=1.0)
    x64 = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    mean, var = x64.mean(dims), x64.var(dims, correction=1)
    assert (out.running_mean.double() - mean).abs().max() < 2e-3  # float32 spacing at 1e4: 1e-3
    assert (out.running_var.double() - var).abs().max() < 1e-3
    shape1 = [1] * x.dim()
    shape1[1] = c
    want = (x64 - mean.reshape(shape1)) / (x64.var(dims, correction=0).reshape(shape1) + 1e-5).sqrt()
    assert (out.output.double() - want).abs().max() < 2e-3


def test_kernels_are_pure(served):
    """aten updates running statistics in place: the kernel gives it clones, never the caller's tensors."""
    x, w, b = _x(), torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    rm, rv = _stats3()
    before = [t.clone() for t in (x, rm, rv, w, b)]
    versions = [t._version for t in (x, rm, rv, w, b)]
    y, new_mean, new_var = normkit.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    _, in_mean, in_var = normkit.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.5)
    assert served == [("batch_norm", True), ("instance_norm", True)]
    for t, old, version in zip((x, rm, rv, w, b), before, versions):
        torch.testing.assert_close(t, old, rtol=0, atol=0)
        assert t._version == version
    for new in (new_mean, new_var, in_mean, in_var):
        assert new.data_ptr() not in (rm.data_ptr(), rv.data_ptr())
    torch.testing.assert_close(new_mean, 0.5 * x.mean((0, 2, 3)), **TIGHT)
    _, eval_mean, eval_var = normkit.batch_norm(x, rm, rv, w, b, training=False)
    assert eval_mean is rm and eval_var is rv  # inference hands back the given statistics, as the core does


# ---------------------------------------------------------------- the table and the hook


def test_table_serves_every_op_dtype_and_device():
    for op in OPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
            for device in ("cpu", torch.device("cpu"), "cuda:0", torch.device("meta"), "mps", "xpu:1"):
                assert hook_kernel(op, XP, device, dtype) is getattr(_kernels, op), (op, dtype, device)
    assert {k[:3] for k in _plugin.TABLE.entries} == {
        (op, d, t) for op in OPS for d in ("cpu", "cuda", "any") for t in ("float16", "bfloat16", "float32", "float64")
    }


def test_no_kernel_outside_the_table():
    cpu = torch.device("cpu")
    assert hook_kernel("batch_norm", np, cpu, np.float32) is None  # another namespace
    assert hook_kernel("batch_norm", XP, cpu, torch.int64) is None
    assert hook_kernel("softmax", XP, cpu, torch.float32) is None
    nkt.set_kernel_policy("core")
    assert hook_kernel("batch_norm", XP, cpu, torch.float32) is None
    nkt.set_kernel_policy("auto")
    with kernels.use_policy("core"):
        assert hook_kernel("batch_norm", XP, cpu, torch.float32) is None


# ---------------------------------------------------------------- the modules' dispatch


def test_dispatch_follows_the_policy():
    x = torch.randn(4, 3, 5)
    for op, fn in (("batch_norm", F.batch_norm), ("layer_norm", F.layer_norm), ("group_norm", F.group_norm),
                   ("instance_norm", F.instance_norm), ("rms_norm", F.rms_norm)):
        assert _functional.kernel_for(op, x) is fn
        assert nkt.set_kernel_policy("core") == "auto" and nkt.get_kernel_policy() == "core"
        assert _functional.kernel_for(op, x) is None
        nkt.set_kernel_policy("auto")
        with kernels.use_policy("core"):  # the conformance suite's switch reaches the modules too
            assert nkt.get_kernel_policy() == "core" and _functional.kernel_for(op, x) is None
        assert _functional.kernel_for(op, x) is fn
    with pytest.raises(ValueError, match="kernel policy"):
        nkt.set_kernel_policy("fast")


def test_choice_made_once_per_configuration(monkeypatch):
    """One hook lookup per (op, device type, dtype), whatever the number of modules and calls."""
    calls = []
    real = kernels.lookup

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lookup", counting)
    _bump_generation()
    for _ in range(3):
        for module in (nkt.BatchNorm2d(3), nkt.BatchNorm2d(3).eval(), nkt.LayerNorm(5)):
            module(torch.randn(4, 3, 4, 5))
        nkt.BatchNorm2d(3, dtype=F64)(torch.randn(4, 3, 4, 5, dtype=F64))
    assert sorted(calls) == ["batch_norm", "batch_norm", "layer_norm"]


def test_dtype_outside_the_table_goes_to_torch_under_auto():
    """No kernel offered (integer input): under "auto" torch's own function answers, with torch's error."""
    x = torch.ones(4, 3, dtype=torch.long)
    assert _functional.kernel_for("batch_norm", x) is F.batch_norm
    for ours, theirs in ((nkt.BatchNorm1d(3), nn.BatchNorm1d(3)), (nkt.LayerNorm(3), nn.LayerNorm(3))):
        with pytest.raises(Exception) as want:
            theirs(x)
        with pytest.raises(type(want.value)) as got:
            ours(x)
        assert str(got.value) == str(want.value)


def test_policy_from_environment():
    code = (
        "import torch, normkit_torch as nkt;"
        "from normkit_torch import _functional as f;"
        "assert nkt.get_kernel_policy() == 'core';"
        "assert f.kernel_for('batch_norm', torch.randn(4, 3)) is None"
    )
    env = dict(os.environ, NORMKIT_TORCH_KERNELS="core")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


MODULES = [
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {}, (4, 3, 5, 6)),
    (nkt.BatchNorm1d, nn.BatchNorm1d, (5,), {}, (16, 5)),
    (nkt.InstanceNorm2d, nn.InstanceNorm2d, (3,), {"affine": True, "track_running_stats": True}, (2, 3, 5, 6)),
    (nkt.LayerNorm, nn.LayerNorm, (6,), {}, (4, 5, 6)),
    (nkt.GroupNorm, nn.GroupNorm, (2, 6), {}, (4, 6, 5)),
    (nkt.RMSNorm, nn.RMSNorm, (6,), {}, (4, 5, 6)),
]
MODULE_IDS = [m[0].__name__ for m in MODULES]


def _module_run(module, shape, offset, training=True):
    """Two training steps with gradients, then one eval step (float32 at ``offset``)."""
    out = []
    for step in range(2):
        module.train(training)
        x = _tensor(shape, step, torch.float32, offset).requires_grad_(True)
        y = module(x)
        grads = torch.autograd.grad(y, [x, *module.parameters()], _tensor(shape, 9 + step, torch.float32))
        out += [y.detach(), *grads]
    module.eval()
    out.append(module(_tensor(shape, 5, torch.float32, offset)).detach())
    return out + [b.clone() for b in module.buffers()]


def _module_pair(ours_cls, theirs_cls, args, kwargs, offset):
    theirs = randomize(theirs_cls(*args, **kwargs))
    with torch.no_grad():  # running statistics at the data's offset: inference centring is tested
        for name, b in theirs.named_buffers():
            if name == "running_mean":
                b.add_(offset + 0.5)
            elif name == "running_var":
                b.add_(3.5)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("ours_cls,theirs_cls,args,kwargs,shape", MODULES, ids=MODULE_IDS)
def test_auto_is_torch_nn_bit_for_bit(ours_cls, theirs_cls, args, kwargs, shape):
    """Policy auto: every module computes with torch's kernel exactly as its torch.nn twin (float32,
    offset 1e4): outputs, gradients, running statistics, inference."""
    ours, theirs = _module_pair(ours_cls, theirs_cls, args, kwargs, 1e4)
    for u, v in zip(_module_run(ours, shape, 1e4), _module_run(theirs, shape, 1e4)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def _reference(module, x):
    """float64 output of ``module``'s math with its (float32) state, in training mode or not."""
    x64 = x.detach().double().numpy()
    state = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    w, b = state.get("weight"), state.get("bias")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            return reference.batch_norm(x64, None, None, w, b, training=True, axis=1)[0]
        return reference.batch_norm(x64, state["running_mean"], state["running_var"], w, b, training=False, axis=1)[0]
    if isinstance(module, nn.InstanceNorm2d):
        if module.training:
            return reference.instance_norm(x64, w, b, axis=1)
        return reference.batch_norm(x64, state["running_mean"], state["running_var"], w, b, training=False, axis=1)[0]
    if isinstance(module, nn.LayerNorm):
        return reference.layer_norm(x64, w, b, axis=-1)
    if isinstance(module, nn.GroupNorm):
        return reference.group_norm(x64, module.num_groups, w, b, axis=1)
    return reference.rms_norm(x64, w, axis=-1, eps=float(torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("ours_cls,theirs_cls,args,kwargs,shape", MODULES, ids=MODULE_IDS)
def test_core_is_exact_at_offset_where_torch_is_not(ours_cls, theirs_cls, args, kwargs, shape, policy):
    """float32 data at mean 1e4 (std 2), running statistics there too: under "core" every module is within
    float32 round-off of the float64 reference (8 * sqrt(n) * eps, as in _tolerance); torch's kernels,
    hence "auto", form x * scale + shift and lose about |offset| * eps / std, beyond that bound."""
    ours, theirs = _module_pair(ours_cls, theirs_cls, args, kwargs, 1e4)
    n = 1
    for d in shape:
        n *= d
    bound = 8.0 * float(np.sqrt(n)) * torch.finfo(torch.float32).eps
    errors = {}
    for training in (True, False):
        x = _tensor(shape, 3, torch.float32, 1e4)
        for name, m in (("ours", ours), ("torch", theirs)):
            m.train(training)
            with torch.no_grad():
                want = _reference(m, x)  # from the state before this call
                y = m(x).double().numpy()
            scale = max(float(np.abs(want).max()), 1.0)
            errors[name, training] = float(np.abs(y - want).max()) / scale
    torch_error = max(errors["torch", True], errors["torch", False])
    ours_error = max(errors["ours", True], errors["ours", False])
    if ours_cls is nkt.RMSNorm:  # no centring: torch's kernel is exact there too
        assert torch_error <= bound and ours_error <= bound, errors
    elif policy == "core":
        assert ours_error <= bound < torch_error, errors
    else:
        assert ours_error == torch_error > bound, errors


# ---------------------------------------------------------------- torch.compile of the dispatch and the functional API


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dispatch_all(x, rm, rv, w, b, w5, b5):
    y = NF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    y = NF.instance_norm(y, None, None, w, b, True, 0.1, 1e-5)
    y = NF.group_norm(y, 3, w, b, 1e-5)
    y = NF.layer_norm(y, (5,), w5, b5, 1e-5)
    return NF.rms_norm(y, (5,), w5, None)


def _normkit_all(x, rm, rv, w, b, w5, b5):
    y, new_mean, new_var = normkit.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
    y = normkit.instance_norm(y, None, None, w, b).output
    y = normkit.group_norm(y, 3, w, b)
    y = normkit.layer_norm(y, w5, b5)
    return normkit.rms_norm(y, w5), new_mean, new_var


def _compile_args(shape):
    c = shape[1]
    return [_tensor(shape, 0, F64), torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64),
            _tensor((c,), 1, F64), _tensor((c,), 2, F64), _tensor((5,), 3, F64), _tensor((5,), 4, F64)]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_dispatch_and_functional_api_compile_fullgraph(dynamic, policy, _fresh_dynamo):
    """Both policies: one graph, no Dynamo warning, eager results and buffer updates. Static: compiled
    first, with every kernel choice forgotten just before (a configuration first seen while tracing).
    Dynamic: after an eager call, a second batch size runs in the same graph (no shape guard)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _bump_generation()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (_dispatch_all, _normkit_all):
            if dynamic:
                fn(*_compile_args((2, 3, 6, 5)))
            counter = CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
            frames = []
            for shape in ((4, 3, 6, 5), (6, 3, 6, 5))[: 2 if dynamic else 1]:
                got_args, want_args = _compile_args(shape), _compile_args(shape)
                got, want = compiled(*got_args), fn(*want_args)
                for u, v in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    torch.testing.assert_close(u, v, **TIGHT)
                for u, v in zip(got_args, want_args):  # the dispatch's in-place buffer updates
                    torch.testing.assert_close(u, v, **TIGHT)
                frames.append(counter.frame_count)
            assert frames[0] >= 1 and frames[-1] == frames[0], (fn.__name__, frames)  # no recompile
    noisy = [str(w.message) for w in caught if "dynamo" in str(w.message).lower() or "graph break" in str(w.message)]
    assert not noisy, noisy
