"""Adversarial inputs to the statistics API (batch_moments, Moments.merge, update_running_stats, normalize,
batch_norm's plain and ghost training) on every eager backend: numpy, array-api-strict, torch, jax, dask.

Every refusal names its argument, what was expected and what came (each test asserts the message); a valid
input gets the float64 NumPy reference's numbers. Found as a hostile user would (issue 20): running statistics
of the wrong shape were broadcast ((1,) came back as (3,), (3, 1) as (3, 3)), a float16 running variance
overflowed to inf (torch.nn stores ~8e3 for the same batch), a momentum given as a NumPy scalar or 0-d array
was never range-checked (running_var went negative), num_batches=0 was a bare ZeroDivisionError.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import normkit as nk
from normkit.plugin.kernels import use_policy
from normkit.testing.pytest_plugin import load_backend

EAGER = ("numpy", "array-api-strict", "torch", "jax", "dask")
FEW = settings(max_examples=12, deadline=None, derandomize=True)
C = 3
# the torch plugin's kernels answer the functional API under "auto": torch runs under both policies
POLICIES = tuple((name, "core") for name in EAGER) + (("torch", "auto"),)


@pytest.fixture(params=EAGER)
def be(request):
    """An eager backend (a missing library fails the run), under the core policy as the matrix runs it."""
    backend = load_backend(request.param)
    with use_policy("core"):
        yield backend


def data(n=8, c=C, seed=0, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).standard_normal((n, c)) * scale + shift


def wrong_shapes():
    """Shapes a per-feature statistic of C features may not have: broadcastable ones first."""
    dims = st.integers(1, 4)
    return st.one_of(st.just((1,)), st.just((C, 1)), st.just((1, C)), st.just(()),
                     st.lists(dims, min_size=1, max_size=3).map(tuple)).filter(lambda s: s != (C,))


# --- running statistics of the wrong shape are refused, never broadcast ----------------------------------

@given(shape=wrong_shapes(), which=st.sampled_from(["running_mean", "running_var"]))
@FEW
def test_update_running_stats_refuses_wrong_shapes(shape, which):
    for name in EAGER:
        b = load_backend(name)
        batch = nk.batch_moments(b.asarray(data()))
        stats = {"running_mean": b.asarray(np.zeros(C)), "running_var": b.asarray(np.ones(C))}
        stats[which] = b.asarray(np.ones(shape))
        with pytest.raises(ValueError, match=rf"{which} must have shape \(3,\) \(one value per feature, as batch.mean\), "
                                             rf"got shape {_re(shape)}"):
            nk.update_running_stats(stats["running_mean"], stats["running_var"], batch)


@given(shape=wrong_shapes(), ghost=st.sampled_from([None, 2, 4]))
@FEW
def test_batch_norm_training_refuses_wrong_running_shapes(shape, ghost):
    """Plain and ghost (virtual_batch_size) training, and inference: the running statistics' shape is checked."""
    for name, policy in POLICIES:
        b = load_backend(name)
        x = b.asarray(data())
        with use_policy(policy):
            with pytest.raises(ValueError, match=rf"running_mean must have shape \(3,\).*got shape {_re(shape)}"):
                nk.batch_norm(x, b.asarray(np.zeros(shape)), b.asarray(np.ones(C)), training=True,
                              virtual_batch_size=ghost)
            with pytest.raises(ValueError, match=rf"running_var must have shape \(3,\).*got shape {_re(shape)}"):
                nk.batch_norm(x, b.asarray(np.zeros(C)), b.asarray(np.ones(shape)), training=ghost is not None,
                              virtual_batch_size=ghost)


