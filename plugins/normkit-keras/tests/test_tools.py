"""The batch-norm tools on every Keras backend: fold_batch_norm, freeze, recalibrate.

Tolerances. Folded models are compared in float64 with a float64 NumPy reference (batch norm in
NumPy, convolutions by the model's own layers): a few roundings of sums of at most 3*3*12 = 108
products, < 1e-13 relative; the spec's 1e-10 leaves a 1000x margin. Recalibrated statistics: two-pass
moments and Chan's merge in float64 over a few thousand values: rtol 1e-12.

Keras's own BatchNormalization computes in float32 on the jax and torch backends even for float64
input (``result_type(x, "float32")`` is float32 there), so float64 comparisons of whole models
use normkit_keras.BatchNormalization where the original model's output is the reference.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import normkit_keras as nkk
from normkit_keras import UnfoldedBatchNormWarning

BACKEND = keras.backend.backend()
L = keras.layers
BN_CLASSES = (L.BatchNormalization, nkk.BatchNormalization)


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def randomize_bn(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, BN_CLASSES):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, size=c))
            if layer.scale:
                layer.gamma.assign(1 + rng.normal(size=c))
            if layer.center:
                layer.beta.assign(rng.normal(size=c))
    return model


def randomize_weights(model, seed: int = 1):
    """Random kernels and biases (assigned from NumPy: layers are built with constant initializers,
    as JAX compiles every random initializer anew per shape, seconds per model)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if not isinstance(layer, BN_CLASSES):
            for v in layer.trainable_weights:
                v.assign(rng.normal(size=v.shape) * 0.5)
    return randomize_bn(model, seed)


Z = dict(kernel_initializer="zeros")  # kernels come from randomize_weights
ZD = dict(depthwise_initializer="zeros")
ZS = dict(depthwise_initializer="zeros", pointwise_initializer="zeros")


def numpy_bn(h: np.ndarray, bn) -> np.ndarray:
    """Inference batch norm in float64 NumPy."""
    shape = [1] * h.ndim
    shape[bn.axis] = -1
    c = h.shape[bn.axis]
    gamma = np_(bn.gamma) if bn.scale else np.ones(c)
    beta = np_(bn.beta) if bn.center else np.zeros(c)
    scale = gamma / np.sqrt(np_(bn.moving_variance) + bn.epsilon)
    return (h - np_(bn.moving_mean).reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


def sequential_reference(model, x: np.ndarray) -> np.ndarray:
    h = x
    for layer in model.layers:
        h = numpy_bn(h, layer) if isinstance(layer, BN_CLASSES) else np_(layer(h, training=False))
    return h


def fold_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfoldedBatchNormWarning)
        return nkk.fold_batch_norm(model)


def fold_with_report(model):
    with pytest.warns(UnfoldedBatchNormWarning) as record:
        folded = nkk.fold_batch_norm(model)
    (w,) = [r.message for r in record if isinstance(r.message, UnfoldedBatchNormWarning)]
    return folded, dict(w.unfolded)


def rel_err(a, b) -> float:
    a, b = np_(a).astype(np.float64), np_(b).astype(np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------------- fold


def test_fold_sequential_every_layer_kind_matches_float64_reference(float64):
    model = randomize_weights(keras.Sequential([
        keras.Input((7, 7, 3)),
        L.Conv2D(6, 3, use_bias=False, **Z), L.BatchNormalization(), L.ReLU(),
        L.DepthwiseConv2D(3, depth_multiplier=2, **ZD), nkk.BatchNormalization(),
        L.SeparableConv2D(5, 3, padding="same", **ZS), L.BatchNormalization(center=False),
        L.Reshape((3 * 3, 5)), L.Conv1D(4, 2, **Z), nkk.BatchNormalization(scale=False),
    ]))
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3))
    expected = sequential_reference(model, x)
    weights_before = [np_(w).copy() for w in model.weights]
    folded = fold_quietly(model)
    assert folded is not model
    assert [type(l).__name__ for l in folded.layers] == [
        "Conv2D", "ReLU", "DepthwiseConv2D", "SeparableConv2D", "Reshape", "Conv1D"]
    assert all(l.use_bias for l in folded.layers if hasattr(l, "use_bias"))
    assert rel_err(folded(x), expected) < 1e-10
    assert all(np.array_equal(np_(w), b) for w, b in zip(model.weights, weights_before))  # original untouched


def test_fold_dense(float64):
    """Dense folds too. Keras's torch backend computes matmul in float32 even for float64 (its
    result_type maps float64 to float32), so there the bound is float32 round-off: 8 eps32 relative."""
    model = randomize_weights(keras.Sequential([keras.Input((3, 5)), L.Dense(4, **Z), L.BatchNormalization()]))
    x = np.random.default_rng(0).normal(size=(2, 3, 5))
    folded = fold_quietly(model)
    assert [type(l).__name__ for l in folded.layers] == ["Dense"]
    bound = 8 * float(np.finfo(np.float32).eps) if BACKEND == "torch" else 1e-10
    assert rel_err(folded(x), sequential_reference(model, x)) < bound


