"""standardize and min_max_scale: the seed article's data normalizations, as scikit-learn defines them."""

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference


def _cars(rows=50, seed=0):
    rng = np.random.default_rng(seed)
    age = rng.uniform(0, 30, rows)
    km = rng.uniform(0, 300_000, rows)
    const = np.full(rows, 4.0)
    return np.stack([age, km, const], axis=1)


@pytest.mark.parametrize("fn", ["standardize", "min_max_scale"])
def test_matches_reference_and_constant_feature_is_finite(backend, fn):
    x = _cars()
    y = backend.to_numpy(backend.call(getattr(nk, fn), (backend.asarray(x),), {}))
    np.testing.assert_allclose(y, getattr(reference, fn)(x), rtol=1e-10, atol=1e-12)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, 2], 0.0)  # constant feature -> 0 (z-score) / lower bound (min-max)


def test_standardize_matches_sklearn_convention():
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x = _cars()
    np.testing.assert_allclose(nk.standardize(x), StandardScaler().fit_transform(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nk.min_max_scale(x, feature_range=(-1, 1)),
                               MinMaxScaler((-1, 1)).fit_transform(x), rtol=1e-10, atol=1e-12)


def test_fitted_statistics_apply_to_new_data(backend):
    train, test = _cars(seed=1), _cars(seed=2)
    m = nk.Moments.from_array(backend.asarray(train), axis=-1)
    z = backend.to_numpy(nk.standardize(backend.asarray(test), mean=m.mean, std=m.std))
    mm = backend.to_numpy(nk.min_max_scale(backend.asarray(test), data_min=m.min, data_max=m.max))
    std = np.where(train.std(0) == 0, 1, train.std(0))
    np.testing.assert_allclose(z, (test - train.mean(0)) / std, rtol=1e-10, atol=1e-12)
    span = np.where(train.max(0) == train.min(0), 1, train.max(0) - train.min(0))
    np.testing.assert_allclose(mm, (test - train.min(0)) / span, rtol=1e-10, atol=1e-12)


def test_channel_axis_and_errors():
    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    np.testing.assert_allclose(nk.standardize(x, axis=1), reference.standardize(x, axis=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="feature_range"):
        nk.min_max_scale(x, feature_range=(1, 0))
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)"):
        nk.standardize(x, mean=np.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        nk.standardize(np.arange(6).reshape(2, 3))
