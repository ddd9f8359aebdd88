"""The seed article's two Keras models, with normkit_keras.BatchNormalization and with Keras's own.

The article's dense model (Dense 16 -> BN -> Dense 32 -> BN -> Dense 2, input (1, 5)) and its conv
model (Conv2D 32 -> BN -> Conv2D 32 -> BN -> MaxPooling2D -> Flatten -> Dense 2, input (28, 28, 3)),
written exactly as in the article, are trained on scikit-learn's 8x8 digits adapted to their inputs:
two classes (digit < 5 vs >= 5); the dense model sees the first 5 principal components of the
pixels, shaped (1, 5); the conv model sees the digits resized to 28x28 and repeated over 3 channels.
Each model is built twice from the same initial weights: with normkit_keras.BatchNormalization and
with keras.layers.BatchNormalization. Printed and plotted: test accuracy and time per epoch.

    python examples/keras_seed_models.py [--fast] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import time
import warnings

import numpy as np

import _common


def dense_model(keras, BatchNormalization):
    """The article's dense model, verbatim but for the BatchNormalization class."""
    from keras.layers import Dense
    from keras.models import Sequential

    return Sequential([
        Dense(16, input_shape=(1, 5), activation="relu"),
        BatchNormalization(),
        Dense(32, activation="relu"),
        BatchNormalization(),
        Dense(2, activation="softmax"),
    ])


def conv_model(keras, BatchNormalization):
    """The article's conv model, verbatim but for the BatchNormalization class."""
    from keras.layers import Conv2D, Dense, Flatten, MaxPooling2D
    from keras.models import Sequential

    return Sequential([
        Conv2D(32, (3, 3), input_shape=(28, 28, 3), activation="relu"),
        BatchNormalization(),
        Conv2D(32, (3, 3), activation="relu"),
        BatchNormalization(),
        MaxPooling2D(),
        Flatten(),
        Dense(2, activation="softmax"),
    ])


def digits_for_the_article(keras):
    """(dense data, conv data): each (x_train, y_train, x_test, y_test); y = digit >= 5, shape (N, 1)."""
    from sklearn.decomposition import PCA

    images, labels = _common.load_digits_arrays()
    train, test = _common.split(len(images))
    y = (labels >= 5).astype(np.int64)[:, None]
    flat = images.reshape(len(images), -1)
    pca = PCA(n_components=5, random_state=0).fit(flat[train])
    pcs = pca.transform(flat).astype(np.float32)[:, None, :]  # (N, 1, 5)
    big = keras.ops.convert_to_numpy(
        keras.ops.image.resize(images[..., None], (28, 28), interpolation="bilinear"))
    big = np.repeat(big, 3, axis=-1).astype(np.float32)  # (N, 28, 28, 3)
    return ((pcs[train], y[train], pcs[test], y[test]),
            (big[train], y[train], big[test], y[test]))


