"""Run by test_synchronized.py in a subprocess: synchronized=True across two replicas of a MirroredStrategy on CPU."""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402  (after KERAS_BACKEND is set)
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras  # noqa: E402  (after the two logical CPUs are configured)

import normkit_keras as nk  # noqa: E402

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = (np.random.default_rng(0).standard_normal((8, 3)) * 2 + 0.5).astype("float32")
with strategy.scope():
    ours = nk.BatchNormalization(synchronized=True, momentum=0.5)
    native = keras.layers.BatchNormalization(synchronized=True, momentum=0.5)
    ours.build((None, 3))
    native.build((None, 3))
ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(8))
batch = next(iter(ds))
@tf.function
def step(b):
    return strategy.run(lambda t: (ours(t, training=True), native(t, training=True)), args=(b,))
yo, yn = step(batch)
yo = np.concatenate([t.numpy() for t in strategy.experimental_local_results(yo)])
yn = np.concatenate([t.numpy() for t in strategy.experimental_local_results(yn)])
np.testing.assert_allclose(yo, yn, rtol=1e-4, atol=1e-5)
want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
np.testing.assert_allclose(yo, want, rtol=2e-4, atol=2e-4)
np.testing.assert_allclose(ours.moving_variance.numpy(), 0.5 + 0.5 * x.var(0), rtol=1e-5)
np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * x.mean(0), rtol=1e-5, atol=1e-6)
print("OK", strategy.num_replicas_in_sync)

# float64, an uneven global batch of 7 (the replicas get 4 and 3), two training steps: outputs, input and
# weight gradients and moving statistics equal one replica on the whole batch (float64 NumPy reference)
from normkit.testing import reference  # noqa: E402

keras.config.set_floatx("float64")
rng = np.random.default_rng(1)
with strategy.scope():
    layer = nk.BatchNormalization(synchronized=True, momentum=0.6, dtype="float64")
    layer.build((None, 3))
    layer.set_weights([1.0 + 0.3 * rng.normal(size=3), 0.2 * rng.normal(size=3), rng.normal(size=3),
                       rng.uniform(0.5, 1.5, size=3)])


@tf.function
def train_step(batch):
    def replica(xb, gb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            y = layer(xb, training=True)
            loss = tf.reduce_sum(y * gb)
        return (y,) + tuple(tape.gradient(loss, [xb, layer.gamma.value, layer.beta.value]))
    return strategy.run(replica, args=batch)


def local(values):
    return [t.numpy() for t in strategy.experimental_local_results(values)]


gamma, beta, mean, var = [w.copy() for w in layer.get_weights()]
for step in range(2):
    x = np.array([-2.0, 0.0, 3.0]) + rng.normal(size=(7, 3)) * np.array([1.0, 2.0, 0.5])
    g = rng.normal(size=(7, 3))
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, g)).batch(7))
    y, dx, dgamma, dbeta = (local(v) for v in train_step(next(iter(ds))))
    assert [len(a) for a in y] == [4, 3], [a.shape for a in y]
    want, mean, var = reference.batch_norm(x, mean, var, gamma, beta, training=True, momentum=0.4, eps=1e-3, axis=-1,
                                           correction=0)
    want_dx, want_dgamma, want_dbeta = reference.batch_norm_grad(x, g, gamma, axis=-1, eps=1e-3)
    tight = dict(rtol=1e-10, atol=1e-12)  # float64 sums of 7 values of size < 10: round-off below 1e-14
    np.testing.assert_allclose(np.concatenate(y), want, **tight)
    np.testing.assert_allclose(np.concatenate(dx), want_dx, **tight)
    np.testing.assert_allclose(sum(dgamma), want_dgamma, **tight)  # each replica's own sum, as for any weight
    np.testing.assert_allclose(sum(dbeta), want_dbeta, **tight)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, **tight)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, **tight)
print("OK float64", strategy.num_replicas_in_sync)
