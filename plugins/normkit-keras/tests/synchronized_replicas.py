"""Run by test_layers.py in a subprocess: synchronized=True across two replicas of a MirroredStrategy on CPU."""

import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import normkit_keras as nk
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = (np.random.default_rng(0).standard_normal((8, 3)) * 2 + 0.5).astype("float32")
with strategy.scope():
    ours = nk.BatchNormalization(synchronized=True, momentum=0.5)
    native = keras.layers.BatchNormalization(synchronized=True, momentum=0.5)
    ours.build((None, 3)); native.build((None, 3))
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
