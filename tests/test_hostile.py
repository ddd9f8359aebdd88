"""Adversarial data against the float64 reference, on every eager backend (hypothesis: fixed seed, fixed budget).

Every example holds every kind of hostile data at once, one kind per statistic (a feature for
batch norm and the fitting functions, a sample for layer norm, a sample's channels for group
norm): an outlier first, sorted, huge, tiny or subnormal, constant, of mixed scales, NaN-bearing.
Hypothesis draws each kind's magnitudes, offsets and values; dtype is a parameter, so both float32
and float64 meet every kind in every test.

The tolerance is ``roundoff.assert_close``'s, derived from float round-off of the case:
(n + 8) * eps * (1 + |want|) + 2 * tiny, n the number of values reduced into one statistic.
The reference is computed in extended precision on ``x - pivot`` (``roundoff.pivot``).

Libraries that flush subnormal numbers to zero in every operation (XLA: jax and TensorFlow) see
subnormal input as zeros; their reference is computed on those zeros. The traced transforms
(jax.jit, tf.function) compile once per call and are left to the deterministic tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import normkit as nk
from normkit.testing import reference
from normkit.testing.pytest_plugin import load_backend, selected_backends
from roundoff import as_seen, assert_close, pivot

TRACED = ("jax-jit", "tensorflow-function")
KINDS = ("normal", "outlier_first", "sorted", "huge", "tiny", "constant", "mixed", "nan")
# float32 squares overflow beyond sqrt(3.4e38) = 1.8e19: the norms (which square unscaled, as torch.nn
# and Keras do) are drawn below it; the fitting functions scale by a power of two and take every value
HUGE = {"norm": {"float32": 17, "float64": 150}, "fit": {"float32": 37, "float64": 150}}
TINY = {"float32": -45, "float64": -150}  # float64 squares underflow below 1e-154: its subnormals are in test_robustness

HOSTILE = settings(
    max_examples=7, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = pytest.mark.parametrize("dtype", ["float32", "float64"])

# torch's own kernels (the torch plugin's choice under policy "auto", for torch.nn's numerics) apply
# x * scale + shift with the mean rounded to the dtype: off by about eps * |mean| / std per unit of
# output, beyond the centred bound wherever the offset dwarfs the spread (measured: batch norm in
# float64 at mean 1e4, std 1 up to 2e4 * eps * (1 + |z|), the core 2; layer and group norm 3 to 70
# times the centred bound). Under policy auto the norms are held to that uncentred bound instead:
# scale (1 + |want|) * (1 + |mean| / std) per statistic (eps of the norm where std is 0).


def _scale(b, want, seen, axes, eps):
    """The tolerance's scale: 1 + |want|, times (1 + |mean| / std) where a kernel may not centre first."""
    base = 1.0 + np.abs(want)
    if b.policy != "auto":
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(seen, axis=axes, keepdims=True)
        std = np.sqrt(np.nanvar(seen, axis=axes, keepdims=True) + eps)
        ratio = np.where(np.isfinite(mean / std), np.abs(mean) / std, 0.0)
    return (base * (1.0 + ratio)).astype(np.float64)


def pytest_generate_tests(metafunc):
    if "eager_backend" in metafunc.fixturenames:
        names = [n for n in selected_backends(metafunc.config) if n not in TRACED]
        metafunc.parametrize("eager_backend", names, indirect=True)


@pytest.fixture
def eager_backend(request):
    from normkit.plugin.kernels import use_policy

    b = load_backend(request.param)
    with use_policy(b.policy):
        yield b


# ------------------------------------------------------------------------------------------- data


def _column(draw, kind, n, dtype, use, rng):
    """``n`` values of one statistic, of one hostile kind."""
    z = rng.standard_normal(n)
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1e4, -1e6]))
    if kind == "normal":
        return z * 10.0 ** draw(st.integers(-3, 3)) + offset
    if kind == "outlier_first":  # the first value far from every other: no shift may trust it
        x = z + 10.0 ** draw(st.integers(2, 6)) * draw(st.sampled_from([1.0, -1.0]))
        x[0] = draw(st.sampled_from([0.0, 1e7, -1e5]))
        return x
    if kind == "sorted":
        return np.sort(rng.exponential(size=n) * 10.0 ** draw(st.integers(-2, 3)))[:: draw(st.sampled_from([1, -1]))] + offset
    if kind == "huge":
        return z * 10.0 ** draw(st.integers(15, HUGE[use][dtype]))
    if kind == "tiny":
        return z * 10.0 ** draw(st.integers(TINY[dtype], TINY[dtype] + 15))
    if kind == "constant":
        return np.full(n, draw(st.sampled_from([0.0, 0.1, 3.0, -7.25e3, 1e-30])))
    if kind == "mixed":  # values of very different scales in one statistic
        return z * 10.0 ** rng.integers(-20, 17 if use == "norm" else 30, size=n)
    x = z * 10.0 ** draw(st.integers(-2, 2)) + offset  # NaN: scattered, or every value
    x[rng.uniform(size=n) < draw(st.sampled_from([0.1, 0.3, 1.0]))] = np.nan
    return x


