"""test_deploy.py calls ``save(DIR)`` in its own process (builds, trains and saves a model of every normkit layer)
and runs this file with DIR in a fresh process: it imports normkit_keras BEFORE keras (registration through the import
hook), loads the model, checks it."""

import os
import sys

import numpy as np

X = (np.random.default_rng(0).standard_normal((8, 6, 4)) * 2 + 0.5).astype("float32")


def save(where: str) -> None:
    """Build, train and save the model (test_deploy calls this in its own process: only the load needs a fresh one)."""
    import keras

    import normkit_keras as nk

    st, mm = nk.Standardize(), nk.MinMaxScale(invert=True)
    st.adapt(X), mm.adapt(X)
    inputs = keras.Input((6, 4))
    h = st(inputs)
    h = nk.BatchNormalization(momentum=0.5)(h)
    h = nk.LayerNormalization(axis=[1, 2])(h)
    h = nk.GroupNormalization(groups=2)(h)
    h = nk.RMSNormalization()(h)
    h = nk.UnitNormalization()(h)
    given = nk.Standardize(mean=[0.5, 1.0, -1.0, 2.0], variance=[4.0, 1.0, 2.0, 0.5], invert=True)(inputs)
    model = keras.Model(inputs, [h, mm(inputs), given])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, [np.zeros_like(X)] * 3, verbose=0)
    model.save(os.path.join(where, "model.keras"))
    np.savez(os.path.join(where, "want.npz"), *model.predict(X, verbose=0))


def load(where: str) -> int:
    """Import normkit_keras before keras, load the model, check its layers and outputs; the count of normkit layers."""
    import normkit_keras  # noqa: F401 - registers the layers, without importing keras

    assert "keras" not in sys.modules, "import normkit_keras imported keras"
    import keras

    loaded = keras.models.load_model(os.path.join(where, "model.keras"))
    names = sorted(type(l).__name__ for l in loaded.layers if type(l).__module__.startswith("normkit_keras"))
    assert names == sorted(["Standardize", "Standardize", "MinMaxScale", "BatchNormalization", "LayerNormalization",
                            "GroupNormalization", "RMSNormalization", "UnitNormalization"]), names
    want = np.load(os.path.join(where, "want.npz"))
    for i, got in enumerate(loaded.predict(X, verbose=0)):
        np.testing.assert_array_equal(got, want[f"arr_{i}"])
    return len(names)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print("LOADED", load(sys.argv[1]))
