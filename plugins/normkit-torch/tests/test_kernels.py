"""The kernel hook: every kernel the plugin can choose equals the generic core and torch.nn (float64:
outputs, running statistics after 3 steps, input/weight/bias gradients) on every layout; the choice
is made once per module and configuration; the policy forces the core."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import F64, randomize
from normkit.plugin.manager import kernel as hook_kernel
from torch import nn

import normkit_torch as nkt
from normkit_torch import _autograd, _functional, _kernels, _plugin

TIGHT = dict(rtol=1e-10, atol=1e-12)

# (layout key, shape, channels_last): sizes above SMALL_NUMEL except "small"
LAYOUTS = [
    ("contiguous", (8, 4, 32, 40), False),
    ("channels_last", (8, 4, 32, 40), True),
    ("dense", (4096, 10), False),
    ("contiguous", (16, 4, 600), False),  # BatchNorm1d on (N, C, L)
    ("small", (4, 3, 5, 6), False),
    ("small", (4, 3, 5, 6), True),
]
LAYOUT_IDS = [f"{name}-{'x'.join(map(str, s))}{'-NHWC' if cl else ''}" for name, s, cl in LAYOUTS]

# every (train, eval) pair a module can end up with
KERNELS = {
    "core": (_functional.batch_norm_train, _functional.batch_norm_eval),
    "aten": (_kernels.native_batch_norm_train, _kernels.native_batch_norm_eval),
    "function-or-aten": (_kernels.function_or_native_batch_norm_train, _kernels.native_batch_norm_eval),
    "autograd-function": (_autograd.batch_norm_train, _autograd.batch_norm_eval),
    "auto": None,  # what the hook chose
}


@pytest.fixture(autouse=True)
def _auto_policy():
    previous = nkt.set_kernel_policy("auto")
    yield
    nkt.set_kernel_policy(previous)


def _input(shape, cl, seed, dtype=F64, compute=None):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3.0 + 2.0
    x = x.to(dtype).to(compute or dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def _classes(shape):
    return (nkt.BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (nkt.BatchNorm1d, nn.BatchNorm1d)


def _forced(module, pair):
    """Make ``module`` compute through ``pair`` (train, eval) whatever the hook chose."""
    if pair is not None:
        train, ev = pair
        module._normkit_kernels = {k: (train if k[0] == "batch_norm_train" else ev) for k in module._normkit_kernels}
    return module


def _run(module, shape, cl, dtype=F64, compute=None):
    """3 training steps with gradients, one no-grad training step, one eval step: everything observable.

    Inputs are rounded to ``dtype`` and given in ``compute`` (default: ``dtype``)."""
    out = {"y": [], "dx": [], "dw": [], "db": []}
    module.train()
    for step in range(3):
        module.zero_grad(set_to_none=True)
        x = _input(shape, cl, step, dtype, compute).requires_grad_(True)
        y = module(x)
        dy = _input(shape, cl, 100 + step, dtype, compute)
        y.backward(dy)
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dw"].append(module.weight.grad)
        out["db"].append(module.bias.grad)
        out["memory_format_kept"] = y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
            memory_format=torch.channels_last
        )
    with torch.no_grad():
        out["y_nograd"] = module(_input(shape, cl, 7, dtype, compute))
    out["state"] = {k: v.clone() for k, v in getattr(module, "_orig_mod", module).state_dict().items()}
    module.eval()
    out["y_eval"] = module(_input(shape, cl, 8, dtype, compute))
    return out


def _assert_same(a, b, **tol):
    for key in ("y", "dx", "dw", "db"):
        for step, (u, v) in enumerate(zip(a[key], b[key])):
            torch.testing.assert_close(u, v, msg=lambda m, key=key, step=step: f"{key} step {step}: {m}", **tol)
    torch.testing.assert_close(a["y_nograd"], b["y_nograd"], **tol)
    torch.testing.assert_close(a["y_eval"], b["y_eval"], **tol)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize("kernel", list(KERNELS), ids=list(KERNELS))
@pytest.mark.parametrize("layout,shape,cl", LAYOUTS, ids=LAYOUT_IDS)
def test_every_kernel_equals_core_and_torch_nn(layout, shape, cl, kernel):
    assert _functional.layout_of(_input(shape, cl, 0)) == layout
    ours_cls, torch_cls = _classes(shape)
    native = randomize(torch_cls(shape[1], dtype=F64))
    ours = _forced(ours_cls(shape[1], dtype=F64), KERNELS[kernel])
    ours.load_state_dict(native.state_dict())
    nkt.set_kernel_policy("core")
    core = ours_cls(shape[1], dtype=F64)
    core.load_state_dict(native.state_dict())
    want_core = _run(core, shape, cl)
    nkt.set_kernel_policy("auto")
    got = _run(ours, shape, cl)
    want_native = _run(native, shape, cl)
    _assert_same(got, want_core, **TIGHT)
    _assert_same(got, want_native, **TIGHT)
    assert got["memory_format_kept"] and want_native["memory_format_kept"]


def test_decision_table():
    """What the hook hands out (the plugin's docstring has the measurements behind it)."""
    xp = _functional.xp
    cpu = torch.device("cpu")
    assert hook_kernel("batch_norm_train", xp, cpu, torch.float32, "contiguous") is _kernels.function_or_native_batch_norm_train
    for layout in ("small", "dense", "channels_last", "strided"):
        assert hook_kernel("batch_norm_train", xp, cpu, torch.float32, layout) is _kernels.native_batch_norm_train
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        for layout in _functional.LAYOUTS:
            assert hook_kernel("batch_norm_train", xp, cpu, dtype, layout) is _kernels.native_batch_norm_train
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for layout in _functional.LAYOUTS:
            assert hook_kernel("batch_norm_eval", xp, cpu, dtype, layout) is _kernels.native_batch_norm_eval
    assert set(_plugin.KERNELS) == {
        (op, "cpu", d, lay) for op in ("batch_norm_train", "batch_norm_eval")
        for d in ("float32", "float64", "float16", "bfloat16") for lay in _functional.LAYOUTS
    }


def test_no_kernel_outside_the_table():
    """Other namespaces, devices, dtypes and ops: None, so the generic core is used."""
    cpu = torch.device("cpu")
    assert hook_kernel("batch_norm_train", np, cpu, np.float32, "dense") is None
    assert hook_kernel("batch_norm_train", _functional.xp, torch.device("meta"), torch.float32, "dense") is None
    assert hook_kernel("batch_norm_train", _functional.xp, "cuda:0", torch.float32, "dense") is None  # not measured
    assert hook_kernel("batch_norm_train", _functional.xp, cpu, torch.int64, "dense") is None
    assert hook_kernel("layer_norm", _functional.xp, cpu, torch.float32, "dense") is None
    assert hook_kernel("batch_norm_train", _functional.xp, cpu, torch.float32, "weird") is None


def test_layout_key():
    assert _functional.layout_of(torch.zeros(4, 3, 5, 6)) == "small"
    assert _functional.layout_of(torch.zeros(64, 8, 16, 16)) == "contiguous"
    assert _functional.layout_of(torch.zeros(64, 8, 16, 16).contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert _functional.layout_of(torch.zeros(8, 8, 16, 16, 4).contiguous(memory_format=torch.channels_last_3d)) == "channels_last"
    assert _functional.layout_of(torch.zeros(4096, 16)) == "dense"
    assert _functional.layout_of(torch.zeros(64, 16, 64).transpose(0, 2)) == "strided"


def test_kernel_chosen_once_kept_on_module():
    m = nkt.BatchNorm(4)  # any rank
    table = m._normkit_kernels
    key = ("batch_norm_train", "cpu", torch.float32, "channels_last")
    assert table[key] is _kernels.native_batch_norm_train
    assert "_normkit_kernels" not in str(list(m.state_dict()))
    calls = []
    real = _functional.resolve_kernel

    def counting(*args):
        calls.append(args)
        return real(*args)

    _functional.resolve_kernel = counting
    try:
        for _ in range(3):
            m(torch.randn(64, 4, 16, 16))
            m(torch.randn(8, 4))
    finally:
        _functional.resolve_kernel = real
    assert calls == []  # everything resolved at construction: no hook call per forward
    # deepcopy / pickle / torch.save keep the table (module-level functions)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone._normkit_kernels == table
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._normkit_kernels == table


def test_to_and_convert_reresolve():
    m = nkt.BatchNorm2d(4).to(torch.float64)
    assert ("batch_norm_eval", "cpu", torch.float64, "dense") in m._normkit_kernels
    converted = nkt.convert(nn.Sequential(nn.BatchNorm2d(4)))[0]  # built on "meta", then given the tensors
    assert converted._normkit_kernels[("batch_norm_train", "cpu", torch.float32, "small")] is _kernels.native_batch_norm_train
    lazy = nkt.LazyBatchNorm2d()
    lazy(torch.randn(4, 3, 5, 5))
    assert lazy._normkit_kernels[("batch_norm_train", "cpu", torch.float32, "small")] is _kernels.native_batch_norm_train


def test_policy_core_forces_the_core():
    m = nkt.BatchNorm2d(4)
    x = torch.randn(64, 4, 16, 16)
    assert m._normkit_kernel("batch_norm_train", x) is _kernels.function_or_native_batch_norm_train
    assert nkt.set_kernel_policy("core") == "auto"
    assert nkt.get_kernel_policy() == "core"
    assert m._normkit_kernel("batch_norm_train", x) is _functional.batch_norm_train
    assert m._normkit_kernel("batch_norm_eval", x) is _functional.batch_norm_eval
    with pytest.raises(ValueError, match="kernel policy"):
        nkt.set_kernel_policy("fast")


def test_policy_from_environment():
    code = (
        "import torch, normkit_torch as nkt;"
        "from normkit_torch import _functional as f;"
        "assert nkt.get_kernel_policy() == 'core';"
        "m = nkt.BatchNorm2d(4);"
        "assert m._normkit_kernel('batch_norm_train', torch.randn(64, 4, 16, 16)) is f.batch_norm_train"
    )
    env = dict(os.environ, NORMKIT_TORCH_KERNELS="core")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


@pytest.mark.parametrize("kernel", ["aten", "function-or-aten"])
def test_batch_of_one_raises_like_torch(kernel):
    train, _ = KERNELS[kernel]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        train(torch.randn(1, 3), None, None, 1e-5, 1)


@pytest.mark.parametrize("kernel", ["aten", "function-or-aten", "core"])
def test_feature_axis_other_than_one(kernel):
    """The contract's ``axis``: channels last in a row-major tensor (as normkit's core takes it)."""
    train, ev = KERNELS[kernel]
    x = torch.randn(6, 5, 7, 3, dtype=F64)
    w, b = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    y, mean, var = train(x, w, b, 1e-5, -1)
    y_ref, mean_ref, var_ref = _functional.batch_norm_train(x, w, b, 1e-5, -1)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(mean, mean_ref, **TIGHT)
    torch.testing.assert_close(var, var_ref, **TIGHT)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    torch.testing.assert_close(ev(x, rm, rv, w, b, 1e-5, -1), _functional.batch_norm_eval(x, rm, rv, w, b, 1e-5, -1), **TIGHT)


def _max_rel_error(got, want):
    """max |got - want| / max |want| over every observable, in float64."""
    worst = 0.0
    for key in ("y", "dx", "dw", "db"):
        for u, v in zip(got[key], want[key]):
            worst = max(worst, ((u.double() - v).abs().max() / v.abs().max()).item())
    for u, v in ((got["y_nograd"], want["y_nograd"]), (got["y_eval"], want["y_eval"])):
        worst = max(worst, ((u.double() - v).abs().max() / v.abs().max()).item())
    for k in ("running_mean", "running_var"):
        u, v = got["state"][k], want["state"][k]
        worst = max(worst, ((u.double() - v).abs().max() / v.abs().max()).item())
    return worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("layout,shape,cl", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[4]], ids=[LAYOUT_IDS[0], LAYOUT_IDS[1], LAYOUT_IDS[4]])
def test_half_precision_as_accurate_as_torch_nn(layout, shape, cl, dtype):
    """Half-precision modules (aten kernels, float32 statistics) against a float64 run on the same
    rounded inputs: no further off than torch.nn's own half-precision module (plus a little)."""
    ours_cls, torch_cls = _classes(shape)
    reference = randomize(torch_cls(shape[1], dtype=F64))
    native = torch_cls(shape[1], dtype=dtype)
    ours = ours_cls(shape[1], dtype=dtype)
    native.load_state_dict(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    reference.load_state_dict(native.state_dict())  # the rounded parameters
    want = _run(reference, shape, cl, dtype, compute=F64)
    err_ours = _max_rel_error(_run(ours, shape, cl, dtype), want)
    err_native = _max_rel_error(_run(native, shape, cl, dtype), want)
    eps = torch.finfo(dtype).eps
    assert err_ours <= max(1.5 * err_native, 4 * eps), (err_ours, err_native)
    mean, var = _kernels.native_batch_norm_train(_input(shape, cl, 0, dtype), None, None, 1e-5, 1)[1:]
    assert mean.dtype == var.dtype == torch.float32  # the contract: half input, float32 statistics


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layout,shape,cl", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2]], ids=LAYOUT_IDS[:3])
def test_compiled_kernels_fullgraph(layout, shape, cl, _fresh_dynamo):
    """The chosen kernels under torch.compile(fullgraph=True): same results as eager torch.nn, no Dynamo warning."""
    ours_cls, torch_cls = _classes(shape)
    native = randomize(torch_cls(shape[1], dtype=F64))
    ours = ours_cls(shape[1], dtype=F64)
    ours.load_state_dict(native.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = _run(compiled, shape, cl), _run(native, shape, cl)
    _assert_same(got, want, **TIGHT)
    noisy = [str(w.message) for w in caught if "dynamo" in str(w.message).lower() or "graph break" in str(w.message)]
    assert not noisy, noisy


# ---------------------------------------------------------------- the aten path with the module's buffers


@pytest.mark.parametrize("shape,cl", [((16, 16, 8, 8), False), ((8, 4, 32, 40), True), ((256, 12), False)],
                         ids=["small", "channels_last", "dense"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_aten_path_bitwise_equal_to_torch_nn_float32(shape, cl, momentum):
    """Where aten is chosen the module calls it as torch.nn does, with its own buffers: outputs, running
    statistics and gradients are torch.nn's bit for bit (float32, with and without autograd)."""
    ours_cls, torch_cls = _classes(shape)
    native = randomize(torch_cls(shape[1], momentum=momentum))
    ours = ours_cls(shape[1], momentum=momentum)
    ours.load_state_dict(native.state_dict())
    for step in range(3):
        x = _input(shape, cl, step, torch.float32)
        for m in (ours, native):
            m.zero_grad(set_to_none=True)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ours, native), xs)]
        for y in ys:
            y.backward(torch.ones_like(y))
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)
        torch.testing.assert_close(ours.weight.grad, native.weight.grad, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), native(x), rtol=0, atol=0)
        for k, v in native.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0, msg=k)
    ours.eval(), native.eval()
    x = _input(shape, cl, 9, torch.float32)
    torch.testing.assert_close(ours(x), native(x), rtol=0, atol=0)