class EpochTimer:
    """A Keras callback factory recording the wall time of each epoch."""

    def __new__(cls, keras):
        class _Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.seconds = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._t0)

        return _Timer()


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default 8 dense / 6 conv; --fast 2)")


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0], add_arguments)
    warnings.filterwarnings("ignore", message=".*input_shape.*")  # the article passes input_shape to layers
    import keras
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from normkit_keras import BatchNormalization as NormkitBN

    native_bn = keras.layers.BatchNormalization
    dense_data, conv_data = digits_for_the_article(keras)
    epochs = {"dense": args.epochs or (2 if args.fast else 8), "conv": args.epochs or (2 if args.fast else 6)}
    if args.fast:  # a smoke run: a slice of the data
        dense_data = tuple(a[:512] for a in dense_data)
        conv_data = tuple(a[:256] for a in conv_data)

    _common.heading(f"The article's Keras models on scikit-learn digits (digit < 5 vs >= 5), Keras backend "
                    f"{keras.backend.backend()}")
    print(f"dense input {dense_data[0].shape[1:]} (5 principal components), conv input {conv_data[0].shape[1:]} "
          f"(digits resized to 28x28, 3 channels); {len(dense_data[0])} training / {len(dense_data[2])} test images")

    results: dict = {"backend": keras.backend.backend(), "models": {}}
    histories = {}
    for name, build, data in (("dense", dense_model, dense_data), ("conv", conv_model, conv_data)):
        x_train, y_train, x_test, y_test = data
        keras.utils.set_random_seed(0)
        models = {"normkit": build(keras, NormkitBN)}
        models["keras"] = build(keras, native_bn)
        init = models["normkit"].get_weights()
        models["keras"].set_weights(init)  # the same initial weights, the same layout of BN weights
        probe = x_train[:64]
        init_diff = float(np.max(np.abs(
            keras.ops.convert_to_numpy(models["normkit"](probe, training=True))
            - keras.ops.convert_to_numpy(models["keras"](probe, training=True)))))
        print(f"\n{name} model, {models['normkit'].count_params()} parameters; normkit vs keras outputs from the "
              f"same initial weights (training mode): max abs diff {init_diff:.1e}")
        for impl, model in models.items():
            print(f"--- {name} model, {impl} BatchNormalization, {epochs[name]} epochs")
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            timer = EpochTimer(keras)
            keras.utils.set_random_seed(1)  # the same batch order for both
            hist = model.fit(x_train, y_train, epochs=epochs[name], batch_size=32, verbose=2,
                             validation_data=(x_test, y_test), callbacks=[timer])
            _, test_acc = model.evaluate(x_test, y_test, verbose=0)
            # diagnostic: the test set through the batch statistics instead of the moving ones
            probs = keras.ops.convert_to_numpy(model(x_test, training=True))
            batch_stats_acc = float(np.mean(np.argmax(probs, axis=-1).reshape(-1) == y_test.reshape(-1)))
            later = timer.seconds[1:] or timer.seconds
            histories[(name, impl)] = hist.history["val_accuracy"]
            results["models"][(name, impl)] = {
                "test_acc": float(test_acc), "train_acc": float(hist.history["accuracy"][-1]),
                "test_acc_batch_stats": batch_stats_acc, "first_epoch_s": timer.seconds[0], "epoch_s": float(np.median(later)),
                "val_acc_per_epoch": [float(a) for a in hist.history["val_accuracy"]],
                "jit_compile": bool(getattr(model, "jit_compile", False)),
            }
        results["models"][(name, "init_max_abs_diff")] = init_diff

    _common.heading("Side by side (test accuracy after the last epoch; time per epoch after the first)")
    print(f"{'model':<6} {'BatchNormalization':<20} {'test acc':>8} {'(batch stats)':>13} {'train acc':>9} "
          f"{'1st epoch s':>11} {'s/epoch':>8} {'XLA':>4}")
    for name in ("dense", "conv"):
        for impl in ("normkit", "keras"):
            r = results["models"][(name, impl)]
            print(f"{name:<6} {impl:<20} {r['test_acc']:>8.3f} {r['test_acc_batch_stats']:>13.3f} "
                  f"{r['train_acc']:>9.3f} {r['first_epoch_s']:>11.2f} "
                  f"{r['epoch_s']:>8.3f} {'yes' if r['jit_compile'] else 'no':>4}")
        n, k = results["models"][(name, "normkit")], results["models"][(name, "keras")]
        print(f"{name:<6} normkit/keras time per epoch: {n['epoch_s'] / k['epoch_s']:.2f}x; "
              f"accuracy difference {n['test_acc'] - k['test_acc']:+.3f}")

    print("test acc uses the moving statistics (inference mode, momentum 0.99); '(batch stats)' normalizes the test "
          "set with its own batch statistics instead: a gap between them means the moving averages still lag "
          "behind the weights after this few steps")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(("dense", "conv")):
        for impl, ls in (("normkit", "-"), ("keras", "--")):
            acc = histories[(name, impl)]
            ax.plot(range(1, len(acc) + 1), acc, ls=ls, color=f"C{i}", marker="o", ms=3,
                    label=f"{name}, {impl} BN")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (digit < 5 vs >= 5)")
    ax.set_title("The article's models on digits")
    ax.legend()
    pos = np.arange(2)
    for j, impl in enumerate(("normkit", "keras")):
        bx.bar(pos + 0.4 * j, [results["models"][(n, impl)]["epoch_s"] for n in ("dense", "conv")], width=0.4,
               label=f"{impl} BatchNormalization")
    bx.set_xticks(pos + 0.2, ["dense", "conv"])
    bx.set_ylabel("seconds per epoch (median after the first)")
    bx.set_title(f"Keras {keras.__version__}, {keras.backend.backend()} backend")
    bx.legend()
    results["figures"] = [_common.save(fig, args.out, "keras_seed_models.png")]
    return results


if __name__ == "__main__":
    main()
