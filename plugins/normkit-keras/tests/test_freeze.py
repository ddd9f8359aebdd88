"""``freeze`` is permanent for normkit's BatchNormalization (``frozen=True``), on every backend and through save/load.

keras.layers.BatchNormalization can only be given ``trainable=False``, which ``model.trainable = True``
undoes: the tests show both, side by side in one model.
"""

from __future__ import annotations

import keras
import numpy as np

import normkit_keras as nkk

L = keras.layers


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _model():
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, kernel_initializer="zeros"), L.BatchNormalization(),
                              L.Dense(3, kernel_initializer="zeros"), nkk.BatchNormalization(), L.Dense(1)])
    for layer in model.layers:
        for v in layer.weights:
            positive = v.path.split("/")[-1] in ("gamma", "moving_variance")
            v.assign(rng.uniform(0.5, 1.5, size=v.shape) if positive else rng.normal(size=v.shape))
    return model


def _data():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(16, 4)) * 3 + 2).astype("float32"), rng.normal(size=(16, 1)).astype("float32")


def test_freeze_survives_model_trainable_true_fit_and_save(tmp_path):
    model = _model()
    native, ours = model.layers[1], model.layers[3]
    assert nkk.freeze(model) is model
    assert ours.frozen and not ours.trainable and not native.trainable
    model.trainable = False  # Keras's transfer-learning flow: the backbone frozen, then unfrozen to fine-tune
    model.trainable = True
    assert native.trainable  # Keras's own layer: trainable again
    assert ours.frozen and not ours.trainable and ours.trainable_weights == []
    ours.trainable = True
    assert not ours.trainable
    assert {id(v) for v in ours.weights}.isdisjoint(id(v) for v in model.trainable_weights)

    x, y = _data()
    before = [np_(v).copy() for v in ours.weights]
    native_before = np_(native.moving_mean).copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(np_(native.moving_mean), native_before)  # the unfrozen Keras layer trained
    for v, b in zip(ours.weights, before):  # gamma, beta, moving statistics: untouched by fit
        np.testing.assert_array_equal(np_(v), b, err_msg=v.path)
    h = np_(model.layers[2](model.layers[1](model.layers[0](x))))
    np.testing.assert_array_equal(np_(ours(h, training=True)), np_(ours(h, training=False)))  # inference always

    assert ours.get_config()["frozen"] is True
    model.save(tmp_path / "frozen.keras")
    loaded = keras.saving.load_model(tmp_path / "frozen.keras")
    again = loaded.layers[3]
    assert type(again) is nkk.BatchNormalization and again.frozen and not again.trainable
    loaded.trainable = False
    loaded.trainable = True
    assert again.frozen and not again.trainable and loaded.layers[1].trainable
    np.testing.assert_array_equal(np_(again(h, training=True)), np_(ours(h, training=False)))


def test_frozen_is_lifted_explicitly_and_trains_again():
    """``layer.frozen = False`` lifts the lock; then ``trainable = True`` gives batch statistics in training again
    (the check above can fail: an unfrozen layer's training output differs from its inference output)."""
    layer = nkk.BatchNormalization(frozen=True, momentum=0.5)
    x = _data()[0]
    layer.build(x.shape)
    assert not layer.trainable and layer.get_config()["frozen"] is True
    np.testing.assert_array_equal(np_(layer(x, training=True)), np_(layer(x, training=False)))
    layer.frozen = False
    assert not layer.trainable and "frozen" not in layer.get_config()  # lifting the lock changes nothing else
    layer.trainable = True
    assert layer.trainable and len(layer.trainable_weights) == 2
    before = np_(layer.moving_mean).copy()
    assert not np.allclose(np_(layer(x, training=True)), np_(layer(x, training=False)), atol=1e-3)
    assert not np.array_equal(np_(layer.moving_mean), before)
