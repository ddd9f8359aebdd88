"""Keras recalibrate, fold and freeze against a hostile user (issue 20): a layer called twice, float32
models merged in float64, NaN, empty and wrong data, shared layers, axes that differ.

Tolerances: float64 statistics rtol 1e-12 (two-pass moments, Chan's merge); a float32 model's
statistics to the float32 rounding of the float64 answer (1 ulp of the mean, 1e-6 relative variance).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import normkit_keras as nkk
from normkit_keras import UnfoldedBatchNormWarning

L = keras.layers


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def randomize(bn, seed=0):
    rng = np.random.default_rng(seed)
    c = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.normal(size=c))
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, size=c))
    bn.gamma.assign(rng.normal(size=c))
    bn.beta.assign(rng.normal(size=c))
    return bn


@pytest.mark.parametrize("cls", [L.BatchNormalization, nkk.BatchNormalization])
def test_recalibrate_merges_every_call_of_a_layer_called_twice(float64, cls):
    bn, dense = cls(), L.Dense(3, kernel_initializer="orthogonal", bias_initializer="ones")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, bn(dense(bn(inputs)) * 3.0))  # one layer, two calls per forward
    randomize(bn)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 3)) * 2 - 1 for n in (4, 7, 5)]
    # both calls' inputs, with the statistics from before recalibration (the pass runs the model as it is)
    second = [np_(dense(bn(x, training=False))) * 3.0 for x in xs]
    seen = np.concatenate(xs + second)
    nkk.recalibrate(model, xs)
    np.testing.assert_allclose(np_(bn.moving_mean), seen.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np_(bn.moving_variance), seen.var(0), rtol=1e-12)


def test_recalibrate_float32_model_merges_in_float64():
    """200 float32 batches at mean 1e4: a float32 merge drifts by many ulps; float64 gives the rounding."""
    model = keras.Sequential([keras.Input((2,)), nkk.BatchNormalization()])
    rng = np.random.default_rng(0)
    xs = [(rng.normal(size=(3, 2)) * 0.5 + 1e4).astype("float32") for _ in range(200)]
    nkk.recalibrate(model, xs)
    a = np.concatenate(xs).astype(np.float64)
    bn = model.layers[0]
    assert np_(bn.moving_mean).dtype == np.float32
    assert np.all(np.abs(np_(bn.moving_mean).astype(np.float64) - a.mean(0)) <= np.spacing(np.float32(1e4)))
    np.testing.assert_allclose(np_(bn.moving_variance).astype(np.float64), a.var(0), rtol=1e-6)


def test_recalibrate_refusals_change_nothing():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization(), L.Dense(3), nkk.BatchNormalization()])
    randomize(model.layers[0])
    before = [np_(v).copy() for v in model.non_trainable_weights]
    good = np.ones((4, 3), "float32") * np.arange(4, dtype="float32")[:, None]
    nan = good.copy()
    nan[1, 2] = np.nan
    name = model.layers[0].name
    with pytest.raises(ValueError, match=rf"the inputs of {name} hold NaN or inf in feature\(s\) \[2\]"):
        nkk.recalibrate(model, [good, nan])
    with pytest.raises(ValueError, match="got no batch.*empty list"):
        nkk.recalibrate(model, [])
    with pytest.raises(TypeError, match="data must be an array or an iterable of batches.*got NoneType"):
        nkk.recalibrate(model, None)
    with pytest.raises(TypeError, match="progress must be True, False or None, got 'yes'"):
        nkk.recalibrate(model, [good], progress="yes")
    with pytest.raises(TypeError, match="recalibrate expects a keras.Model, got str"):
        nkk.recalibrate("model", [good])
    with pytest.raises(Exception):  # a batch the model cannot take: Keras's error, nothing changed
        nkk.recalibrate(model, [good, np.ones((4, 5), "float32")])
    for v, old in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(np_(v), old, err_msg=v.path)


def test_freeze_reaches_a_layer_shared_by_two_models_and_refuses_non_layers():
    bn = nkk.BatchNormalization()
    inner = keras.Sequential([keras.Input((3,)), bn])
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, bn(inner(inputs)))  # the same layer inside the nested model and at the top
    nkk.freeze(outer)
    assert bn.frozen and not bn.trainable and inner.layers[0] is bn
    with pytest.raises(TypeError, match="freeze expects a keras.Model or Layer, got dict"):
        nkk.freeze({})


def test_fold_refuses_dense_then_batch_norm_on_another_axis_and_folds_the_last():
    inputs = keras.Input((4, 4))
    dense = L.Dense(4)
    model = keras.Model(inputs, L.BatchNormalization(axis=1)(dense(inputs)))  # Dense: last axis; BN: axis 1
    with pytest.warns(UnfoldedBatchNormWarning) as record:
        nkk.fold_batch_norm(model)
    (w,) = [r.message for r in record if isinstance(r.message, UnfoldedBatchNormWarning)]
    assert "normalizes axis 1" in w.unfolded[0][1]
    with pytest.raises(TypeError, match="fold_batch_norm expects a keras.Model, got Dense"):
        nkk.fold_batch_norm(dense)
