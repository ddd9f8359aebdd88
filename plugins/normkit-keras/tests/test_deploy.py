"""The paths users take after training, exactly as they take them: a fresh process loading a .keras file,
TensorFlow SavedModel export, TFLite conversion. Each with normkit's layers and, where it helps, Keras's."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import normkit_keras as nk
from conftest import BACKEND, f32_tol

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_in_a_fresh_process(where: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(HERE, "fresh_process.py"), where], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": BACKEND})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_keras_file_loads_in_a_fresh_process(tmp_path):
    """Saved in one process, loaded in another that imports normkit_keras before keras: same layers, same outputs."""
    import fresh_process

    fresh_process.save(str(tmp_path))
    assert _load_in_a_fresh_process(str(tmp_path)) == "LOADED 8"


def _model(module):
    inputs = keras.Input((6, 8))
    h = module.BatchNormalization()(inputs)
    h = module.GroupNormalization(groups=2)(h)
    h = module.LayerNormalization()(h)
    return keras.Model(inputs, module.RMSNormalization()(h))


def _trained(module):
    from normkit_keras.testing import randomize_weights

    model = _model(module)
    for i, layer in enumerate(model.layers):
        randomize_weights(layer, seed=i)
    return model


def _tflite_output(blob: bytes, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=blob)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


X = (np.random.default_rng(1).standard_normal((3, 6, 8)) * 2 + 0.5).astype("float32")


def test_saved_model_and_tflite(tmp_path):
    """SavedModel export (TensorFlow: native; JAX: jax2tf) served by tf.saved_model, then the real TFLite converter.

    JAX has no LiteRT exporter in Keras ("LiteRT export requires TensorFlow or PyTorch backend"): its
    documented route is the SavedModel through ``tf.lite.TFLiteConverter.from_saved_model``. On torch,
    Keras exports LiteRT through litert-torch (not installed here) and its SavedModel export fails in
    torch.export for keras.layers too: both layer sets raise the same errors.
    """
    import tensorflow as tf

    if BACKEND == "torch":
        for module in (nk, keras.layers):
            with pytest.raises(ImportError, match="litert-torch"):
                _model(module).export(str(tmp_path / "m.tflite"), format="litert", verbose=False)
        return
    model = _trained(nk)
    want = keras.ops.convert_to_numpy(model(X))
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    tol = f32_tol(8 * 6, np.abs(want).max())
    np.testing.assert_allclose(served.serve(tf.constant(X)).numpy(), want, **tol)
    blob = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    np.testing.assert_allclose(_tflite_output(blob, X), want, **tol)
    if BACKEND == "tensorflow":
        model.export(str(tmp_path / "m.tflite"), format="litert", verbose=False)
        with open(tmp_path / "m.tflite", "rb") as f:
            np.testing.assert_allclose(_tflite_output(f.read(), X), want, **tol)
    else:
        for module in (nk, keras.layers):  # Keras's own layers take the same route and meet the same refusal
            with pytest.raises(ValueError, match="LiteRT export requires TensorFlow or PyTorch backend"):
                _model(module).export(str(tmp_path / "m.tflite"), format="litert", verbose=False)