def test_moments_of_mismatched_parts_are_refused(be):
    batch = nk.batch_moments(be.asarray(data()))
    bad = nk.Moments(count=batch.count, mean=batch.mean, m2=be.asarray(np.ones(2)))
    with pytest.raises(ValueError, match=r"batch.m2 must have batch.mean's shape \(3,\), got shape \(2,\)"):
        nk.update_running_stats(be.asarray(np.zeros(C)), be.asarray(np.ones(C)), bad)
    with pytest.raises(TypeError, match="batch must be a normkit.Moments .*, got tuple"):
        nk.update_running_stats(be.asarray(np.zeros(C)), be.asarray(np.ones(C)), (batch.mean, batch.m2))
    with pytest.raises(TypeError, match="running_var must be an array, got builtins.list"):
        nk.update_running_stats(be.asarray(np.zeros(C)), [1.0, 1.0, 1.0], batch)
    other = nk.batch_moments(be.asarray(data(c=2)))
    with pytest.raises(ValueError, match=r"cannot merge Moments of shape \(3,\) with Moments of shape \(2,\)"):
        batch.merge(other)


def _re(shape):
    import re

    return re.escape(str(tuple(shape)))


# --- half precision: the running update in float32, one cast at the end ---------------------------------

def _half_backends():
    out = []
    for name in EAGER:
        b = load_backend(name)
        out += [(name, d) for d in b.half_dtypes if d in ("float16", "bfloat16")]
    return out


@pytest.mark.parametrize("name,dtype", _half_backends(), ids=[f"{n}-{d}" for n, d in _half_backends()])
@pytest.mark.parametrize("ghost", [None, 8])
def test_half_running_variance_above_65504_stays_finite(name, dtype, ghost):
    """Batch variance ~7.8e4 (above float16's 65504): running_var = 0.9 * 1 + 0.1 * var is ~7.8e3, as the float64
    reference says and torch.nn stores; the core computed var * 0.1 in float16 and stored inf."""
    b = load_backend(name)
    x64 = data(n=64, scale=280.0, shift=5.0, seed=3)
    xh = b.asarray(x64.astype(np.float16)) if dtype == "float16" else b.xp.astype(b.asarray(x64), b.xp.bfloat16)
    seen = np.asarray(b.to_numpy(b.xp.astype(xh, b.xp.float64)))
    want = 0.9 + 0.1 * seen.var(axis=0, ddof=1)
    rm, rv = b.xp.astype(b.asarray(np.zeros(C)), xh.dtype), b.xp.astype(b.asarray(np.ones(C)), xh.dtype)
    with use_policy("core"):
        out = nk.batch_norm(xh, rm, rv, training=True, virtual_batch_size=ghost)
        direct = nk.update_running_stats(rm, rv, nk.batch_moments(xh))
    for got in (out.running_var, direct[1]):
        assert got.dtype == xh.dtype
        got = np.asarray(b.to_numpy(b.xp.astype(got, b.xp.float64)))
        assert np.isfinite(got).all(), got
        tol = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
        np.testing.assert_allclose(got, want, rtol=tol)
    if name == "torch" and dtype == "float16" and ghost is None:
        import torch

        native = torch.nn.BatchNorm1d(C).half()
        with torch.no_grad():
            native(xh)
        np.testing.assert_allclose(native.running_var.double().numpy(), b.to_numpy(out.running_var).astype(float),
                                   rtol=2.0**-10)


# --- momentum: Python and NumPy numbers and 0-d arrays of any library are range-checked -------------------

BAD_MOMENTA = [1.5, -0.1, 2.0]


@pytest.mark.parametrize("value", BAD_MOMENTA)
def test_momentum_out_of_range_is_refused_whatever_its_kind(be, value):
    batch = nk.batch_moments(be.asarray(data()))
    rm, rv = be.asarray(np.zeros(C)), be.asarray(np.ones(C))
    kinds = {"numpy float32": np.float32(value), "numpy float64": np.float64(value), "python": value}
    for label, m in kinds.items():
        with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\] \(the weight of the new batch\), got {value}"):
            nk.update_running_stats(rm, rv, batch, momentum=m)
    if be.name == "dask":  # lazy: a 0-d dask array is not computed to be checked (documented in momentum_value)
        return
    m = be.asarray(np.asarray(value))
    for call in (lambda: nk.update_running_stats(rm, rv, batch, momentum=m),
                 lambda: nk.batch_norm(be.asarray(data()), rm, rv, training=True, momentum=m),
                 lambda: nk.batch_norm(be.asarray(data()), rm, rv, training=True, momentum=m, virtual_batch_size=4)):
        with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\] .*got a 0-d array holding {value}"):
            call()


