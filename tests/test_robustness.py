"""Hostile inputs, one defect of issue 11 each, on every backend of the matrix where it applies.

Tolerances are ``roundoff.assert_close``'s (float round-off of the case); each test failed on
the code before the fix (3431f07 or e746bf1, named per test) and passes now.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference
from roundoff import as_seen, assert_close, flushes_subnormals


def _np(backend, a):
    return backend.to_numpy(a)


# ---------------------------------------------------------------- statistics that trust no sample


@pytest.fixture(scope="module")
def outlier_first():
    """1e6 rows of N(1e4, 1) in float32 with x[0] = 0: a shift by the first sample loses every digit."""
    x = (np.random.default_rng(0).standard_normal((1_000_000, 2)) + 1e4).astype(np.float32)
    x[0] = 0.0
    return x


@pytest.mark.parametrize("fn", ["standardize", "batch_norm"])
def test_first_sample_outlier(backend, outlier_first, fn):
    """3431f07: max error 918 (numpy, array-api-strict, TensorFlow), 570 (dask); within float32 round-off now."""
    x = outlier_first
    xb = backend.asarray(x)
    if fn == "standardize":
        got = backend.call(nk.standardize, (xb,), {})
        want = reference.standardize(x)
    else:
        got = backend.call(nk.batch_norm, (xb,), dict(training=True, axis=-1)).output
        want = reference.batch_norm(x, training=True, axis=-1)[0]
    # 16: the statistics are accumulated pairwise or in float64 on every backend (no factor of n)
    assert_close(_np(backend, got), want, "float32", 8, what=fn)


@pytest.fixture(scope="module")
def sorted_exponential():
    """1e6 rows of 2 exponential features sorted from the largest down, float32."""
    x = np.ascontiguousarray(np.sort(np.random.default_rng(1).exponential(size=(1_000_000, 2)), axis=0)[::-1])
    return x.astype(np.float32)


@pytest.mark.parametrize("fn", ["standardize", "batch_norm"])
def test_sorted_exponential(backend, sorted_exponential, fn):
    """3431f07 was 0.094 off on NumPy (naive sums across rows from the largest value down), e746bf1 1.3e-5
    (the residual summed naively); float32 round-off now."""
    x = sorted_exponential
    if fn == "standardize":
        got = backend.call(nk.standardize, (backend.asarray(x),), {})
    else:
        got = backend.call(nk.batch_norm, (backend.asarray(x),), dict(training=True, axis=-1, eps=1e-12)).output
    assert_close(_np(backend, got), reference.standardize(x), "float32", 8, what=f"sorted {fn}")


# ---------------------------------------------------------------- gradients of a constant feature


def _constant_channel():
    """(6, 3, 4) float64 with channel 1 constant: a constant feature, group, instance and layer row."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 3, 4)) * 2 + 1
    x[:, 1] = 2.5
    return x, rng.standard_normal(x.shape)


GRADIENT_FUNCTIONS = {
    "standardize": (lambda a: nk.standardize(a, axis=1), None),
    "layer_norm": (lambda a: nk.layer_norm(a), lambda x, g: reference.layer_norm_grad(x, g)[0]),
    "group_norm": (lambda a: nk.group_norm(a, 3), lambda x, g: reference.group_norm_grad(x, g, 3)[0]),
    "instance_norm": (lambda a: nk.instance_norm(a).output, lambda x, g: reference.group_norm_grad(x, g, 3)[0]),
    "batch_norm": (lambda a: nk.batch_norm(a, training=True).output, lambda x, g: reference.batch_norm_grad(x, g)[0]),
}


