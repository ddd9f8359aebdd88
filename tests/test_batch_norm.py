"""normkit.batch_norm across the array matrix: backend x dtype x layout x mode, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference

# (id, shape, feature axis): dense, convolutional 1d/2d/3d, channels-last.
LAYOUTS = [
    ("dense", (16, 5), 1),
    ("conv1d", (4, 3, 7), 1),
    ("conv2d", (4, 3, 5, 6), 1),
    ("conv3d", (2, 3, 4, 3, 5), 1),
    ("channels_last", (4, 5, 6, 3), -1),
]
TOL = {"float32": dict(rtol=1e-5, atol=2e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 3.0 + 2.0).astype(dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, rm, rv, w, b


def _same_library(backend, out, x):
    assert nk.array_namespace(("out", out)) is nk.array_namespace(("x", x)), (type(out), type(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode", ["train_stats", "train_nostats", "eval"])
def test_matrix(backend, dtype, layout, affine, mode):
    if dtype not in backend.dtypes:
        pytest.fail(f"backend {backend.name} does not declare {dtype}")
    _, shape, axis = layout
    x, rm, rv, w, b = _data(shape, axis, dtype)
    before = [a.copy() for a in (x, rm, rv, w, b)]
    training = mode != "eval"
    with_stats = mode != "train_nostats"
    args = [backend.asarray(x)]
    args += [backend.asarray(rm), backend.asarray(rv)] if with_stats else [None, None]
    args += [backend.asarray(w), backend.asarray(b)] if affine else [None, None]
    out = backend.call(nk.batch_norm, tuple(args), dict(training=training, momentum=0.2, eps=1e-3, axis=axis))
    want = reference.batch_norm(x, rm if with_stats else None, rv if with_stats else None,
                                w if affine else None, b if affine else None,
                                training=training, momentum=0.2, eps=1e-3, axis=axis)
    y = backend.to_numpy(out.output)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    _same_library(backend, out.output, args[0])
    np.testing.assert_allclose(y, want[0], **TOL[dtype])
    if with_stats:
        np.testing.assert_allclose(backend.to_numpy(out.running_mean), want[1], **TOL[dtype])
        np.testing.assert_allclose(backend.to_numpy(out.running_var), want[2], **TOL[dtype])
        assert backend.to_numpy(out.running_mean).dtype == np.dtype(dtype)
    else:
        assert out.running_mean is None and out.running_var is None
    for a, a0 in zip((x, rm, rv, w, b), before):
        np.testing.assert_array_equal(a, a0)  # the NumPy sources are untouched
    np.testing.assert_array_equal(backend.to_numpy(args[0]), x)  # and so is the backend's input


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_scale_only_and_shift_only(backend, which):
    x, rm, rv, w, b = _data((8, 4, 3), 1, "float64")
    given = {"weight": w} if which == "weight" else {"bias": b}
    out = backend.call(nk.batch_norm, (backend.asarray(x),),
                       dict(training=True, **{k: backend.asarray(v) for k, v in given.items()}))
    want = reference.batch_norm(x, training=True, **given)
    np.testing.assert_allclose(backend.to_numpy(out.output), want[0], **TOL["float64"])


@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[4]], ids=["conv1d", "channels_last"])
def test_mask_excludes_positions(backend, layout):
    _, shape, axis = layout
    x, rm, rv, w, b = _data(shape, axis, "float64")
    f = axis % len(shape)
    mask_shape = tuple(d for i, d in enumerate(shape) if i != f)
    mask = np.random.default_rng(3).uniform(size=mask_shape) > 0.4
    out = backend.call(nk.batch_norm, (backend.asarray(x), backend.asarray(rm), backend.asarray(rv)),
                       dict(training=True, axis=axis, mask=backend.asarray(mask)))
    want = reference.batch_norm(x, rm, rv, training=True, axis=axis, mask=mask)
    np.testing.assert_allclose(backend.to_numpy(out.output), want[0], **TOL["float64"])
    np.testing.assert_allclose(backend.to_numpy(out.running_mean), want[1], **TOL["float64"])
    np.testing.assert_allclose(backend.to_numpy(out.running_var), want[2], **TOL["float64"])
    # the masked-out positions do not move the statistics
    x2 = np.where(np.expand_dims(mask, f), x, 1e6)
    out2 = backend.call(nk.batch_norm, (backend.asarray(x2), backend.asarray(rm), backend.asarray(rv)),
                        dict(training=True, axis=axis, mask=backend.asarray(mask)))
    np.testing.assert_allclose(backend.to_numpy(out2.running_mean), want[1], **TOL["float64"])


def test_biased_running_variance_keras_convention(backend):
    x, rm, rv, _, _ = _data((6, 3), 1, "float64")
    out = backend.call(nk.batch_norm, (backend.asarray(x), backend.asarray(rm), backend.asarray(rv)),
                       dict(training=True, correction=0, momentum=0.01))
    want = reference.batch_norm(x, rm, rv, training=True, correction=0, momentum=0.01)
    np.testing.assert_allclose(backend.to_numpy(out.running_var), want[2], **TOL["float64"])


def test_half_precision_reduced_in_float32(backend):
    for name in backend.half_dtypes:
        x32, rm, rv, w, b = _data((64, 4, 5), 1, "float32")
        x32 = x32 * 10 + 300  # float16 sums of these overflow or drift if reduced in float16
        half = getattr(backend.xp, name, None) or np.dtype(name)  # dask's namespace borrows numpy's dtypes
        x = backend.xp.astype(backend.asarray(x32), half)
        out = backend.call(nk.batch_norm, (x, backend.asarray(rm), backend.asarray(rv), backend.asarray(w), backend.asarray(b)),
                           dict(training=True))
        assert out.output.dtype == x.dtype, name
        assert out.running_mean.dtype == backend.xp.float32
        xin = backend.to_numpy(backend.xp.astype(x, backend.xp.float32))
        want = reference.batch_norm(xin, rm, rv, w, b, training=True)
        y = backend.to_numpy(backend.xp.astype(out.output, backend.xp.float32))
        np.testing.assert_allclose(y, want[0], rtol=1e-2, atol=3e-2 if name == "bfloat16" else 4e-3)
        np.testing.assert_allclose(backend.to_numpy(out.running_mean), want[1], rtol=1e-4)


def test_shifted_data_float32(backend):
    """Mean 1e4, std 1, a million rows: one-pass or naive summation fails this; normkit must not."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1_000_000, 2)) + 1e4).astype("float32")
    out = backend.call(nk.batch_norm, (backend.asarray(x),), dict(training=True, axis=-1))
    y = backend.to_numpy(out.output).astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-2)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-2)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]], ids=["dense", "conv3d", "channels_last"])
