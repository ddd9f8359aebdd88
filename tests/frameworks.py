"""Set-up shared by the core tests that hold normkit_torch and Keras to each other in float64.

torch, Keras and both plugins are test requirements: a missing one fails the run with an ImportError,
never a skip. Keras computes float64 layers in float64 only on TensorFlow (on jax and torch its
``result_type(x, "float32")`` is float32), so these tests need the TensorFlow backend, the core test
process's (set here before Keras is first imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402,F401  (re-exported)

import normkit_keras as nkk  # noqa: E402,F401  (re-exported)
import normkit_torch as nkt  # noqa: E402,F401  (re-exported)

TENSORFLOW = keras.backend.backend() == "tensorflow"
NOT_TENSORFLOW = "Keras computes float64 layers in float32 off TensorFlow; the core test process runs TensorFlow"


@pytest.fixture
def float64():
    """Keras's floatx and dtype policy float64 for the test, float32 again after it."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
