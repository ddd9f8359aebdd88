"""``normkit_keras.accumulate_statistics``: k micro-batches, one moving-statistics step as with their concatenation.

Reference: Keras's own ``keras.layers.BatchNormalization`` called once in training on the concatenated batch
(float64, same weights), and a float64 NumPy formula. Runs on the current Keras backend, in a custom training
loop of that backend (GradientTape, torch backward, jax.grad of stateless_call).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import normkit_keras
from normkit_keras import accumulate_statistics

BACKEND = keras.backend.backend()
TOL = dict(rtol=1e-10, atol=1e-10)
# Keras's own layer as a second reference: in float64 on the jax and torch backends its moments come out float32-
# rounded (measured 3e-8 to 1e-7 off the float64 NumPy value), and on TensorFlow its masked moments are ~1e-9 off
# (its weighted-moments path): compared to 1e-6 there (8 float32 eps), to 1e-10 on TensorFlow unmasked. The exact
# claim (1e-10) is checked against the float64 NumPy formula on every backend.
NATIVE_TOL = TOL if BACKEND == "tensorflow" else dict(rtol=1e-6, atol=1e-6)
NATIVE_MASKED_TOL = dict(rtol=1e-6, atol=1e-6)
SIZES = (3, 5, 4)  # unequal micro-batches: a mean of their means would be wrong


def _model(bn_class, momentum=0.9):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((4, 4, 3)),
        keras.layers.Conv2D(6, 3, padding="same"),
        bn_class(momentum=momentum, name="bn1"),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
        bn_class(momentum=momentum, name="bn2"),
        keras.layers.Dense(1),
    ])
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        n = layer.moving_mean.shape[0]
        layer.moving_mean.assign(np.linspace(-1.0, 1.0, n))
        layer.moving_variance.assign(np.linspace(0.5, 2.0, n))
    return model


def _pair(momentum=0.9):
    ours, native = _model(normkit_keras.BatchNormalization, momentum), _model(keras.layers.BatchNormalization, momentum)
    native.set_weights(ours.get_weights())
    return ours, native


def _batches(rng):
    return [rng.normal(1.5, 2.0, size=(n, 4, 4, 3)) for n in SIZES]


def _moving(model):
    return {f"{name}/{stat}": np.array(keras.ops.convert_to_numpy(getattr(model.get_layer(name), stat)))
            for name in ("bn1", "bn2") for stat in ("moving_mean", "moving_variance")}


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _grad_step(model, x, y):
    """One loss and gradient of a custom training loop on this backend (no optimizer: the statistics matter)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        return [_np(g) for g in grads]
    if BACKEND == "torch":
        import torch

        model.zero_grad()
        loss = torch.mean((model(x, training=True) - torch.as_tensor(y)) ** 2)
        loss.backward()
        return [_np(v.value.grad) for v in model.trainable_variables]
    import jax

    def loss_fn(trainable, non_trainable):
        out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.mean((out - y) ** 2)

    grads = jax.grad(loss_fn)([v.value for v in model.trainable_variables],
                              [v.value for v in model.non_trainable_variables])
    return [np.asarray(g) for g in grads]


def _seen_by_bn2(model, x):
    """What bn2 receives in a training call on ``x``: bn1 normalizes ``x`` with ``x``'s own statistics (a copy of
    ``model``'s weights outside any context, so nothing of ``model`` moves)."""
    copy = _model(normkit_keras.BatchNormalization)
    copy.set_weights(model.get_weights())
    h = copy.get_layer("bn1")(copy.layers[0](x), training=True)
    return _np(copy.layers[3](copy.layers[2](h)))


def test_one_update_with_the_concatenated_batch(float64):
    """In a custom training loop (this backend's autodiff, eager): each micro-batch's loss gradients are the usual
    ones and the moving statistics do not move; on exit each layer holds one Keras step with the concatenation of
    what it saw (keras.layers.BatchNormalization called once on it, and NumPy), not k steps."""
    rng = np.random.default_rng(0)
    ours, native = _pair()
    batches = _batches(rng)
    targets = [rng.normal(size=(n, 1)) for n in SIZES]
    before = _moving(ours)
    seen = []  # bn2's input in each micro-step: bn1 normalized that micro-batch with its own statistics
    with accumulate_statistics(ours) as inside:
        assert inside is ours
        for x, y in zip(batches, targets):
            grads = _grad_step(ours, x, y)
            reference = _model(normkit_keras.BatchNormalization)  # outside the context: x's statistics too
            reference.set_weights(ours.get_weights())
            for g, r in zip(grads, _grad_step(reference, x, y)):
                np.testing.assert_allclose(g, r, **TOL)
            for key, value in _moving(ours).items():  # recorded, not applied
                np.testing.assert_array_equal(value, before[key], err_msg=key)
            seen.append(_seen_by_bn2(ours, x))
    after = _moving(ours)
    conv = np.concatenate([_np(ours.layers[0](x)) for x in batches])
    native.get_layer("bn1")(conv, training=True)  # Keras's own layer, one call on each concatenation
    native.get_layer("bn2")(np.concatenate(seen), training=True)
    expected = _moving(native)
    for key in expected:
        np.testing.assert_allclose(after[key], expected[key], err_msg=key, **NATIVE_TOL)
    for name, h, axes in (("bn1", conv, (0, 1, 2)), ("bn2", np.concatenate(seen), (0,))):
        mean, var = h.mean(axis=axes), h.var(axis=axes)  # float64 NumPy, Keras's step: old value weighted 0.9
        np.testing.assert_allclose(after[f"{name}/moving_mean"], 0.9 * before[f"{name}/moving_mean"] + 0.1 * mean,
                                   **TOL)
        np.testing.assert_allclose(after[f"{name}/moving_variance"],
                                   0.9 * before[f"{name}/moving_variance"] + 0.1 * var, **TOL)
    # and not what k momentum steps (Keras without the context, or model.fit with gradient_accumulation_steps) give
    stepwise, _ = _pair()
    for x in batches:
        stepwise(x, training=True)
    for key in expected:
        assert not np.allclose(_moving(stepwise)[key], expected[key], rtol=1e-6, atol=1e-6), key


