"""Hostile-user cases of issue 20 for the Keras layers, each against the native Keras layer and/or a float64 NumPy
(or scikit-learn) reference, on the process's Keras backend: masks with a feature axis other than the last, output
dtypes under mixed precision, Standardize as a keras.layers.Normalization (weights, tuple axes, tf.data), all-NaN
features, ghost batch norm's partial last batch in model.fit, a bad NORMKIT_KERAS_KERNELS, float64 on JAX without
x64, and the replica merge with an odd number of replicas."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from array_api_compat import numpy as np_xp

import normkit
import normkit_keras as nk
from normkit_keras import _synchronized

BACKEND = keras.backend.backend()
HERE = Path(__file__).parent
F32 = dict(rtol=2e-5, atol=2e-5)


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _run(script: str, env: dict[str, str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python (Keras fixes its backend and JAX its x64 flag per process), bounded."""
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, timeout=timeout,
                          cwd=HERE)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_after_masking_uses_keras_mask_for_any_axis(axis):
    """Masking's (batch, time) mask spans every axis but the last, whatever the BN axis (Keras's rule): with axis=1
    normkit refused it ('does not broadcast'); now outputs and moving statistics equal Keras's."""
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(5, 4, 3)).astype("float32")
    x[:2, 1, :] = 0.0  # a masked time step in two samples (no feature fully masked: see the README)
    masked = keras.layers.Masking()(x)
    ours, native = nk.BatchNormalization(axis=axis, momentum=0.0), keras.layers.BatchNormalization(axis=axis, momentum=0.0)
    y, want = ours(masked, training=True), native(masked, training=True)
    np.testing.assert_allclose(np_(y), np_(want), **F32)
    np.testing.assert_allclose(np_(ours.moving_mean), np_(native.moving_mean), **F32)
    np.testing.assert_allclose(np_(ours.moving_variance), np_(native.moving_variance), **F32)
    keep = np.ones((5, 4, 3), bool)
    keep[:2, 1, :] = False  # float64 reference: the statistics of the unmasked values only
    feature = axis % 3
    other = tuple(i for i in range(3) if i != feature)
    w = keep.astype(np.float64)
    mean = (x * w).sum(other) / w.sum(other)
    shape = [1, 1, 1]
    shape[feature] = -1
    var = (((x - mean.reshape(shape)) ** 2) * w).sum(other) / w.sum(other)
    np.testing.assert_allclose(np_(ours.moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_(ours.moving_variance), var, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- mixed precision


LAYERS = {
    "BatchNormalization": (lambda m: m.BatchNormalization(), {"training": True}),
    "LayerNormalization": (lambda m: m.LayerNormalization(), {}),
    "GroupNormalization": (lambda m: m.GroupNormalization(groups=2), {}),
    "RMSNormalization": (lambda m: m.RMSNormalization(), {}),
    "UnitNormalization": (lambda m: m.UnitNormalization(), {}),
    "Standardize": (lambda m: (m.Standardize if m is nk else m.Normalization)(mean=1.0, variance=4.0), {}),
}


@pytest.mark.parametrize("name", list(LAYERS) + ["MinMaxScale"])
def test_output_dtype_under_mixed_float16_is_keras_s(name):
    """Under mixed_float16 every layer returns float16, as Keras's do (UnitNormalization returned float32)."""
    keras.config.set_dtype_policy("mixed_float16")
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32") * 3 + 1
    if name == "MinMaxScale":
        layer = nk.MinMaxScale()
        layer.adapt(x)
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        np.testing.assert_allclose(np_(y).astype(np.float64), (x - x.min(0)) / (x.max(0) - x.min(0)), atol=2e-3)
        return
    make, call = LAYERS[name]
    ours, native = make(nk), make(keras.layers)
    y, want = ours(x, **call), native(x, **call)
    assert keras.backend.standardize_dtype(y.dtype) == keras.backend.standardize_dtype(want.dtype) == "float16"
    np.testing.assert_allclose(np_(y).astype(np.float32), np_(want).astype(np.float32), rtol=5e-3, atol=5e-3)


# --------------------------------------------------------------------------- Standardize is a Normalization


def test_standardize_is_a_keras_normalization_with_its_weights():
    """Weights mean, variance, count as keras.layers.Normalization's; Keras's weights load into Standardize
    (and back), and both give the same output; layer.mean is Keras's broadcast tensor."""
    x = np.random.default_rng(2).normal(5.0, 2.0, size=(64, 3))
    ours, native = nk.Standardize(), keras.layers.Normalization()
    assert isinstance(ours, keras.layers.Normalization)
    ours.adapt(x), native.adapt(x)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in native.weights] == [
        "mean", "variance", "count"]
    assert tuple(ours.mean.shape) == tuple(native.mean.shape) == (1, 3)
    assert int(np_(ours.count)) == 64
    np.testing.assert_allclose(np_(ours.adapt_mean), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np_(ours.adapt_variance), x.var(0), rtol=1e-6)
    loaded = nk.Standardize()
    loaded.build((None, 3))
    loaded.set_weights(native.get_weights())  # Keras's weights load into normkit's layer
    np.testing.assert_allclose(np_(loaded(x[:5])), np_(native(x[:5])), **F32)
    back = keras.layers.Normalization()
    back.build((None, 3))
    back.set_weights(ours.get_weights())
    back.finalize_state()
    np.testing.assert_allclose(np_(back(x[:5])), np_(ours(x[:5])), **F32)


@pytest.mark.parametrize("axis", [(1, 2), (2,), None, (-1, 1)])
def test_standardize_tuple_axes_equal_float64_reference_and_keras(axis):
    """axis=(1, 2) raised TypeError; now statistics per kept position, equal to a float64 NumPy reference."""
    x = np.random.default_rng(3).normal(1e3, 3.0, size=(40, 4, 3, 2))
    ours, native = nk.Standardize(axis=axis), keras.layers.Normalization(axis=axis)
    ours.adapt([x[:17], x[17:]])  # two batches, merged exactly
    native.adapt(x)
    kept = () if axis is None else tuple(sorted(a % 4 for a in axis))
    reduce = tuple(i for i in range(4) if i not in kept)
    mean, var = x.mean(reduce, keepdims=True), x.var(reduce, keepdims=True)
    assert tuple(ours.mean.shape) == tuple(native.mean.shape) == mean.shape
    np.testing.assert_allclose(np_(ours.adapt_mean).reshape(mean.shape), mean, rtol=1e-7)  # float64, rounded once
    np.testing.assert_allclose(np_(ours.adapt_variance).reshape(var.shape), var, rtol=1e-6)
    x32 = x[:6].astype("float32")
    np.testing.assert_allclose(np_(ours(x32)), (x32 - mean) / np.sqrt(var), rtol=1e-3, atol=1e-3)


def test_standardize_inside_tf_data_map_on_every_backend():
    """ds.map(layer) runs the layer on TensorFlow inside tf.data whatever the Keras backend (failed on jax/torch)."""
    import tensorflow as tf

    x = np.random.default_rng(4).normal(3.0, 2.0, size=(16, 3)).astype("float32")
    adapted, given = nk.Standardize(), nk.Standardize(mean=[0.1, 0.2, 0.3], variance=[0.1, 0.2, 0.3])
    adapted.adapt(x)
    given.build((None, 3))
    for layer in (adapted, given, nk.Standardize(mean=1.0, variance=4.0, invert=True)):
        if not layer.built:
            layer.build((None, 3))
        got = np.concatenate([b.numpy() for b in tf.data.Dataset.from_tensor_slices(x).batch(5).map(layer)])
        np.testing.assert_allclose(got, np_(layer(x)), **F32)


# --------------------------------------------------------------------------- all-NaN features


def test_all_nan_feature_follows_scikit_learn_never_passes_through():
    """A feature with only NaN: scikit-learn stores NaN statistics and outputs NaN; normkit passed new data
    through unscaled (mean 0, variance 1). Now NaN statistics, NaN output, and a warning naming the feature;
    the other features equal StandardScaler / MinMaxScaler."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x = np.random.default_rng(5).normal(2.0, 3.0, size=(30, 3))
    x[:, 1] = np.nan
    x[4, 2] = np.nan  # one missing value: ignored, as scikit-learn
    new = np.random.default_rng(6).normal(size=(4, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want_z = StandardScaler().fit(x).transform(new)
        want_m = MinMaxScaler().fit(x).transform(new)
    for layer, want in ((nk.Standardize(), want_z), (nk.MinMaxScale(), want_m)):
        with pytest.warns(RuntimeWarning, match=r"feature\(s\) \[1\] had only NaN"):
            layer.adapt(x)
        got = np_(layer(new))
        assert np.isnan(got[:, 1]).all() and np.isnan(want[:, 1]).all()
        np.testing.assert_allclose(got[:, [0, 2]], want[:, [0, 2]], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- ghost batch norm, partial last batch


def test_ghost_batch_norm_partial_last_batch_in_fit_names_virtual_batch_size():
    """14 samples, batch_size 8: the last batch has 6, which virtual_batch_size=4 does not divide. On TensorFlow
    fit failed with 'Input to reshape is a tensor with 18 values'; now every backend names both numbers."""
    x = np.random.default_rng(7).normal(size=(14, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), nk.BatchNormalization(virtual_batch_size=4), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(x[:8], x[:8, :1], batch_size=8, epochs=1, verbose=0)  # full batches train
    with pytest.raises(Exception, match=r"(?s)virtual_batch_size=4 must divide the batch size.*\b6\b"):
        model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0)


# --------------------------------------------------------------------------- environment


def test_bad_kernel_environment_variable_is_named_where_used():
    """NORMKIT_KERAS_KERNELS=fused disabled the whole plugin (TensorFlow arrays had no namespace, a misleading
    error later); now the plugin loads, layers raise naming the variable, the allowed values and the value, and
    set_kernel_policy recovers."""
    script = """
import numpy as np, tensorflow as tf, keras, normkit, normkit_keras as nk
x = tf.constant(np.ones((4, 3), "float32"))
assert normkit.plugin.manager.failures() == [], normkit.plugin.manager.failures()
print("NAMESPACE", type(normkit.array_namespace(("x", x))).__name__)
for call in (lambda: nk.BatchNormalization()(x, training=True), nk.get_kernel_policy):
    try:
        call()
        print("NO ERROR")
    except ValueError as e:
        print("ERROR", e)
nk.set_kernel_policy("core")
print("RECOVERED", nk.get_kernel_policy(), tuple(nk.BatchNormalization()(x, training=True).shape))
"""
    done = _run(script, {"NORMKIT_KERAS_KERNELS": "fused", "NORMKIT_STRICT_PLUGINS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "NAMESPACE TensorFlowNamespace" in out, out
    assert out.count("the environment variable NORMKIT_KERAS_KERNELS must be one of ('auto', 'core')") == 2, out
    assert out.count("ERROR") == 2, out
    assert "got 'fused'" in out and "NO ERROR" not in out, out
    assert "RECOVERED core (4, 3)" in out, out


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's x64 flag: the jax backend's run")
def test_float64_layer_on_jax_without_x64_is_named():
    """A float64 layer on JAX without x64 computed float32 with only JAX's generic warnings; as Keras's layers it
    still runs in float32 (a valid input Keras accepts), now with a warning naming the layer and the fix."""
    script = """
import warnings, numpy as np, keras, normkit_keras as nk
x = np.random.default_rng(0).normal(size=(4, 3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours, native = nk.BatchNormalization(dtype="float64"), keras.layers.BatchNormalization(dtype="float64")
    y, want = ours(x, training=True), native(x, training=True)
print("DTYPES", y.dtype, want.dtype, float(np.abs(np.asarray(y) - np.asarray(want)).max()) < 1e-5)
print("WARNED", any("has dtype float64, but on the JAX backend without jax_enable_x64" in str(w.message)
                    and ours.name in str(w.message) for w in caught))
"""
    done = _run(script, {"KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DTYPES float32 float32 True" in done.stdout and "WARNED True" in done.stdout, done.stdout


# --------------------------------------------------------------------------- replica merge


@pytest.mark.parametrize("replicas", [1, 2, 3, 5, 6, 7])
def test_replica_merge_equals_the_whole_batch_for_any_replica_count(replicas):
    """merge_rows (the pairwise tree of every replica's (count, mean, m2), padded with a zero row when odd) equals
    the statistics of the concatenated batch in float64, uneven and empty replicas included."""
    rng = np.random.default_rng(replicas)
    sizes = [int(s) for s in rng.integers(0, 6, size=replicas)]
    sizes[0] += 1  # at least one sample somewhere
    parts = [rng.normal(3.0, 2.0, size=(n, 4)) for n in sizes]
    collective = _synchronized._Collective(replicas, None, np.stack, lambda t: np.concatenate(t, axis=0), lambda t: t)
    rows = np.stack([_synchronized._pack(np_xp, normkit.batch_moments(p, axis=-1, xp=np_xp), np.stack) for p in parts])
    total = _synchronized.merge_rows(np_xp, rows, collective)
    whole = np.concatenate(parts)
    np.testing.assert_allclose(total.count, len(whole))
    np.testing.assert_allclose(total.mean, whole.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.var, whole.var(0), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy: the tensorflow backend's run")
def test_tensorflow_mirrored_strategy_three_replicas_uneven():
    """Three logical CPUs (an odd replica count), an uneven float64 batch: one replica on the whole batch."""
    done = subprocess.run([sys.executable, str(HERE / "synchronized_three_replicas.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "OK three replicas 3" in done.stdout, (done.stdout + done.stderr)[-4000:]
