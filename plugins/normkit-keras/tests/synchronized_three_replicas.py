"""Run by test_hardening.py in a subprocess: synchronized=True across THREE replicas of a MirroredStrategy on CPU
(an odd number: the replica merge pads its pairwise tree), float64, an uneven global batch of 7 (3, 3, 1), two
training steps: outputs, input gradients and moving statistics equal one replica on the whole batch."""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
import keras  # noqa: E402

import normkit_keras as nk  # noqa: E402
from normkit.testing import reference  # noqa: E402

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])
keras.config.set_floatx("float64")
rng = np.random.default_rng(3)
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
        return y, tape.gradient(loss, xb)
    return strategy.run(replica, args=batch)


def local(values):
    return [t.numpy() for t in strategy.experimental_local_results(values)]


gamma, beta, mean, var = [w.copy() for w in layer.get_weights()]
for step in range(2):
    x = np.array([-2.0, 0.0, 3.0]) + rng.normal(size=(7, 3)) * np.array([1.0, 2.0, 0.5])
    g = rng.normal(size=(7, 3))
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, g)).batch(7))
    y, dx = (local(v) for v in train_step(next(iter(ds))))
    assert sorted(len(a) for a in y) == [1, 3, 3], [a.shape for a in y]
    want, mean, var = reference.batch_norm(x, mean, var, gamma, beta, training=True, momentum=0.4, eps=1e-3, axis=-1,
                                           correction=0)
    want_dx, _, _ = reference.batch_norm_grad(x, g, gamma, axis=-1, eps=1e-3)
    tight = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(y), want, **tight)
    np.testing.assert_allclose(np.concatenate(dx), want_dx, **tight)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, **tight)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, **tight)
print("OK three replicas", strategy.num_replicas_in_sync)
