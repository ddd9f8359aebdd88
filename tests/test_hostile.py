"""Adversarial data against the float64 reference, on every eager backend (hypothesis: fixed seed, fixed budget).

Each example draws a kind of hostile data (an outlier first, sorted, huge, tiny or subnormal,
a constant feature, NaN, features of mixed scales) in float32 or float64 and compares one
normkit function with ``normkit.testing.reference`` on the same (dtype-rounded) values.

The tolerance is ``roundoff.assert_close``'s, derived from float round-off of the case:
(n + 8) * eps * (1 + |want|) + 2 * tiny, n the number of values reduced into one statistic.
The reference is computed in extended precision on ``x - pivot`` (``roundoff.pivot``).

Libraries that flush subnormal numbers to zero in every operation (XLA: jax and TensorFlow) see
subnormal input as zeros; their reference is computed on those zeros. The traced transforms
(jax.jit, tf.function) compile once per drawn shape and are left to the deterministic tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    max_examples=14, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# torch's own kernels (the torch plugin's choice under policy "auto", for torch.nn's numerics) apply
# x * scale + shift with the mean rounded to the dtype: off by eps * |mean| / std, beyond the round-off
# bound wherever the offset dwarfs the spread. Measured: batch norm in float64 at mean 1e4, std 1 up to
# 2e4 * eps * (1 + |z|) (the core: 2); layer norm in float32 at mean 300 * std 9 times the bound.
# Strict: the day the kernels centre first, these pass and the mark must go.
KERNEL_DEVIATIONS = {
    ("test_batch_norm", "torch-kernels"): "torch's batch-norm kernel does not centre first (x * scale + shift)",
    ("test_layer_norm", "torch-kernels"): "torch's layer-norm kernel does not centre first (x * scale + shift)",
}


def pytest_generate_tests(metafunc):
    if "eager_backend" in metafunc.fixturenames:
        params = []
        for name in selected_backends(metafunc.config):
            if name in TRACED:
                continue
            reason = KERNEL_DEVIATIONS.get((metafunc.function.__name__, name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(name, marks=marks, id=name))
        metafunc.parametrize("eager_backend", params, indirect=True)


@pytest.fixture
def eager_backend(request):
    from normkit.plugin.kernels import use_policy

    b = load_backend(request.param)
    with use_policy(b.policy):
        yield b


# ------------------------------------------------------------------------------------------- data


@st.composite
def hostile(draw, shape, use, nan=True):
    """(kind, x as float64 holding dtype-rounded values, dtype) of a hostile kind; ``x``'s axis 0 holds the samples."""
    kinds = KINDS if nan else KINDS[:-1]
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.standard_normal(shape)
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1e4, -1e6]))
    if kind == "normal":
        x = z * 10.0 ** draw(st.integers(-3, 3)) + offset
    elif kind == "outlier_first":  # the first sample far from every other: no shift may trust it
        x = z + 10.0 ** draw(st.integers(2, 6)) * draw(st.sampled_from([1.0, -1.0]))
        x[0] = draw(st.sampled_from([0.0, 1e7, -1e5]))
    elif kind == "sorted":
        x = np.sort(rng.exponential(size=shape), axis=0)[:: draw(st.sampled_from([1, -1]))] + offset
    elif kind == "huge":
        x = z * 10.0 ** draw(st.integers(15, HUGE[use][dtype]))
    elif kind == "tiny":
        x = z * 10.0 ** draw(st.integers(TINY[dtype], TINY[dtype] + 15))
    elif kind == "constant":
        x = z + offset
        x[:, draw(st.integers(0, shape[1] - 1))] = draw(st.sampled_from([0.1, 3.0, -7.25e3, 1e-30]))
    elif kind == "mixed":  # features of very different scales and offsets
        top = 17 if use == "norm" else 30
        scales = 10.0 ** rng.integers(-20, top, size=(1, shape[1]) + (1,) * (len(shape) - 2))
        x = (z + rng.integers(-3, 4, size=scales.shape) * 100) * scales
    else:  # NaN: scattered, and sometimes a whole feature
        x = z * 10.0 ** draw(st.integers(-2, 2)) + offset
        x[rng.uniform(size=shape) < draw(st.sampled_from([0.1, 0.3]))] = np.nan
        if draw(st.booleans()):
            x[:, 0] = np.nan
    return kind, x.astype(dtype).astype(np.float64), dtype


def run(backend, fn, args, kwargs=None):
    return backend.call(fn, tuple(args), kwargs or {})


# --------------------------------------------------------------------------------------- the norms