def test_fold_functional_nested_and_what_stays(float64):
    inputs = keras.Input((4, 4, 2))
    a = L.Conv2D(4, 3, padding="same", name="conv_a", **Z)(inputs)
    h = nkk.BatchNormalization(name="bn_a")(a)  # folds
    c = L.Conv2D(4, 1, name="conv_c", **Z)(h)
    h = L.Add()([nkk.BatchNormalization(name="bn_c")(c), c])  # conv_c's output has two consumers: stays
    h = nkk.BatchNormalization(name="bn_relu")(L.ReLU()(h))  # no conv before it: stays
    d = L.Conv2D(3, 1, activation="relu", name="conv_d", **Z)(h)
    h = nkk.BatchNormalization(name="bn_d")(d)  # after an activation: stays
    head = keras.Sequential([L.GlobalAveragePooling2D(), L.Reshape((1, 3)),
                             L.Conv1D(5, 1, **Z), nkk.BatchNormalization()], name="head")
    model = randomize_weights(keras.Model(inputs, head(h)))
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 2))
    expected = model(x)
    folded, unfolded = fold_with_report(model)
    p = model.name
    assert set(unfolded) == {f"{p}/bn_c", f"{p}/bn_relu", f"{p}/bn_d"}
    assert "other consumers" in unfolded[f"{p}/bn_c"]
    assert "activation" in unfolded[f"{p}/bn_d"]
    names = {l.name for l in folded.layers}
    assert "bn_a" not in names and {"bn_c", "bn_relu", "bn_d"} <= names
    assert not any(isinstance(l, BN_CLASSES) for l in folded.get_layer("head").layers)
    assert rel_err(folded(x), expected) < 1e-10


def test_fold_channels_first_and_axis_mismatch(float64):
    model = randomize_weights(keras.Sequential([
        keras.Input((3, 6, 6)),
        L.Conv2D(4, 3, data_format="channels_first", **Z), L.BatchNormalization(axis=1),
    ]))
    conv, bn = model.layers
    folded = fold_quietly(model)
    (new,) = folded.layers
    scale = np_(bn.gamma) / np.sqrt(np_(bn.moving_variance) + bn.epsilon)
    np.testing.assert_allclose(np_(new.kernel), np_(conv.kernel) * scale, rtol=1e-14)
    np.testing.assert_allclose(np_(new.bias), (np_(conv.bias) - np_(bn.moving_mean)) * scale + np_(bn.beta),
                               rtol=1e-13, atol=1e-15)
    if BACKEND != "tensorflow":  # TensorFlow's CPU convolution has no channels_first kernel
        x = np.random.default_rng(2).normal(size=(2, 3, 6, 6))
        assert rel_err(folded(x), sequential_reference(model, x)) < 1e-10
    mismatch = keras.Sequential([keras.Input((5, 4)), L.Dense(3, **Z), L.BatchNormalization(axis=1)])
    _, unfolded = fold_with_report(mismatch)
    assert "normalizes axis 1" in unfolded[f"{mismatch.name}/{mismatch.layers[1].name}"]


def test_fold_rejects_a_subclassed_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.bn = L.Dense(2, **Z), L.BatchNormalization()

        def call(self, x):
            return self.bn(self.dense(x))

    model = Sub()
    model(np.zeros((1, 3)))
    with pytest.raises(TypeError, match="subclassed"):
        nkk.fold_batch_norm(model)


# --------------------------------------------------------------------------------------------------- freeze