@st.composite
def hostile(draw, n, use, dtype):
    """(n, 8) values rounded to ``dtype`` (held in float64): column j holds n values of kind ``KINDS[j]``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.stack([_column(draw, kind, n, dtype, use, rng) for kind in KINDS], axis=1)
    return x.astype(dtype).astype(np.float64)


def run(backend, fn, args, kwargs=None):
    return backend.call(fn, tuple(args), kwargs or {})


# --------------------------------------------------------------------------------------- the norms


@DTYPES
@HOSTILE
@given(data=st.data(), momentum=st.sampled_from([0.1, 1.0]))
def test_batch_norm(eager_backend, dtype, data, momentum):
    """Features are the kinds: x of shape (24, 8), feature axis 1."""
    b = eager_backend
    x = data.draw(hostile(24, "norm", dtype))
    rng = np.random.default_rng(0)
    rm, rv = rng.standard_normal(8).astype(dtype), rng.uniform(0.5, 2, 8).astype(dtype)
    w, bias = rng.uniform(0.5, 1.5, 8).astype(dtype), rng.standard_normal(8).astype(dtype)
    out = run(b, nk.batch_norm, [b.asarray(x.astype(dtype)), *(b.asarray(a) for a in (rm, rv, w, bias))],
              dict(training=True, momentum=momentum))
    seen = as_seen(b, x, dtype)
    p = pivot(seen, 0)  # per feature; the running mean moves with it
    y, new_mean, new_var = reference.batch_norm(seen - p, rm - p[0], rv, w, bias, training=True, momentum=momentum)
    new_mean = new_mean + p[0]
    assert_close(b.to_numpy(out.output), y, dtype, 24, what="output", kinds=KINDS,
                 scale=_scale(b, y, seen.astype(np.float64), 0, 1e-5))
    std = np.sqrt(np.var(seen - p, axis=0))
    assert_close(b.to_numpy(out.running_mean), new_mean, dtype, 24, what="running_mean",
                 scale=np.abs(new_mean) + std + 1.0, kinds=KINDS)
    with np.errstate(over="ignore"):
        rounded = new_var.astype(dtype).astype(np.float64)  # a variance beyond the dtype's range is inf
    var_scale = np.abs(rounded)
    if b.policy == "auto":  # the kernel's batch variance comes from data it did not centre exactly
        mean = np.abs(np.nanmean(seen.astype(np.float64), axis=0))
        var_scale = var_scale + mean * (std.astype(np.float64).reshape(-1) + float(np.finfo(dtype).eps) * mean)
    assert_close(b.to_numpy(out.running_var), rounded, dtype, 24, what="running_var", scale=var_scale, kinds=KINDS)


@DTYPES
@HOSTILE
@given(data=st.data(), axis=st.sampled_from([-1, (1, 2)]))
def test_layer_norm(eager_backend, dtype, data, axis):
    """Samples are the kinds: x of shape (8, 4, 5), normalized over the last axis or the last two."""
    b = eager_backend
    x = data.draw(hostile(20, "norm", dtype)).T.reshape(8, 4, 5)
    axes = tuple(a % 3 for a in np.atleast_1d(axis))
    pshape = tuple(x.shape[a] for a in axes)
    rng = np.random.default_rng(1)
    w, bias = rng.uniform(0.5, 1.5, pshape).astype(dtype), rng.standard_normal(pshape).astype(dtype)
    y = run(b, nk.layer_norm, [b.asarray(x.astype(dtype)), b.asarray(w), b.asarray(bias)], dict(axis=axis))
    seen = as_seen(b, x, dtype)
    want = reference.layer_norm(seen - pivot(seen, axes), w, bias, axis=axis)
    assert_close(b.to_numpy(y), want, dtype, int(np.prod(pshape)), kinds=KINDS, kind_axis=0,
                 scale=_scale(b, want, seen.astype(np.float64), axes, 1e-5))


@DTYPES
@HOSTILE
@given(data=st.data(), groups=st.sampled_from([1, 2, 4]))
def test_group_norm(eager_backend, dtype, data, groups):
    """Samples are the kinds: x of shape (8, 4, 6), channel axis 1; a group holds (4 / groups) * 6 values."""
    b = eager_backend
    x = data.draw(hostile(24, "norm", dtype)).T.reshape(8, 4, 6)
    rng = np.random.default_rng(2)
    w, bias = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    y = run(b, nk.group_norm, [b.asarray(x.astype(dtype)), groups, b.asarray(w), b.asarray(bias)])
    seen = as_seen(b, x, dtype)
    grouped = seen.reshape(8, groups, -1)
    want = reference.group_norm((grouped - pivot(grouped, 2)).reshape(seen.shape), groups, w, bias)
    scale = _scale(b, want.reshape(8, groups, -1), grouped.astype(np.float64), 2, 1e-5)
    assert_close(b.to_numpy(y), want, dtype, (4 // groups) * 6, kinds=KINDS, kind_axis=0,
                 scale=None if scale is None else scale.reshape(want.shape))


# --------------------------------------------------------------------------- the fitting functions


@DTYPES
@HOSTILE
@given(data=st.data())
def test_standardize(eager_backend, dtype, data):
    b = eager_backend
    x = data.draw(hostile(20, "fit", dtype))
    z = run(b, nk.standardize, [b.asarray(x.astype(dtype))])
    seen = as_seen(b, x, dtype)
    assert_close(b.to_numpy(z), reference.standardize(seen - pivot(seen, 0)), dtype, 20, kinds=KINDS)


@DTYPES
@HOSTILE
@given(data=st.data(), feature_range=st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (2.0, 7.5)]))
def test_min_max_scale(eager_backend, dtype, data, feature_range):
    b = eager_backend
    x = data.draw(hostile(20, "fit", dtype))
    y = run(b, nk.min_max_scale, [b.asarray(x.astype(dtype))], dict(feature_range=feature_range))
    seen = as_seen(b, x, dtype)
    want = reference.min_max_scale(seen - pivot(seen, 0), feature_range=feature_range)
    assert_close(b.to_numpy(y), want, dtype, 0, scale=1.0 + np.abs(want) + abs(feature_range[0]), kinds=KINDS)


@DTYPES
@HOSTILE
@given(data=st.data(), cuts=st.lists(st.sampled_from([1, 5, 10, 15]), max_size=3, unique=True))
def test_moments_merge(eager_backend, dtype, data, cuts):
    """Moments of chunks merged with Chan's formula equal the whole data's (chunks with nothing observed included).

    The merged variance has one more round-off term: each chunk's mean is rounded to the dtype
    (off by up to eps * |mean| / 2), which moves m2 by up to eps * |mean| * std per value.
    """
    b = eager_backend
    x = data.draw(hostile(20, "fit", dtype))
    total = None
    with np.errstate(over="ignore"):  # a float32 variance of 1e74 overflows, and numpy says so
        for part in np.split(x, sorted(cuts), axis=0):
            m = nk.Moments.from_array(b.asarray(part.astype(dtype)), axis=-1)
            total = m if total is None else total.merge(m)
        got = {k: b.to_numpy(getattr(total, k)) for k in ("observed", "min", "max", "mean", "var")}
    seen = as_seen(b, x, dtype)
    p = pivot(seen, 0)
    count, _, _, lo, hi = reference.moments(seen, axis=-1)
    _, mean, var, _, _ = reference.moments(seen - p, axis=-1)
    mean = mean + np.where(count > 0, p[0], 0.0)  # an all-NaN feature: no pivot, mean 0
    assert total.count == 20  # samples, NaN included (an int: the shapes are known)
    np.testing.assert_array_equal(got["observed"], count)
    np.testing.assert_array_equal(got["min"], lo.astype(dtype))
    np.testing.assert_array_equal(got["max"], hi.astype(dtype))
    std = np.sqrt(var)
    assert_close(got["mean"], mean, dtype, 20, what="mean", scale=np.abs(mean) + std, kinds=KINDS)
    with np.errstate(over="ignore"):  # Moments holds m2 = count * var: where that overflows, var is inf
        fits = np.isfinite((var * count).astype(dtype))
        rounded = np.where(fits, var.astype(dtype).astype(np.float64), np.inf)
    assert_close(got["var"], rounded, dtype, 20, what="var", scale=np.abs(rounded) + 2 * np.abs(mean) * std, kinds=KINDS)
