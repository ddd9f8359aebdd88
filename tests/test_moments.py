"""moments and Moments: shifted two-pass statistics, mergeable with Chan's formula."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import normkit as nk


@pytest.mark.parametrize("axis", [0, (0, 2), -1, None])
@pytest.mark.parametrize("correction", [0, 1])
def test_moments_match_numpy(backend, axis, correction):
    x = np.random.default_rng(0).standard_normal((5, 4, 3)) * 2 + 7
    mean, var = backend.call(nk.moments, (backend.asarray(x),), dict(axis=axis, correction=correction))
    np.testing.assert_allclose(backend.to_numpy(mean), x.mean(axis=axis), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(var), x.var(axis=axis, ddof=correction), rtol=1e-10)


def test_moments_keepdims_and_variance_never_negative(backend):
    x = np.full((1000, 3), 1e4, dtype="float32") + np.float32(0.01) * np.random.default_rng(1).standard_normal((1000, 3)).astype("float32")
    mean, var = backend.call(nk.moments, (backend.asarray(x),), dict(axis=0, keepdims=True))
    var = backend.to_numpy(var)
    assert var.shape == (1, 3) and (var >= 0).all()
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=0, keepdims=True), rtol=0.05)


def _split_merge(x, parts, axis=-1):
    chunks = np.array_split(x, parts, axis=0)
    total = nk.Moments.from_array(chunks[0], axis=axis)
    for c in chunks[1:]:
        total = total.merge(nk.Moments.from_array(c, axis=axis))
    return total


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 60), parts=st.integers(1, 6), offset=st.sampled_from([0.0, 1e3, -1e6]))
def test_merge_equals_whole_data(rows, parts, offset):
    parts = min(parts, rows)
    x = np.random.default_rng(rows).standard_normal((rows, 3)) * 5 + offset
    m = _split_merge(x, parts)
    assert m.count == rows
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m.var, x.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(m.unbiased_var(), x.var(axis=0, ddof=1), rtol=1e-9)
    np.testing.assert_array_equal(m.min, x.min(axis=0))
    np.testing.assert_array_equal(m.max, x.max(axis=0))


def test_from_batches_on_backend(backend):
    x = np.random.default_rng(2).standard_normal((40, 2, 3))
    batches = [backend.asarray(x[i : i + 7]) for i in range(0, 40, 7)]
    m = nk.Moments.from_batches(batches, axis=1)
    np.testing.assert_allclose(backend.to_numpy(m.mean), x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(m.std), x.std(axis=(0, 2)), rtol=1e-10)


def test_merge_refuses_mismatches():
    a = nk.Moments.from_array(np.ones((3, 2)))
    with pytest.raises(ValueError, match="shape"):
        a.merge(nk.Moments.from_array(np.ones((3, 4))))
    with pytest.raises(TypeError, match="Moments"):
        a.merge((1, 2))
    with pytest.raises(ValueError, match="empty"):
        nk.Moments.from_batches([])
