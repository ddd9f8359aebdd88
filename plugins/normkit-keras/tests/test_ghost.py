"""Ghost batch norm in ``normkit_keras.BatchNormalization(virtual_batch_size=V)``, on this process's Keras backend.

Judged against ``normkit.testing.reference.ghost_batch_norm`` (float64 NumPy: each run of V consecutive
samples batch-normalized alone; the moving statistics updated once per step with the whole batch's,
Keras's biased variance). float64 layers (every backend computes them in float64): rtol 1e-10 / atol
1e-12 is 1e4x the round-off of sums of at most 60 values; float32 layers under both kernel policies
use ``f32_tol`` (conftest: sqrt(n) * eps growth), which proves the kernels step aside for virtual batches.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import normkit_keras as nk
from conftest import f32_tol
from normkit.testing import reference

TIGHT = dict(rtol=1e-10, atol=1e-12)
CASES = [  # (id, input shape, axis, virtual batch size)
    ("dense", (12, 5), -1, 4),
    ("images", (6, 4, 5, 3), -1, 3),
    ("channels_first", (8, 3, 4), 1, 2),
]


def np_(a):
    return np.asarray(keras.ops.convert_to_numpy(a))


def data(shape, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-4, 4, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    return (rng.standard_normal(shape) * 2.0 + offsets).astype(dtype)  # every sample its own offset


def randomized(layer, shape, dtype):
    layer.build((None,) + shape[1:])
    rng = np.random.default_rng(5)
    for v in layer.weights:
        name = v.path.split("/")[-1]
        c = tuple(v.shape)
        value = {"gamma": rng.uniform(0.5, 2.0, c), "beta": rng.standard_normal(c),
                 "moving_mean": rng.standard_normal(c), "moving_variance": rng.uniform(0.5, 2.0, c)}[name]
        v.assign(value.astype(dtype))
    return layer


def steps_against_reference(layer, shape, axis, v, dtype, tol):
    state = {w.path.split("/")[-1]: np_(w).astype(np.float64) for w in layer.weights}
    mean, var = state["moving_mean"], state["moving_variance"]
    for step in range(3):
        x = data(shape, seed=step, dtype=dtype)
        y = layer(x, training=True)
        want, mean, var = reference.ghost_batch_norm(
            x, mean, var, state["gamma"], state["beta"], virtual_batch_size=v, momentum=1 - layer.momentum,
            eps=layer.epsilon, axis=axis, correction=0)
        np.testing.assert_allclose(np_(y), want, **tol)
        np.testing.assert_allclose(np_(layer.moving_mean), mean, **tol)
        np.testing.assert_allclose(np_(layer.moving_variance), var, **tol)
    x = data((5,) + shape[1:], seed=9, dtype=dtype)  # inference: any batch size, the moving statistics
    want = reference.batch_norm(x, mean, var, state["gamma"], state["beta"], eps=layer.epsilon, axis=axis)[0]
    np.testing.assert_allclose(np_(layer(x)), want, **tol)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float64_training_steps_then_inference(case, float64):
    _, shape, axis, v = case
    layer = randomized(nk.BatchNormalization(axis=axis, momentum=0.8, virtual_batch_size=v), shape, "float64")
    steps_against_reference(layer, shape, axis, v, "float64", TIGHT)


def test_float32_under_both_kernel_policies(policy):
    shape, v = (16, 4, 6), 4
    layer = randomized(nk.BatchNormalization(virtual_batch_size=v, momentum=0.5), shape, "float32")
    steps_against_reference(layer, shape, -1, v, "float32", f32_tol(4 * 4, scale=8.0))


def test_gradients_are_each_virtual_batchs(float64):
    from normkit_keras.testing import gradients

    layer = randomized(nk.BatchNormalization(virtual_batch_size=2), (6, 3), "float64")
    x, up = data((6, 3)), data((6, 3), seed=1)
    dx, dw = gradients(layer, x, up)
    parts = [reference.batch_norm_grad(x[i:i + 2], up[i:i + 2], np_(layer.gamma), axis=-1, eps=1e-3)
             for i in range(0, 6, 2)]
    np.testing.assert_allclose(dx, np.concatenate([p[0] for p in parts]), **TIGHT)
    np.testing.assert_allclose(dw["gamma"], sum(p[1] for p in parts), **TIGHT)
    np.testing.assert_allclose(dw["beta"], sum(p[2] for p in parts), **TIGHT)


def test_one_virtual_batch_is_plain_batch_normalization_bit_for_bit(policy):
    x = data((8, 5), dtype="float32")
    ghost = randomized(nk.BatchNormalization(virtual_batch_size=8), x.shape, "float32")
    plain = randomized(nk.BatchNormalization(), x.shape, "float32")
    np.testing.assert_array_equal(np_(ghost(x, training=True)), np_(plain(x, training=True)))
    for a, b in zip(ghost.weights, plain.weights):
        np.testing.assert_array_equal(np_(a), np_(b))


def test_fit_in_a_compiled_model_updates_the_moving_statistics_once_per_step():
    """model.fit (tf.function / jax.jit / torch): one step on a batch of 12 in virtual batches of 4."""
    x = data((12, 5), dtype="float32")
    layer = nk.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=12, epochs=1, shuffle=False, verbose=0)
    _, mean, var = reference.batch_norm(x, np.zeros(5), np.ones(5), training=True, momentum=0.5, correction=0)
    np.testing.assert_allclose(np_(layer.moving_mean), mean, **f32_tol(12, scale=4.0))
    np.testing.assert_allclose(np_(layer.moving_variance), var, **f32_tol(12, scale=16.0))


def test_config_save_and_load(tmp_path):
    layer = nk.BatchNormalization(virtual_batch_size=4, momentum=0.5)
    assert layer.get_config()["virtual_batch_size"] == 4
    assert nk.BatchNormalization.from_config(layer.get_config()).virtual_batch_size == 4
    assert "virtual_batch_size" not in nk.BatchNormalization().get_config()  # Keras's config when not set
    model = keras.Sequential([keras.Input((5,)), layer])
    x = data((8, 5), dtype="float32")
    model(x, training=True)
    path = str(tmp_path / "ghost.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[0]) is nk.BatchNormalization and loaded.layers[0].virtual_batch_size == 4
    np.testing.assert_array_equal(np_(loaded(x, training=True)), np_(model(x, training=True)))


def test_errors_name_the_argument_and_the_numbers():
    with pytest.raises(ValueError, match="virtual_batch_size must be None or a positive int .* got 0"):
        nk.BatchNormalization(virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size must be None or a positive int, got float 2.0"):
        nk.BatchNormalization(virtual_batch_size=2.0)
    for name in ("renorm", "synchronized"):
        with pytest.raises(ValueError, match=f"virtual_batch_size .* {name}=True"):
            nk.BatchNormalization(virtual_batch_size=2, **{name: True})
    layer = nk.BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size .* batch of 6 samples"):
        layer(data((6, 3), dtype="float32"), training=True)
    assert np_(layer(data((6, 3), dtype="float32"))).shape == (6, 3)  # inference does not split the batch
    with pytest.raises(ValueError, match="feature axis cannot be 0"):
        nk.BatchNormalization(axis=0, virtual_batch_size=2)(data((4, 3), dtype="float32"), training=True)