def test_momentum_arrays_of_other_shapes_kinds_and_libraries_are_refused(be):
    batch = nk.batch_moments(be.asarray(data()))
    rm, rv = be.asarray(np.zeros(C)), be.asarray(np.ones(C))
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or a 0-d array, got an array of shape \(3,\)"):
        nk.update_running_stats(rm, rv, batch, momentum=be.asarray(np.full(C, 0.1)))
    with pytest.raises(TypeError, match=r"momentum must be a number in \[0, 1\], got bool True"):
        nk.update_running_stats(rm, rv, batch, momentum=np.bool_(True))
    if be.name != "dask":
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\], got a 0-d array holding nan"):
            nk.update_running_stats(rm, rv, batch, momentum=be.asarray(np.asarray(np.nan)))
    if be.name != "numpy":
        with pytest.raises(TypeError, match=r"momentum is a numpy.ndarray but running_mean is a"):
            nk.update_running_stats(rm, rv, batch, momentum=np.asarray(0.1))


@given(m=st.floats(0.0, 1.0))
@settings(max_examples=4, deadline=None, derandomize=True)
def test_valid_momentum_of_any_kind_gives_the_float_result(m):
    x = data(seed=5, shift=2.0)
    want_var = 0.5 * (1 - m) + m * x.var(axis=0, ddof=1)
    for name in EAGER:
        b = load_backend(name)
        batch = nk.batch_moments(b.asarray(x))
        rm, rv = b.asarray(np.zeros(C)), b.asarray(np.full(C, 0.5))
        for given_m in (m, np.float64(m), b.asarray(np.asarray(m))):
            new_mean, new_var = nk.update_running_stats(rm, rv, batch, momentum=given_m)
            np.testing.assert_allclose(np.asarray(b.to_numpy(new_var)), want_var, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(np.asarray(b.to_numpy(new_mean)), m * x.mean(axis=0), rtol=1e-12, atol=1e-15)


def test_traced_momentum_is_accepted_under_jax_jit():
    """A traced momentum cannot be range-checked without breaking jit: it is taken as is (documented)."""
    import jax
    import jax.numpy as jnp

    b = load_backend("jax")
    x = b.asarray(data())
    step = jax.jit(lambda x, m: nk.batch_norm(x, jnp.zeros(C), jnp.ones(C), training=True, momentum=m).running_var)
    eager = nk.batch_norm(x, jnp.zeros(C), jnp.ones(C), training=True, momentum=0.3).running_var
    np.testing.assert_allclose(np.asarray(step(x, jnp.asarray(0.3))), np.asarray(eager), rtol=1e-12)


# --- num_batches (momentum=None, the cumulative average) --------------------------------------------------

@pytest.mark.parametrize("value,kind", [(0, ValueError), (-1, ValueError), (0.5, ValueError), (np.int64(0), ValueError),
                                        (True, TypeError), ("3", TypeError)])
def test_num_batches_below_one_is_refused_by_name(be, value, kind):
    batch = nk.batch_moments(be.asarray(data()))
    rm, rv = be.asarray(np.zeros(C)), be.asarray(np.ones(C))
    pattern = r"num_batches must be a count of batches >= 1 \(this batch included\), got"
    with pytest.raises(kind, match=pattern):
        nk.update_running_stats(rm, rv, batch, momentum=None, num_batches=value)
    with pytest.raises(kind, match=pattern):
        nk.batch_norm(be.asarray(data()), rm, rv, training=True, momentum=None, num_batches=value)
    if be.name != "dask" and kind is ValueError:
        with pytest.raises(ValueError, match=pattern + r" a 0-d array holding"):
            nk.update_running_stats(rm, rv, batch, momentum=None, num_batches=be.asarray(np.asarray(float(value))))
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches"):
        nk.update_running_stats(rm, rv, batch, momentum=None)


def test_num_batches_of_any_numeric_kind_is_the_cumulative_average(be):
    x = data(seed=2)
    batch = nk.batch_moments(be.asarray(x))
    rm, rv = be.asarray(np.zeros(C)), be.asarray(np.ones(C))
    for n in (4, np.int64(4), 4.0, be.asarray(np.asarray(4.0))):
        new_mean, new_var = nk.update_running_stats(rm, rv, batch, momentum=None, num_batches=n)
        np.testing.assert_allclose(np.asarray(be.to_numpy(new_mean)), x.mean(axis=0) / 4, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(be.to_numpy(new_var)), 0.75 + x.var(axis=0, ddof=1) / 4, rtol=1e-12)


# --- batch_moments, Moments.merge, normalize --------------------------------------------------------------

@given(sizes=st.lists(st.integers(0, 5), min_size=2, max_size=4).filter(lambda s: sum(s) >= 2),
       shift=st.sampled_from([0.0, 1e4]))
@settings(max_examples=10, deadline=None, derandomize=True)
def test_merged_parts_are_the_whole_batch(sizes, shift):
    """Moments of consecutive parts (empty ones included: the identity) merge to the whole batch's, on every backend."""
    x = data(n=sum(sizes), seed=sum(sizes), shift=shift)
    for name in EAGER:
        b = load_backend(name)
        total, start = None, 0
        for n in sizes:
            part = x[start:start + n]
            start += n
            if n == 0:
                m = nk.Moments(count=0, mean=b.asarray(np.zeros(C)), m2=b.asarray(np.zeros(C)))
            elif n == 1:
                m = nk.Moments(count=1, mean=b.asarray(part[0]), m2=b.asarray(np.zeros(C)))
            else:
                m = nk.batch_moments(b.asarray(part))
            total = m if total is None else total.merge(m)
        assert total.count == x.shape[0]
        np.testing.assert_allclose(np.asarray(b.to_numpy(total.mean)), x.mean(axis=0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(np.asarray(b.to_numpy(total.m2)), x.var(axis=0) * len(x), rtol=1e-9)


def test_batch_moments_refusals_name_the_argument(be):
    with pytest.raises(ValueError, match=r"batch_moments expects x with a batch axis and a feature axis \(rank >= 2\), got shape \(3,\)"):
        nk.batch_moments(be.asarray(np.ones(3)))
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an input of rank 2 \(expected -2 <= axis < 2\)"):
        nk.batch_moments(be.asarray(data()), axis=2)
    with pytest.raises(TypeError, match="x must have a real floating dtype .*got"):
        nk.batch_moments(be.asarray(np.ones((4, 3), dtype=np.int32)))


@given(shape=wrong_shapes(), which=st.sampled_from(["mean", "var", "weight", "bias"]))
@FEW
def test_normalize_refuses_wrong_parameter_shapes(shape, which):
    for name in EAGER:
        b = load_backend(name)
        args = {"mean": b.asarray(np.zeros(C)), "var": b.asarray(np.ones(C)), "weight": None, "bias": None}
        args[which] = b.asarray(np.ones(shape))
        with pytest.raises(ValueError, match=rf"{which} must have shape \(3,\) \(one value per feature\), got shape {_re(shape)}"):
            nk.normalize(b.asarray(data()), **args)


def test_normalize_refuses_bad_eps(be):
    x = be.asarray(data())
    for eps, pattern in ((-1e-5, r"eps must be >= 0, got -1e-05"), (float("nan"), r"eps must be a non-negative number, got nan"),
                         ("1e-5", r"eps must be a non-negative number, got str '1e-5'")):
        with pytest.raises((ValueError, TypeError), match=pattern):
            nk.normalize(x, be.asarray(np.zeros(C)), be.asarray(np.ones(C)), eps=eps)


# --- ghost batch norm: virtual_batch_size ---------------------------------------------------------------

@given(n=st.integers(2, 12), v=st.integers(1, 14))
@settings(max_examples=15, deadline=None, derandomize=True)
def test_virtual_batch_size_must_divide_the_batch(n, v):
    x = data(n=n, seed=n)
    for name in EAGER:
        b = load_backend(name)
        with use_policy("core"):
            call = lambda: nk.batch_norm(b.asarray(x), b.asarray(np.zeros(C)), b.asarray(np.ones(C)), training=True,  # noqa: E731
                                         virtual_batch_size=v)
            if n % v:
                with pytest.raises(ValueError, match=rf"virtual_batch_size={v} must divide the batch size \(axis 0 of x\), "
                                                     rf"got a batch of {n} samples"):
                    call()
            elif v == 1:
                with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*"
                                                     r"in each virtual batch of 1 \(virtual_batch_size\)"):
                    call()
            else:  # the running statistics do not depend on V: the whole batch's
                _, rm, rv = call()
                np.testing.assert_allclose(np.asarray(b.to_numpy(rm)), 0.1 * x.mean(axis=0), rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(np.asarray(b.to_numpy(rv)), 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("value,kind,pattern", [
    (0, ValueError, "virtual_batch_size must be a positive int .*got 0"),
    (-2, ValueError, "virtual_batch_size must be a positive int .*got -2"),
    (2.0, TypeError, "virtual_batch_size must be an int .*got float 2.0"),
    (True, TypeError, "virtual_batch_size must be an int .*got bool True"),
])
def test_virtual_batch_size_kinds_are_refused_by_name(be, value, kind, pattern):
    with pytest.raises(kind, match=pattern):
        nk.batch_norm(be.asarray(data()), be.asarray(np.zeros(C)), be.asarray(np.ones(C)), training=True,
                      virtual_batch_size=value)
    with pytest.raises(ValueError, match="virtual_batch_size splits axis 0 .* got axis=0"):
        nk.batch_norm(be.asarray(data()), training=True, axis=0, virtual_batch_size=2)


# --- NumPy scalars are numbers: accepted wherever the Python number is -----------------------------------

def test_numpy_scalar_arguments_are_the_python_numbers(be):
    """eps=np.float32(1e-3) was refused as an array ('eps must be a positive number, got float32'); torch.nn
    and NumPy users pass them all the time (a value read from a config array)."""
    x = be.asarray(data(seed=4, shift=3.0))
    rm, rv = be.asarray(np.zeros(C)), be.asarray(np.ones(C))
    eps, m = float(np.float32(1e-3)), float(np.float32(0.25))
    want = nk.batch_norm(x, rm, rv, training=True, eps=eps, momentum=m)
    got = nk.batch_norm(x, rm, rv, training=True, eps=np.float32(1e-3), momentum=np.float32(0.25))
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(be.to_numpy(a)), np.asarray(be.to_numpy(b)))
    batch = nk.batch_moments(x)
    for kwargs in ({"momentum": None, "num_batches": np.int32(2)}, {"correction": np.int64(0)}):
        plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in kwargs.items()}
        for a, b in zip(nk.update_running_stats(rm, rv, batch, **plain), nk.update_running_stats(rm, rv, batch, **kwargs)):
            np.testing.assert_array_equal(np.asarray(be.to_numpy(a)), np.asarray(be.to_numpy(b)))
    y = nk.normalize(x, rm, rv, eps=np.float64(0.0))
    assert np.isfinite(np.asarray(be.to_numpy(y))).all()


@pytest.mark.parametrize("value,kind,pattern", [("1", TypeError, "correction must be a non-negative number, got str '1'"),
                                                (-1, ValueError, "correction must be >= 0, got -1"),
                                                (float("nan"), ValueError, "correction must be a non-negative number, got nan"),
                                                (None, TypeError, "correction must be a non-negative number, got NoneType")])
def test_bad_correction_is_refused_by_name(be, value, kind, pattern):
    batch = nk.batch_moments(be.asarray(data()))
    with pytest.raises(kind, match=pattern):
        nk.update_running_stats(be.asarray(np.zeros(C)), be.asarray(np.ones(C)), batch, correction=value)