def test_shifted_data_matches_float64(backend, layout):
    """float32 data at mean 1e4: the core centres before scaling (train and eval), so it stays within
    float32 round-off of the float64 reference, where x * scale + shift would be ~1e-3 off (what a
    backend under policy auto may reach: torch's kernels, held to that uncentred bound)."""
    _, shape, axis = layout
    x, rm, rv, w, b = _data(shape, axis, "float32")
    x = (x + 1e4).astype("float32")
    rm = (rm + 1e4).astype("float32")
    args = tuple(backend.asarray(a) for a in (x, rm, rv, w, b))
    for training in (True, False):
        out = backend.call(nk.batch_norm, args, dict(training=training, axis=axis))
        want = reference.batch_norm(x, rm, rv, w, b, training=training, axis=axis)
        atol = 5e-5
        if backend.policy == "auto":  # a native kernel computes x * scale + shift: |offset| / std * eps more
            atol += 4 * float(np.finfo("float32").eps) * 1e4 / 3.0 * float(np.abs(want[0]).max())
        np.testing.assert_allclose(backend.to_numpy(out.output), want[0], rtol=1e-5, atol=atol, err_msg=f"training={training}")


def test_shifted_data_gradients_match_float64_torch():
    """Autograd through the core at mean 1e4 in float32 stays at float32 round-off of the float64
    gradients; torch.nn's own float32 kernel rounds the mean there and is ~2e-3 off (measured)."""
    import torch

    rng = np.random.default_rng(20)
    x64 = rng.standard_normal((4, 3, 5, 6)) * 2.0 + 0.5 + 1e4
    x = torch.tensor(x64, dtype=torch.float32, requires_grad=True)
    w = torch.tensor([0.8, 1.1, 1.3], dtype=torch.float32, requires_grad=True)
    up = rng.standard_normal(x64.shape)
    from normkit.plugin.kernels import use_policy

    with use_policy("core"):  # the core's own autograd, not torch's kernel (the default policy on torch tensors)
        y = nk.batch_norm(x, weight=w, training=True).output
    dx, dw = torch.autograd.grad((y * torch.tensor(up, dtype=torch.float32)).sum(), (x, w))
    want = reference.batch_norm_grad(x.detach().double().numpy(), up, w.detach().double().numpy(), axis=1)
    np.testing.assert_allclose(dw.numpy(), want[1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dx.numpy(), want[0], rtol=1e-3, atol=5e-5)


def test_one_value_per_feature_in_training_is_an_error(backend):
    x = backend.asarray(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nk.batch_norm(x, training=True)
    # Keras's behaviour, on request: the output is the bias
    b = np.arange(3, dtype="float32")
    out = nk.batch_norm(x, bias=backend.asarray(b), training=True, allow_single_value=True)
    np.testing.assert_allclose(backend.to_numpy(out.output), b[None, :])


def test_running_statistics_carry_no_gradient_torch():
    import torch

    x = torch.randn(8, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    out = nk.batch_norm(x, torch.zeros(3), torch.ones(3), w, training=True)
    assert out.output.requires_grad
    assert not out.running_mean.requires_grad and not out.running_var.requires_grad
    ref = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=True)
    g1 = torch.autograd.grad(out.output.pow(3).sum(), (x, w))
    g2 = torch.autograd.grad(ref.pow(3).sum(), (x, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_match_jax_grad_of_reference():
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3, 4)))
    w, b = jnp.ones(3) * 1.5, jnp.zeros(3) + 0.2

    def ours(x, w, b):
        return jnp.sum(nk.batch_norm(x, weight=w, bias=b, training=True).output ** 3)

    def plain(x, w, b):
        m = x.mean(axis=(0, 2), keepdims=True)
        v = ((x - m) ** 2).mean(axis=(0, 2), keepdims=True)
        return jnp.sum(((x - m) / jnp.sqrt(v + 1e-5) * w[:, None] + b[:, None]) ** 3)

    for a, e in zip(jax.grad(ours, argnums=(0, 1, 2))(x, w, b), jax.grad(plain, argnums=(0, 1, 2))(x, w, b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,axis", [((3, 4, 16, 20), 1), ((64, 8), 1), ((5, 16, 20, 4), -1)],
                         ids=["nchw-long-runs", "dense", "channels-last"])
def test_numpy_fast_path_equals_reference_and_leaves_input(shape, axis):
    """NumPy's in-place path (vecdot for runs of >= 256 values per feature, einsum otherwise)."""
    x, rm, rv, w, b = _data(shape, axis, "float64", seed=5)
    x = x + 1e3
    x0 = x.copy()
    for training in (True, False):
        out = nk.batch_norm(x, rm, rv, w, b, training=training, axis=axis)
        want = reference.batch_norm(x, rm, rv, w, b, training=training, axis=axis)
        for got, exp in zip(out, want):
            np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(x, x0)