def test_aten_path_feature_count_errors_like_torch():
    """The aten call checks the per-channel tensors itself: torch's messages, in torch's order."""
    for training in (True, False):
        ours, theirs = nkt.BatchNorm2d(3), nn.BatchNorm2d(3)
        ours.train(training), theirs.train(training)
        x = torch.randn(4, 5, 2, 2)
        with pytest.raises(RuntimeError) as want:
            theirs(x)
        with pytest.raises(RuntimeError, match=f"^{want.value}$"):
            ours(x)


def test_parametrized_weight_and_mixed_dtypes_fall_back():
    """A weight moved out of _parameters (parametrize) is read as an attribute; per-channel tensors in
    another dtype than aten takes go through the kernel's converting wrapper (torch.nn's results)."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ours, theirs = nkt.BatchNorm2d(3, dtype=F64), nn.BatchNorm2d(3, dtype=F64)
    for m in (ours, theirs):
        parametrize.register_parametrization(m, "weight", Double())
    x = _input((4, 3, 5, 6), False, 0)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
    assert_state = {k: v for k, v in theirs.state_dict().items()}
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, assert_state[k], **TIGHT)
    # float16 module, float16 input: aten's mixed-type path does not apply, the wrapper widens
    half, ref = nkt.BatchNorm2d(3).half(), nn.BatchNorm2d(3)
    xh = _input((4, 3, 5, 6), False, 1, torch.float16)
    torch.testing.assert_close(half(xh).float(), ref(xh.float()), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(half.running_var.float(), ref.running_var, rtol=2e-3, atol=2e-3)