@pytest.mark.parametrize("case", ["plain", "momentum-0.5", "ghost", "mask"])
def test_one_layer_cases(case, float64):
    """One BatchNormalization: its fold equals Keras's layer called once on the concatenation (the masked positions
    excluded, as in Keras), for a ghost batch norm (its moving statistics take the whole batch) and momentum 0.5."""
    rng = np.random.default_rng(5)
    momentum = 0.5 if case == "momentum-0.5" else 0.9
    kwargs = {"virtual_batch_size": 2} if case == "ghost" else {}
    sizes = (4, 6, 2)  # even: virtual_batch_size 2 divides each
    ours = normkit_keras.BatchNormalization(momentum=momentum, **kwargs)
    native = keras.layers.BatchNormalization(momentum=momentum)
    for layer in (ours, native):
        layer.build((None, 5, 3))
        layer.moving_mean.assign(np.array([0.5, -1.0, 2.0]))
        layer.moving_variance.assign(np.array([1.5, 0.5, 3.0]))
    xs = [rng.normal(3.0 * i, 1.0 + i, size=(n, 5, 3)) for i, n in enumerate(sizes)]
    masks = [rng.random((n, 5)) > 0.3 for n in sizes] if case == "mask" else [None] * len(sizes)
    with accumulate_statistics(ours):
        for x, m in zip(xs, masks):
            ours(x, training=True, mask=m)
    concat_mask = np.concatenate(masks) if case == "mask" else None
    native(np.concatenate(xs), training=True, mask=concat_mask)
    for stat in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(_np(getattr(ours, stat)), _np(getattr(native, stat)), err_msg=stat,
                                   **(NATIVE_MASKED_TOL if case == "mask" else NATIVE_TOL))
    h = np.concatenate(xs).reshape(-1, 3)
    if case == "mask":
        h = h[concat_mask.reshape(-1)]
    np.testing.assert_allclose(_np(ours.moving_mean), momentum * np.array([0.5, -1.0, 2.0])
                               + (1 - momentum) * h.mean(axis=0), **TOL)
    np.testing.assert_allclose(_np(ours.moving_variance), momentum * np.array([1.5, 0.5, 3.0])
                               + (1 - momentum) * h.var(axis=0), **TOL)


def test_inference_and_other_layers_unaffected(float64):
    rng = np.random.default_rng(2)
    ours, native = _pair(momentum=0.5)
    x = rng.normal(size=(4, 4, 4, 3))
    before = _moving(ours)
    with accumulate_statistics(ours):
        np.testing.assert_array_equal(_np(ours(x, training=False)), _np(ours(x, training=False)))
        ours.get_layer("bn2").trainable = False
        ours(x, training=True)  # bn1 records; bn2 is in inference (trainable=False) and records nothing
    after = _moving(ours)
    for key in ("bn2/moving_mean", "bn2/moving_variance"):
        np.testing.assert_array_equal(after[key], before[key])
    twin, _ = _pair(momentum=0.5)
    twin.get_layer("bn2").trainable = False
    twin(x, training=True)
    for key, value in _moving(twin).items():
        np.testing.assert_allclose(after[key], value, err_msg=key, **TOL)


def test_empty_context_and_exception_leave_statistics(float64):
    rng = np.random.default_rng(3)
    ours, _ = _pair()
    before = _moving(ours)
    with accumulate_statistics(ours):
        pass
    with pytest.raises(ZeroDivisionError):
        with accumulate_statistics(ours):
            ours(rng.normal(size=(3, 4, 4, 3)), training=True)
            1 / 0
    for key, value in _moving(ours).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    ours(rng.normal(size=(3, 4, 4, 3)), training=True)  # after the context: updates as usual again
    assert not np.array_equal(_moving(ours)["bn1/moving_mean"], before["bn1/moving_mean"])


def test_refusals_name_the_layer():
    with pytest.raises(TypeError, match=r"normkit_keras.convert\(model\) first\); got bn1 \(keras"):
        with accumulate_statistics(_model(keras.layers.BatchNormalization)):
            pass
    model = _model(normkit_keras.BatchNormalization)
    with accumulate_statistics(model):
        with pytest.raises(RuntimeError, match="already active on bn1, bn2: it does not nest"):
            with accumulate_statistics(model):
                pass
    with pytest.raises(TypeError, match="expects a keras.Model or keras Layer, got list"):
        with accumulate_statistics([model]):
            pass


@pytest.mark.skipif(BACKEND == "torch", reason="torch.compile is too slow for this suite; its check is the same")
def test_traced_call_refused():
    model = _model(normkit_keras.BatchNormalization)
    x = np.ones((2, 4, 4, 3), "float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        traced = tf.function(lambda v: model(v, training=True))
    else:
        import jax

        state = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
        traced = jax.jit(lambda v: model.stateless_call(*state, v, training=True)[0])
    with accumulate_statistics(model):
        with pytest.raises(RuntimeError, match="'bn1' was called inside a traced function"):
            traced(x)