def test_freeze_is_inference_in_fit_and_after_save_and_load(tmp_path):
    model = randomize_weights(keras.Sequential([
        keras.Input((4,)), L.Dense(3, **Z), L.BatchNormalization(), L.Dense(3, **Z), nkk.BatchNormalization(),
        L.Dense(1, **Z),
    ]))
    out = nkk.freeze(model)
    assert out is model and all(not l.trainable for l in model.layers if isinstance(l, BN_CLASSES))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32") * 3 + 2
    y = np.random.default_rng(1).normal(size=(16, 1)).astype("float32")
    bn_values = [np_(w).copy() for l in model.layers if isinstance(l, BN_CLASSES) for w in l.weights]
    np.testing.assert_array_equal(np_(model(x, training=True)), np_(model(x, training=False)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    dense_before = np_(model.layers[0].kernel).copy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(np_(model.layers[0].kernel), dense_before)  # training happened
    after = [np_(w) for l in model.layers if isinstance(l, BN_CLASSES) for w in l.weights]
    assert all(np.array_equal(a, b) for a, b in zip(after, bn_values))  # statistics and gamma/beta untouched
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_bns = [l for l in loaded.layers if isinstance(l, BN_CLASSES)]
    assert len(loaded_bns) == 2 and all(not l.trainable for l in loaded_bns)
    np.testing.assert_allclose(np_(loaded(x, training=True)), np_(model(x, training=False)), rtol=1e-6, atol=1e-6)


def test_unfrozen_batch_norm_does_train():
    """The check above can fail: without freeze, training=True normalizes by the batch and updates statistics."""
    model = randomize_weights(keras.Sequential([keras.Input((4,)), L.Dense(3, **Z), nkk.BatchNormalization()]))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32") * 3 + 2
    before = np_(model.layers[1].moving_mean).copy()
    assert not np.allclose(np_(model(x, training=True)), np_(model(x, training=False)))
    assert not np.array_equal(np_(model.layers[1].moving_mean), before)


# ---------------------------------------------------------------------------------------------- recalibrate


def bn_inputs_sequential(model, x: np.ndarray) -> list[tuple]:
    """(layer, its input) for every batch norm of a Sequential model, in one inference pass."""
    out, h = [], x
    for layer in model.layers:
        if isinstance(layer, BN_CLASSES):
            out.append((layer, np_(h).astype(np.float64)))
        h = layer(h, training=False)
    return out


def test_recalibrate_gives_float64_population_statistics(float64):
    model = randomize_weights(keras.Sequential([
        keras.Input((5, 5, 2)), L.Conv2D(4, 3, **Z), L.BatchNormalization(), L.ReLU(), L.Dropout(0.5),
        nkk.BatchNormalization(momentum=0.5), L.BatchNormalization(renorm=True),
        L.Flatten(), L.Dense(3, **Z), nkk.BatchNormalization(),
    ]), seed=3)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 5, 5, 2)) * 2 + 1 for n in (4, 2, 4)]
    out = nkk.recalibrate(model, [(x, np.zeros(len(x))) for x in xs], steps=2, progress=False)
    assert out is model and model.layers[4].momentum == 0.5
    per_batch = [bn_inputs_sequential(model, x) for x in xs[:2]]  # the recalibrated model's activations
    assert len(per_batch[0]) == 4
    for i, (layer, _) in enumerate(per_batch[0]):
        a = np.concatenate([seen[i][1] for seen in per_batch])
        axes = tuple(range(a.ndim - 1))
        np.testing.assert_allclose(np_(layer.moving_mean), a.mean(axes), rtol=1e-12, atol=1e-14, err_msg=layer.name)
        np.testing.assert_allclose(np_(layer.moving_variance), a.var(axes), rtol=1e-12, atol=1e-14, err_msg=layer.name)
        if getattr(layer, "renorm", False):
            np.testing.assert_allclose(np_(layer.moving_stddev), np.sqrt(a.var(axes) + layer.epsilon), rtol=1e-12)


def test_recalibrate_excludes_masked_positions_and_takes_arrays(float64):
    inputs = keras.Input((7,), dtype="int32")
    h = L.Embedding(10, 3, mask_zero=True, embeddings_initializer="zeros")(inputs)
    model = randomize_weights(keras.Model(inputs, nkk.BatchNormalization()(h)))
    tokens = np.random.default_rng(0).integers(0, 10, size=(20, 7)).astype("int32")
    nkk.recalibrate(model, tokens, batch_size=6)
    table = np_(model.layers[1].embeddings).astype(np.float64)
    kept = table[tokens[tokens != 0]]
    bn = model.layers[2]
    np.testing.assert_allclose(np_(bn.moving_mean), kept.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np_(bn.moving_variance), kept.var(0), rtol=1e-12)
    assert not np.allclose(np_(bn.moving_mean), table[tokens].reshape(-1, 3).mean(0))  # the mask mattered


def test_recalibrate_generator_steps_progress_and_errors(capsys):
    model = randomize_weights(keras.Sequential([keras.Input((3,)), L.Dense(2, **Z), L.BatchNormalization()]))
    data = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
    nkk.recalibrate(model, (data[i:i + 4] for i in range(0, 12, 4)), steps=2)
    h = np_(model.layers[0](data[:8])).astype(np.float64)
    np.testing.assert_allclose(np_(model.layers[1].moving_variance), h.var(0), rtol=1e-5)  # float32 layer
    assert capsys.readouterr().out == ""
    nkk.recalibrate(model, [data], progress=True)
    assert "1/1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="steps"):
        nkk.recalibrate(model, [data], steps=0)
    with pytest.raises(ValueError, match="no batch"):
        nkk.recalibrate(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        nkk.recalibrate(model, [data], batch_size=4)
