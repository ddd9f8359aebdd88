"""normkit.batch_norm_backward against torch autograd and jax.grad."""

from __future__ import annotations

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
