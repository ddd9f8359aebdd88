"""Discovering normkit's plugins registers their hooks and does nothing else to the process; ``import normkit_keras``
still makes a ``.keras`` file of normkit layers load, keras imported after it or before it. Each in a fresh process
(what a process has imported is the subject), with NORMKIT_STRICT_PLUGINS=1 as CI runs.

The subject is backend-independent (Keras's serialization registry, the import system) and each fresh process pays
an import of Keras and its backend: the tests run in the JAX stage, where that import is cheapest (about 4 s of CPU
against 7 s on TensorFlow and 9 s on torch, measured here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import normkit_keras as nk
from conftest import BACKEND
from normkit_keras.testing import randomize_weights

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="backend-independent: runs in the JAX stage (cheapest import)")

TIMEOUT = 120  # seconds, each fresh process (an import of Keras and its backend, one small model)

# discovery: a torch-, numpy- or JAX-only user's first normkit call loads every installed plugin's entry point
DISCOVER = """
    import sys

    before = list(sys.meta_path)
    import numpy as np

    import normkit
    from normkit.plugin.manager import plugin_manager

    normkit.batch_norm(np.ones((4, 3)), np.zeros(3), np.ones(3), training=True, axis=1)
    assert plugin_manager().get_plugin("keras") is not None, plugin_manager().list_name_plugin()
    added = [f for f in sys.meta_path if f not in before]
    assert sys.meta_path == before, f"discovering plugins changed sys.meta_path: added {added}"
    imported = sorted(m for m in ("keras", "tensorflow", "torch", "jax", "flax", "normkit_keras") if m in sys.modules)
    assert not imported, f"discovering plugins imported {imported}"
"""

LOAD = """
    model = keras.saving.load_model(sys.argv[1])
    names = sorted(type(layer).__name__ for layer in model.layers if type(layer).__module__.startswith("normkit_keras"))
    assert names == ["BatchNormalization", "GroupNormalization", "Standardize"], names
    np.savez(sys.argv[2], *(keras.ops.convert_to_numpy(w) for w in model.weights))
    print("LOADED")
"""

KERAS_AFTER = DISCOVER + """
    import normkit_keras  # the user's import: registers the layers, keras not imported yet

    assert "keras" not in sys.modules, "import normkit_keras imported keras"
    import keras
""" + LOAD

KERAS_BEFORE = """
    import sys

    import keras
    import numpy as np

    import normkit_keras  # keras already imported: the layers register now
""" + LOAD


def _saved(tmp_path) -> tuple[list[str], list[np.ndarray]]:
    """A model of the three layer modules' classes with random weights, saved: (the file's path and the path where the
    fresh process writes the weights it loaded, the weights)."""
    inputs = keras.Input((6, 4))
    h = nk.Standardize(mean=[0.5, 1.0, -1.0, 2.0], variance=[4.0, 1.0, 2.0, 0.5])(inputs)
    h = nk.BatchNormalization(momentum=0.5)(h)
    model = keras.Model(inputs, nk.GroupNormalization(groups=2)(h))
    for i, layer in enumerate(model.layers):
        randomize_weights(layer, seed=i)
    paths = [str(tmp_path / "model.keras"), str(tmp_path / "loaded.npz")]
    model.save(paths[0])
    return paths, [keras.ops.convert_to_numpy(w) for w in model.weights]


def _loads(script: str, tmp_path) -> None:
    paths, want = _saved(tmp_path)
    assert _fresh(script, *paths) == "LOADED"
    with np.load(paths[1]) as got:
        assert len(got.files) == len(want) > 0
        for i, w in enumerate(want):
            np.testing.assert_array_equal(got[f"arr_{i}"], w)


def _fresh(script: str, *args: str) -> str:
    environment = {**os.environ, "KERAS_BACKEND": BACKEND, "NORMKIT_STRICT_PLUGINS": "1",
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_discovery_leaves_the_process_alone_and_normkit_keras_then_loads_keras_files(tmp_path):
    """Discovery: sys.meta_path as it was, no keras/tensorflow imported. Then ``import normkit_keras``, then keras:
    the .keras file loads (its layers are normkit's, their weights the saved ones)."""
    _loads(KERAS_AFTER, tmp_path)


def test_keras_file_loads_when_keras_is_imported_before_normkit_keras(tmp_path):
    _loads(KERAS_BEFORE, tmp_path)
