"""Time one training step of the seed article's conv model: normkit_keras vs keras.layers BatchNormalization.

TensorFlow backend, one intra-op and one inter-op thread, input (28, 28, 3), batch 32. Each model is
compiled the same way (jit_compile as given), warmed up, then timed in alternating rounds; the
report is the median step time of each and their ratio. Run:

    KERAS_BACKEND=tensorflow python plugins/normkit-keras/scripts/measure_fit_step.py [--jit]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import normkit_keras  # noqa: E402


def conv_model(bn):
    inputs = keras.Input((28, 28, 3))
    h = keras.layers.Conv2D(32, (3, 3))(inputs)
    h = bn()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))


def main(jit: bool, rounds: int = 7, steps: int = 20) -> None:
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((32, 28, 28, 3)).astype("float32")
    y = (np.random.default_rng(1).random(32) > 0.5).astype("int32")
    models = {}
    for name, bn in (("keras", keras.layers.BatchNormalization), ("normkit", normkit_keras.BatchNormalization)):
        m = conv_model(bn)
        m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=jit)
        for _ in range(5):
            m.train_on_batch(x, y)
        models[name] = m
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                m.train_on_batch(x, y)
            times[name].append((time.perf_counter() - t0) / steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"jit_compile={jit}: keras {med['keras'] * 1e3:.2f} ms/step, normkit {med['normkit'] * 1e3:.2f} ms/step, "
          f"ratio normkit/keras = {med['normkit'] / med['keras']:.3f}")


if __name__ == "__main__":
    main(jit="--jit" in sys.argv)
