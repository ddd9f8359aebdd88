"""Run by test_deploy.py in fresh processes: ``save DIR`` builds, trains and saves a model of every normkit layer;
``load DIR`` imports normkit_keras BEFORE keras (registration through the import hook), loads it, checks it."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
mode, where = sys.argv[1], sys.argv[2]
path = os.path.join(where, "model.keras")
import numpy as np  # noqa: E402

x = (np.random.default_rng(0).standard_normal((8, 6, 4)) * 2 + 0.5).astype("float32")
if mode == "save":
    import keras

    import normkit_keras as nk

    st, mm = nk.Standardize(), nk.MinMaxScale(invert=True)
    st.adapt(x), mm.adapt(x)
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
    model.fit(x, [np.zeros_like(x)] * 3, verbose=0)
    model.save(path)
    np.savez(os.path.join(where, "want.npz"), *model.predict(x, verbose=0))
    print("SAVED")
else:
    import normkit_keras  # noqa: F401 - registers the layers, without importing keras

    assert "keras" not in sys.modules, "import normkit_keras imported keras"
    import keras

    loaded = keras.models.load_model(path)
    names = sorted(type(l).__name__ for l in loaded.layers if type(l).__module__.startswith("normkit_keras"))
    assert names == sorted(["Standardize", "Standardize", "MinMaxScale", "BatchNormalization", "LayerNormalization",
                            "GroupNormalization", "RMSNormalization", "UnitNormalization"]), names
    want = np.load(os.path.join(where, "want.npz"))
    for i, got in enumerate(loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(got, want[f"arr_{i}"])
    print("LOADED", len(names))