@HOSTILE
@given(data=hostile((24, 3), "norm"), momentum=st.sampled_from([0.1, 1.0]))
def test_batch_norm(eager_backend, data, momentum):
    b = eager_backend
    kind, x, dtype = data
    rng = np.random.default_rng(0)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    w, bias = rng.uniform(0.5, 1.5, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    out = run(b, nk.batch_norm, [b.asarray(x.astype(dtype)), *(b.asarray(a) for a in (rm, rv, w, bias))],
              dict(training=True, momentum=momentum))
    seen = as_seen(b, x, dtype)
    p = pivot(seen, 0)  # per feature; the running mean moves with it
    y, new_mean, new_var = reference.batch_norm(seen - p, rm - p[0], rv, w, bias, training=True, momentum=momentum)
    new_mean = new_mean + p[0]
    n = x.shape[0]
    assert_close(b.to_numpy(out.output), y, dtype, n, what=f"{kind} output")
    std = np.sqrt(np.var(seen - p, axis=0))
    assert_close(b.to_numpy(out.running_mean), new_mean, dtype, n, what=f"{kind} running_mean",
                 scale=np.abs(new_mean) + std + 1.0)
    with np.errstate(over="ignore"):
        rounded = new_var.astype(dtype).astype(np.float64)  # a variance beyond the dtype's range is inf
    assert_close(b.to_numpy(out.running_var), rounded, dtype, n, what=f"{kind} running_var", scale=np.abs(rounded))


@HOSTILE
@given(data=hostile((6, 4, 5), "norm"), axis=st.sampled_from([-1, (1, 2)]))
def test_layer_norm(eager_backend, data, axis):
    b = eager_backend
    kind, x, dtype = data
    x = np.moveaxis(x, 0, -1)  # the hostile axis becomes a normalized one
    axes = tuple(a % 3 for a in np.atleast_1d(axis))
    pshape = tuple(x.shape[a] for a in axes)
    rng = np.random.default_rng(1)
    w, bias = rng.uniform(0.5, 1.5, pshape).astype(dtype), rng.standard_normal(pshape).astype(dtype)
    y = run(b, nk.layer_norm, [b.asarray(x.astype(dtype)), b.asarray(w), b.asarray(bias)], dict(axis=axis))
    seen = as_seen(b, x, dtype)
    want = reference.layer_norm(seen - pivot(seen, axes), w, bias, axis=axis)
    assert_close(b.to_numpy(y), want, dtype, int(np.prod(pshape)), what=kind)


@HOSTILE
@given(data=hostile((12, 4, 3), "norm"), groups=st.sampled_from([1, 2, 4]))
def test_group_norm(eager_backend, data, groups):
    b = eager_backend
    kind, x, dtype = data
    x = np.swapaxes(x, 0, 2)  # (3, 4, 12): the hostile axis is spatial
    rng = np.random.default_rng(2)
    w, bias = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    y = run(b, nk.group_norm, [b.asarray(x.astype(dtype)), groups, b.asarray(w), b.asarray(bias)])
    seen = as_seen(b, x, dtype)
    grouped = seen.reshape(3, groups, -1)
    shifted = (grouped - pivot(grouped, 2)).reshape(seen.shape)
    want = reference.group_norm(shifted, groups, w, bias)
    assert_close(b.to_numpy(y), want, dtype, (4 // groups) * 12, what=kind)


# --------------------------------------------------------------------------- the fitting functions


@HOSTILE
@given(data=hostile((20, 3), "fit"))
def test_standardize(eager_backend, data):
    b = eager_backend
    kind, x, dtype = data
    z = run(b, nk.standardize, [b.asarray(x.astype(dtype))])
    seen = as_seen(b, x, dtype)
    assert_close(b.to_numpy(z), reference.standardize(seen - pivot(seen, 0)), dtype, x.shape[0], what=kind)


@HOSTILE
@given(data=hostile((20, 3), "fit"), feature_range=st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (2.0, 7.5)]))
def test_min_max_scale(eager_backend, data, feature_range):
    b = eager_backend
    kind, x, dtype = data
    y = run(b, nk.min_max_scale, [b.asarray(x.astype(dtype))], dict(feature_range=feature_range))
    seen = as_seen(b, x, dtype)
    want = reference.min_max_scale(seen - pivot(seen, 0), feature_range=feature_range)
    assert_close(b.to_numpy(y), want, dtype, 0, what=kind, scale=1.0 + np.abs(want) + abs(feature_range[0]))


@HOSTILE
@given(data=hostile((20, 3), "fit"), cuts=st.lists(st.sampled_from([1, 5, 10, 15]), max_size=3, unique=True))
def test_moments_merge(eager_backend, data, cuts):
    """Moments of chunks merged with Chan's formula equal the whole data's (count 0 chunks included).

    The merged variance has one more round-off term: each chunk's mean is rounded to the dtype
    (off by up to eps * |mean| / 2), which moves m2 by up to eps * |mean| * std per value.
    """
    b = eager_backend
    kind, x, dtype = data
    total = None
    with np.errstate(over="ignore"):  # a float32 variance of 1e74 overflows, and numpy says so
        for part in np.split(x, sorted(cuts), axis=0):
            m = nk.Moments.from_array(b.asarray(part.astype(dtype)), axis=-1)
            total = m if total is None else total.merge(m)
        got = {k: b.to_numpy(getattr(total, k)) for k in ("observed", "min", "max", "mean", "var")}
    seen = as_seen(b, x, dtype)
    p = pivot(seen, 0)
    count, mean, var, lo, hi = reference.moments(seen - p, axis=-1)
    shift = np.where(count > 0, p[0], 0.0)  # an all-NaN feature: no pivot, mean 0
    mean, lo, hi = mean + shift, lo + shift, hi + shift
    n = x.shape[0]
    assert total.count == n  # samples, NaN included (an int: the shapes are known)
    np.testing.assert_array_equal(got["observed"], count)
    np.testing.assert_array_equal(got["min"], np.where(count > 0, lo, np.inf).astype(dtype))
    np.testing.assert_array_equal(got["max"], np.where(count > 0, hi, -np.inf).astype(dtype))
    std = np.sqrt(var)
    assert_close(got["mean"], mean, dtype, n, what=f"{kind} mean", scale=np.abs(mean) + std)
    with np.errstate(over="ignore"):
        rounded = var.astype(dtype).astype(np.float64)
    assert_close(got["var"], rounded, dtype, n, what=f"{kind} var",
                 scale=np.abs(rounded) + 2 * np.abs(mean) * std)