def _standardize_grad(x, g):
    """d/dx sum(standardize(x, axis=1) * g): the eps-free z-score gradient; a constant feature's std counts as 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = reference.batch_norm_grad(x, g, eps=0.0)[0]  # channel 1: NaN (its std is 0)
    dx[:, 1] = (g - g.mean(axis=(0, 2), keepdims=True))[:, 1]  # z = x - mean there
    return dx


def _gradient(framework, fn, x, g):
    if framework == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        (dx,) = torch.autograd.grad((fn(t) * torch.tensor(g)).sum(), (t,))
        return dx.numpy()
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        return np.asarray(jax.grad(lambda a: jnp.sum(fn(a) * jnp.asarray(g)))(jnp.asarray(x)))
    import tensorflow as tf

    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        loss = tf.reduce_sum(fn(t) * tf.constant(g))
    return tape.gradient(loss, t).numpy()


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
@pytest.mark.parametrize("name", list(GRADIENT_FUNCTIONS))
def test_constant_feature_gradient_is_finite_and_right(framework, name):
    """e746bf1: standardize's gradient was NaN for a constant feature (sqrt's inf times where's 0)."""
    fn, ref = GRADIENT_FUNCTIONS[name]
    x, g = _constant_channel()
    dx = _gradient(framework, fn, x, g)
    assert np.isfinite(dx).all(), f"{name} on {framework}: NaN/inf in the gradient"
    want = _standardize_grad(x, g) if name == "standardize" else ref(x, g)
    np.testing.assert_allclose(dx, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- shapes that hold no statistics


@pytest.mark.parametrize("fn", ["standardize", "min_max_scale", "from_array"])
def test_one_dimensional_input_is_refused(backend, fn):
    """e746bf1: a 1-D x gave all zeros (one sample per feature); now a ValueError naming x, its shape and the axis."""
    f = nk.Moments.from_array if fn == "from_array" else getattr(nk, fn)
    x = np.array([1.0, 2.0, 4.0, 8.0, 3.0])
    with pytest.raises(ValueError, match=r"x of shape \((5|None),\) with axis=-1: that is one sample per feature"):
        backend.call(f, (backend.asarray(x),), {})
    if fn != "from_array":  # statistics over all of x are what axis=None means
        got = backend.call(f, (backend.asarray(x),), dict(axis=None))
        np.testing.assert_allclose(_np(backend, got), getattr(reference, fn)(x, axis=None), rtol=1e-12, atol=1e-12)


def test_zero_size_feature_axis(backend):
    """e746bf1: the NumPy path crashed on x of shape (4, 0) (cannot reshape array of size 0)."""
    x, empty = np.zeros((4, 0)), np.zeros(0)
    out = backend.call(nk.batch_norm, (backend.asarray(x), backend.asarray(empty), backend.asarray(empty + 1)),
                       dict(training=True))
    assert _np(backend, out.output).shape == (4, 0) and _np(backend, out.running_var).shape == (0,)
    assert _np(backend, backend.call(nk.standardize, (backend.asarray(x),), {})).shape == (4, 0)


def test_dask_unknown_chunk_sizes_stay_lazy_and_right():
    """e746bf1: "cannot convert float NaN to integer" after boolean indexing; now lazy and equal to NumPy."""
    import dask
    import dask.array as da

    from normkit.testing.backends import _refuse_compute

    x = np.random.default_rng(4).standard_normal((40, 3)) * 3 + 5
    keep = x[:, 0] > 4.0
    d = da.from_array(x, chunks=(10, 3))
    d = d[d[:, 0] > 4.0]
    assert np.isnan(d.shape[0])
    with dask.config.set(scheduler=_refuse_compute):
        z, mm = nk.standardize(d), nk.min_max_scale(d)
        out = nk.batch_norm(d, da.zeros(3), da.ones(3), training=True, axis=-1)
        m = nk.Moments.from_array(d)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_allclose(z.compute(), reference.standardize(x[keep]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mm.compute(), reference.min_max_scale(x[keep]), rtol=1e-12, atol=1e-12)
        want = reference.batch_norm(x[keep], np.zeros(3), np.ones(3), training=True, axis=-1)
        np.testing.assert_allclose(out.output.compute(), want[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out.running_var.compute(), want[2], rtol=1e-12)
        assert int(m.count.compute()) == keep.sum()
        np.testing.assert_allclose(m.var.compute(), x[keep].var(axis=0), rtol=1e-12)


# ---------------------------------------------------------------- arguments: the lead's fixes, on every backend


def test_integer_running_statistics_are_refused(backend):
    """3431f07: int64 running statistics truncated the batch mean (0.5 instead of 0.599)."""
    x = backend.asarray(np.random.default_rng(5).standard_normal((8, 3)) + 6)
    for name in ("running_mean", "running_var"):
        state = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
        state[name] = state[name].astype(np.int64)
        with pytest.raises(TypeError, match=rf"{name} must have a real floating dtype, got .*int64"):
            backend.call(nk.batch_norm, (x, backend.asarray(state["running_mean"]), backend.asarray(state["running_var"])),
                         dict(training=True))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(training=True, momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(training=True, momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(training=True, momentum=None), ValueError, "momentum=None .* needs num_batches"),
    (dict(training=True, momentum="0.1"), TypeError, "momentum must be a number in"),
    (dict(training=False, eps=-1.0), ValueError, "eps must be >= 0, got -1.0"),
    (dict(training=False, eps=float("nan")), ValueError, "eps must be a non-negative number, got nan"),
    (dict(training=True, eps="1e-5"), TypeError, "eps must be a positive number, got str '1e-5'"),
    (dict(training=True, eps=0.0), ValueError, "eps must be > 0"),
], ids=["momentum>1", "momentum<0", "momentum-None", "momentum-str", "eval-eps<0", "eval-eps-nan", "eps-str", "train-eps0"])
def test_eps_and_momentum_are_validated(backend, kwargs, error, message):
    """3431f07: momentum 1.5 made running_var negative, None a bare TypeError; eval eps=-1 gave inf, NaN NaN, a str passed."""
    x = np.random.default_rng(6).standard_normal((8, 3))
    args = (backend.asarray(x), backend.asarray(np.zeros(3)), backend.asarray(np.ones(3)))
    with pytest.raises(error, match=message):
        backend.call(nk.batch_norm, args, kwargs)


def test_momentum_none_is_the_cumulative_average(backend):
    """momentum=None with num_batches=k is torch's cumulative average: weight 1/k for the new batch."""
    x = np.random.default_rng(7).standard_normal((8, 3)) * 2 + 1
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    out = backend.call(nk.batch_norm, (backend.asarray(x), backend.asarray(rm), backend.asarray(rv)),
                       dict(training=True, momentum=None, num_batches=4))
    want = reference.batch_norm(x, rm, rv, training=True, momentum=0.25)
    np.testing.assert_allclose(_np(backend, out.running_mean), want[1], rtol=1e-12)
    np.testing.assert_allclose(_np(backend, out.running_var), want[2], rtol=1e-12)


def test_numpy_integers_for_axis_and_num_groups(backend):
    """3431f07: np.int64(1) as axis and np.int64(2) as num_groups were refused.

    Called directly: the traced transforms of the matrix would trace the NumPy integer as an array.
    """
    x = backend.asarray(np.random.default_rng(8).standard_normal((2, 4, 3)))
    for fn, kwargs, plain in [
        (nk.batch_norm, dict(training=True, axis=np.int64(1)), dict(training=True, axis=1)),
        (nk.layer_norm, dict(axis=np.int64(-1)), dict(axis=-1)),
        (nk.standardize, dict(axis=np.int64(1)), dict(axis=1)),
    ]:
        got, want = fn(x, **kwargs), fn(x, **plain)
        got, want = (got.output, want.output) if fn is nk.batch_norm else (got, want)
        np.testing.assert_array_equal(_np(backend, got), _np(backend, want))
    np.testing.assert_array_equal(_np(backend, nk.group_norm(x, np.int64(2))), _np(backend, nk.group_norm(x, 2)))


def test_family_accepts_eps_zero(backend):
    """3431f07: layer/group/instance norm refused eps=0, which torch.nn accepts."""
    x = np.random.default_rng(9).standard_normal((2, 6, 5))
    xb = backend.asarray(x)
    np.testing.assert_allclose(_np(backend, backend.call(nk.layer_norm, (xb,), dict(eps=0.0))),
                               reference.layer_norm(x, eps=0.0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(backend, backend.call(nk.group_norm, (xb, 3), dict(eps=0.0))),
                               reference.group_norm(x, 3, eps=0.0), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- masks


def test_mask_excluding_every_position_leaves_running_statistics(backend):
    """3431f07: an all-False mask still moved running_mean (to 0.51 from 0); now count 0 per feature changes nothing."""
    x = np.random.default_rng(10).standard_normal((8, 3, 5)) + 5
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 3.0])
    args = (backend.asarray(x), backend.asarray(rm), backend.asarray(rv))
    out = backend.call(nk.batch_norm, args, dict(training=True, mask=backend.asarray(np.zeros((8, 5), bool))))
    np.testing.assert_array_equal(_np(backend, out.running_mean), rm)
    np.testing.assert_array_equal(_np(backend, out.running_var), rv)
    assert np.isfinite(_np(backend, out.output)).all()
    # a full-rank mask that excludes all of feature 1 only: feature 1 keeps its statistics, the others move
    mask = np.ones(x.shape, bool)
    mask[:, 1] = False
    out = backend.call(nk.batch_norm, args, dict(training=True, mask=backend.asarray(mask)))
    want = reference.batch_norm(x[:, [0, 2]], rm[[0, 2]], rv[[0, 2]], training=True)
    np.testing.assert_allclose(_np(backend, out.running_mean)[[0, 2]], want[1], rtol=1e-12)
    np.testing.assert_allclose(_np(backend, out.running_var)[[0, 2]], want[2], rtol=1e-12)
    assert _np(backend, out.running_mean)[1] == rm[1] and _np(backend, out.running_var)[1] == rv[1]


# ---------------------------------------------------------------- magnitudes


@pytest.mark.parametrize("kind", ["subnormal", "range-3e38", "std-1e30", "tiny-normal"])
def test_extreme_magnitudes_in_the_fitting_functions(backend, kind):
    """e746bf1: subnormal data came back unchanged from standardize and inf/NaN from min_max_scale; a range of 3e38
    gave zeros on jax/TF (1/range is subnormal there) and NaN everywhere across 0; std 1e30 gave NaN z-scores."""
    rng = np.random.default_rng(11)
    x = {
        "subnormal": rng.standard_normal((50, 3)) * 1e-40,
        "range-3e38": np.linspace(-3e38, 3e38, 150).reshape(50, 3),
        "std-1e30": rng.standard_normal((50, 3)) * 1e30,
        "tiny-normal": rng.standard_normal((50, 3)) * 1e-30 + 1e-29,
    }[kind].astype(np.float32)
    seen = as_seen(backend, x.astype(np.float64), "float32")
    xb = backend.asarray(x)
    z = _np(backend, backend.call(nk.standardize, (xb,), {}))
    assert_close(z, reference.standardize(seen), "float32", 50, what=f"{kind} standardize")
    y = _np(backend, backend.call(nk.min_max_scale, (xb,), dict(feature_range=(-1.0, 1.0))))
    want = reference.min_max_scale(seen, feature_range=(-1.0, 1.0))
    assert_close(y, want, "float32", 0, what=f"{kind} min_max_scale")
    if kind == "subnormal" and not flushes_subnormals(backend, "float32"):
        np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-5)  # not the data back unchanged


@pytest.mark.parametrize("k", [1000, -1000, -1060])
def test_float64_fitting_is_exact_under_power_of_two_scaling(k):
    """float64 at 2**1000 (squares overflow) and 2**-1000, 2**-1060 (squares underflow; subnormal data):
    the fitting functions scale by powers of two, so x * 2**k standardizes as x does (bitwise where x * 2**k is normal)."""
    x = np.random.default_rng(12).standard_normal((40, 3)) * 3 + 2
    x[5, 1] = np.nan
    scaled = np.ldexp(x, k)
    exact = k > -1022 + 8  # subnormal values keep fewer bits
    for fn in (nk.standardize, nk.min_max_scale):
        got, want = fn(scaled), fn(np.ldexp(scaled, -k) if not exact else x)
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            assert_close(got, getattr(reference, fn.__name__)(np.ldexp(scaled, -k)), "float64", 40, what=fn.__name__)
    if k == 1000:  # m2, a sum of squared deviations near 2**2006, is past float64's range: NumPy says so, m2 is inf
        with pytest.warns(RuntimeWarning, match="overflow"):
            m = nk.Moments.from_array(scaled)
        assert np.all(np.isposinf(m.m2)), m.m2
    else:
        m = nk.Moments.from_array(scaled)
    m0 = nk.Moments.from_array(x)
    if exact:
        np.testing.assert_array_equal(np.ldexp(m.mean, -k), m0.mean)
        np.testing.assert_array_equal(m.observed, [40, 39, 40])


# ---------------------------------------------------------------- NaN


def _with_nan():
    x = np.random.default_rng(13).standard_normal((12, 3)) * 2 + 3
    x[[2, 7], 0] = np.nan
    x[5, 2] = np.nan
    return x


def test_fitting_ignores_nan_and_keeps_it(backend):
    """e746bf1: one NaN made a whole column NaN; now scikit-learn's rule: ignored by the fit, NaN in the output."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x = _with_nan()
    xb = backend.asarray(x)
    z = _np(backend, backend.call(nk.standardize, (xb,), {}))
    y = _np(backend, backend.call(nk.min_max_scale, (xb,), {}))
    np.testing.assert_allclose(z, StandardScaler().fit_transform(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, MinMaxScaler().fit_transform(x), rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isnan(z), np.isnan(x)) and np.array_equal(np.isnan(y), np.isnan(x))
    m = nk.Moments.from_array(xb)
    count, mean, var, lo, hi = reference.moments(x)
    assert m.count == 12
    np.testing.assert_array_equal(_np(backend, m.observed), count)
    np.testing.assert_allclose(_np(backend, m.mean), mean, rtol=1e-12)
    np.testing.assert_allclose(_np(backend, m.var), var, rtol=1e-12)
    np.testing.assert_array_equal(_np(backend, m.min), lo)
    np.testing.assert_array_equal(_np(backend, m.max), hi)


def test_norms_propagate_nan_as_torch(backend):
    """batch/layer norm keep torch's rule: a NaN poisons its own feature (batch) or sample (layer), nothing else."""
    x = _with_nan()[:, :, None] * np.ones((1, 1, 2))  # (12, 3, 2): NaN in features 0 and 2
    rm, rv = np.zeros(3), np.ones(3)
    out = backend.call(nk.batch_norm, (backend.asarray(x), backend.asarray(rm), backend.asarray(rv)), dict(training=True))
    y = _np(backend, out.output)
    assert np.isnan(y[:, [0, 2]]).all() and np.isnan(_np(backend, out.running_mean)[[0, 2]]).all()
    want = reference.batch_norm(x[:, [1]], rm[[1]], rv[[1]], training=True)
    np.testing.assert_allclose(y[:, [1]], want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(backend, out.running_var)[[1]], want[2], rtol=1e-12)
    ln = _np(backend, backend.call(nk.layer_norm, (backend.asarray(x),), dict(axis=(1, 2))))
    bad = np.isnan(x).any(axis=(1, 2))
    assert np.isnan(ln[bad]).all()
    np.testing.assert_allclose(ln[~bad], reference.layer_norm(x[~bad], axis=(1, 2)), rtol=1e-10, atol=1e-12)
