"""normkit.batch_norm_backward against torch autograd and jax.grad; the torch autograd.Function built on it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

import normkit as nk

# (id, shape, feature axis)
LAYOUTS = [
    ("dense", (16, 5), 1),
    ("conv1d", (4, 3, 7), 1),
    ("conv2d", (4, 3, 5, 6), 1),
    ("channels_last", (4, 5, 6, 3), -1),
]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]
AFFINE_IDS = ["weight_bias", "weight_only", "bias_only", "plain"]
EPS = 1e-3


def _data(shape, axis, seed=0, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape) * scale + loc
    dy = rng.standard_normal(shape)
    w = rng.uniform(0.5, 1.5, c)
    b = rng.standard_normal(c)
    return x, dy, w, b


def _stats(x, axis):
    f = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != f)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    return mean, 1.0 / np.sqrt(var + EPS)


def _torch_reference(x, dy, w, b, axis, training=True, rm=None, rv=None):
    """torch.nn.functional.batch_norm's autograd, with the feature axis moved to 1."""
    import torch

    xt = torch.tensor(np.moveaxis(x, axis, 1), requires_grad=True)
    wt = None if w is None else torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    rmt = None if rm is None else torch.tensor(rm)
    rvt = None if rv is None else torch.tensor(rv)
    y = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training=training, eps=EPS)
    inputs = [t for t in (xt, wt, bt) if t is not None]
    grads = list(torch.autograd.grad(y, inputs, torch.tensor(np.moveaxis(dy, axis, 1))))
    gx = np.moveaxis(grads.pop(0).numpy(), 1, axis)
    gw = grads.pop(0).numpy() if w is not None else None
    gb = grads.pop(0).numpy() if b is not None else None
    return gx, gw, gb


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
def test_matches_torch_autograd(layout, affine):
    _, shape, axis = layout
    x, dy, w, b = _data(shape, axis)
    w = w if affine[0] else None
    b = b if affine[1] else None
    mean, invstd = _stats(x, axis)
    got = nk.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    gx, gw, gb = _torch_reference(x, dy, w, b, axis)
    np.testing.assert_allclose(got.grad_input, gx, rtol=1e-10, atol=1e-12)
    if w is not None:
        np.testing.assert_allclose(got.grad_weight, gw, rtol=1e-10, atol=1e-12)
    if b is not None:
        np.testing.assert_allclose(got.grad_bias, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_inference_matches_torch_autograd(layout):
    _, shape, axis = layout
    x, dy, w, b = _data(shape, axis)
    c = shape[axis]
    rm, rv = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    invstd = 1.0 / np.sqrt(rv + EPS)
    got = nk.batch_norm_backward(dy, x, rm, invstd, w, axis=axis, training=False)
    gx, gw, gb = _torch_reference(x, dy, w, b, axis, training=False, rm=rm, rv=rv)
    for a, e in zip(got, (gx, gw, gb)):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
def test_matches_jax_grad(layout, affine):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    _, shape, axis = layout
    x, dy, w, b = _data(shape, axis, seed=1)
    f = axis % len(shape)
    axes = tuple(i for i in range(len(shape)) if i != f)
    bshape = tuple(shape[f] if i == f else 1 for i in range(len(shape)))

    def plain(x, w, b):
        m = jnp.mean(x, axis=axes, keepdims=True)
        v = jnp.mean((x - m) ** 2, axis=axes, keepdims=True)
        y = (x - m) / jnp.sqrt(v + EPS)
        if affine[0]:
            y = y * jnp.reshape(w, bshape)
        if affine[1]:
            y = y + jnp.reshape(b, bshape)
        return jnp.sum(y * dy)

    gx, gw, gb = jax.grad(plain, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    mean, invstd = _stats(x, axis)
    got = jax.jit(lambda *a: nk.batch_norm_backward(*a, axis=axis))(
        jnp.asarray(dy), jnp.asarray(x), jnp.asarray(mean), jnp.asarray(invstd), jnp.asarray(w) if affine[0] else None
    )
    assert isinstance(got.grad_input, jax.Array)
    np.testing.assert_allclose(np.asarray(got.grad_input), np.asarray(gx), rtol=1e-10, atol=1e-12)
    if affine[0]:
        np.testing.assert_allclose(np.asarray(got.grad_weight), np.asarray(gw), rtol=1e-10, atol=1e-12)
    if affine[1]:
        np.testing.assert_allclose(np.asarray(got.grad_bias), np.asarray(gb), rtol=1e-10, atol=1e-12)


def test_output_mask_and_half_precision():
    x, dy, w, _ = _data((8, 4, 5), 1)
    mean, invstd = _stats(x, 1)
    got = nk.batch_norm_backward(dy, x, mean, invstd, w, output_mask=(True, False, False))
    assert got.grad_weight is None and got.grad_bias is None and got.grad_input is not None
    full = nk.batch_norm_backward(dy, x, mean, invstd, w)
    x16, dy16 = x.astype(np.float16), dy.astype(np.float16)
    half = nk.batch_norm_backward(dy16, x16, mean.astype(np.float32), invstd.astype(np.float32), w.astype(np.float32))
    assert half.grad_input.dtype == np.float16 and half.grad_weight.dtype == np.float32
    np.testing.assert_allclose(half.grad_input.astype(np.float64), full.grad_input, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(half.grad_weight, full.grad_weight, rtol=1e-2, atol=2e-2)


def test_shifted_float32_data_keeps_accuracy():
    """Mean 1e4, std 1: the backward forms x - mean before scaling, so float32 stays close to float64."""
    x, dy, w, _ = _data((4096, 3), 1, loc=1e4, scale=1.0)
    mean, invstd = _stats(x, 1)
    args32 = [a.astype(np.float32) for a in (dy, x, mean, invstd, w)]
    want = nk.batch_norm_backward(*(a.astype(np.float64) for a in args32))  # same inputs, float64 math
    got = nk.batch_norm_backward(*args32)
    np.testing.assert_allclose(got.grad_input, want.grad_input, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got.grad_weight, want.grad_weight, rtol=1e-3, atol=1e-2)


def test_errors_name_the_argument():
    x, dy, w, _ = _data((8, 4), 1)
    mean, invstd = _stats(x, 1)
    with pytest.raises(ValueError, match="grad_output must have x's shape"):
        nk.batch_norm_backward(dy[:4], x, mean, invstd)
    with pytest.raises(ValueError, match=r"invstd must have shape \(4,\)"):
        nk.batch_norm_backward(dy, x, mean, invstd[:3])
    with pytest.raises(TypeError, match="does not mix arrays of two libraries"):
        import torch

        nk.batch_norm_backward(dy, x, torch.tensor(mean), invstd)


# ---- the torch autograd.Function (plugins/normkit-torch/src/normkit_torch/_autograd.py) ----


def _autograd_module():
    try:
        return importlib.import_module("normkit_torch._autograd")
    except ImportError:
        src = Path(__file__).resolve().parents[1] / "plugins" / "normkit-torch" / "src"
        sys.path.insert(0, str(src))
        try:
            return importlib.import_module("normkit_torch._autograd")
        finally:
            sys.path.remove(str(src))


TORCH_LAYOUTS = LAYOUTS + [("conv2d_channels_last_memory", (4, 3, 5, 6), 1), ("conv3d", (2, 3, 4, 3, 5), 1)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", TORCH_LAYOUTS, ids=[lay[0] for lay in TORCH_LAYOUTS])
@pytest.mark.parametrize("affine", AFFINE, ids=AFFINE_IDS)
def test_torch_function_matches_native(dtype, layout, affine):
    import torch

    ag = _autograd_module()
    name, shape, axis = layout
    x, dy, w, b = _data(shape, axis, seed=2)
    tdt = getattr(torch, dtype)
    xt = torch.tensor(x, dtype=tdt)
    if name == "conv2d_channels_last_memory":
        xt = xt.contiguous(memory_format=torch.channels_last)
    dyt = torch.tensor(dy, dtype=tdt)
    wt = torch.tensor(w, dtype=tdt, requires_grad=True) if affine[0] else None
    bt = torch.tensor(b, dtype=tdt, requires_grad=True) if affine[1] else None
    xt.requires_grad_(True)
    y, mean, var = ag.batch_norm_train(xt, wt, bt, EPS, axis)
    assert not mean.requires_grad and not var.requires_grad
    if name == "conv2d_channels_last_memory":
        assert y.is_contiguous(memory_format=torch.channels_last)
    inputs = [t for t in (xt, wt, bt) if t is not None]
    got = torch.autograd.grad(y, inputs, dyt)

    xr = xt.detach().clone().requires_grad_(True)
    wr = None if wt is None else wt.detach().clone().requires_grad_(True)
    br = None if bt is None else bt.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.batch_norm(torch.movedim(xr, axis, 1), None, None, wr, br, training=True, eps=EPS)
    ref = torch.movedim(ref, 1, axis)
    want = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], dyt)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref, **tol)
    f = axis % len(shape)
    axes = tuple(i for i in range(len(shape)) if i != f)
    torch.testing.assert_close(mean, xt.detach().mean(axes), **tol)
    torch.testing.assert_close(var, xt.detach().var(axes, correction=0), **tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)


def test_torch_function_half_and_shifted_data():
    import torch

    ag = _autograd_module()
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((64, 4, 5)) * 10 + 300, dtype=torch.float16, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    y, mean, var = ag.batch_norm_train(x, w, None, 1e-5, 1)
    assert y.dtype == torch.float16 and mean.dtype == torch.float32
    (gx,) = torch.autograd.grad(y.float().pow(2).sum(), (x,))
    assert gx.dtype == torch.float16 and torch.isfinite(gx).all()
    xs = torch.tensor(rng.standard_normal((100_000, 2)) + 1e4, dtype=torch.float32)
    ys, _, vs = ag.batch_norm_train(xs, None, None, 1e-5, -1)
    assert abs(float(ys.double().mean())) < 1e-2 and abs(float(ys.double().std()) - 1) < 1e-2
    assert abs(float(vs.mean()) - 1) < 2e-2


def test_torch_function_refuses_double_backward():
    import torch

    ag = _autograd_module()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    y, _, _ = ag.batch_norm_train(x, w, None, 1e-5, 1)
    (gx,) = torch.autograd.grad(y.pow(3).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_torch_function_single_value_error():
    import torch

    ag = _autograd_module()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ag.batch_norm_train(torch.ones(1, 3), None, None, 1e-5, 1)


@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_numpy_long_runs_forward(loc):
    """NCHW-like numpy input (runs of >= 256 values per feature) takes the vecdot variance; same answers."""
    from normkit.testing import reference

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 3, 16, 20)) * 2 + loc).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = x.copy()
    out = nk.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    want = reference.batch_norm(x.astype(np.float64), rm, rv, w, b, training=True, momentum=0.5)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(out.output, want[0], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(out.running_mean, want[1], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.running_var, want[2], rtol=1e-3)


@pytest.mark.parametrize("layout", TORCH_LAYOUTS, ids=[lay[0] for lay in TORCH_LAYOUTS])
def test_torch_eval_matches_native(layout):
    import torch

    ag = _autograd_module()
    name, shape, axis = layout
    x, dy, w, b = _data(shape, axis, seed=4)
    c = shape[axis]
    rm, rv = torch.linspace(-1, 1, c, dtype=torch.float64), torch.linspace(0.5, 2, c, dtype=torch.float64)
    xt = torch.tensor(x)
    if name == "conv2d_channels_last_memory":
        xt = xt.contiguous(memory_format=torch.channels_last)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b)
    ref = torch.movedim(torch.nn.functional.batch_norm(torch.movedim(xt, axis, 1), rm, rv, wt, bt, training=False, eps=EPS), 1, axis)
    with torch.no_grad():
        y = ag.batch_norm_eval(xt, rm, rv, wt, bt, EPS, axis)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    y2 = ag.batch_norm_eval(xt, rm, rv, wt, bt, EPS, axis)  # differentiable when autograd is on
    (g,) = torch.autograd.grad(y2, (wt,), torch.tensor(dy))
    (gr,) = torch.autograd.grad(ref, (wt,), torch.tensor(dy))
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


def test_torch_function_shifted_float32_gradients():
    """Mean 1e4, std 1 in float32: output and gradients stay within a few float32 ulps of 1e4 of float64."""
    import torch

    ag = _autograd_module()
    rng = np.random.default_rng(6)
    x32 = torch.tensor(rng.standard_normal((64, 3, 40, 40)) + 1e4, dtype=torch.float32)  # chunked path
    dy = torch.tensor(rng.standard_normal(x32.shape), dtype=torch.float32)
    w = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    xg = x32.clone().requires_grad_(True)
    y, _, _ = ag.batch_norm_train(xg, w, None, 1e-5, 1)
    gx, gw = torch.autograd.grad(y, (xg, w), dy)
    x64 = x32.double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, None, training=True, eps=1e-5)
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    tol = 1e4 * float(np.finfo(np.float32).eps) * 4
    torch.testing.assert_close(y.double(), y64.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(gx.double(), gx64, rtol=0, atol=tol)
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-3, atol=0.5)
