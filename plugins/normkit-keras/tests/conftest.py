"""Shared fixtures. Keras fixes its backend per process: run this directory once per KERAS_BACKEND."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from normkit.plugin.kernels import use_policy  # noqa: E402
from normkit_keras.testing import KerasHarness  # noqa: E402

BACKEND = keras.backend.backend()
HARNESS = KerasHarness()  # on JAX this enables float64 (jax_enable_x64) before any test runs

# The kernels serve tf.Tensor / jax arrays whatever the Keras backend: each module runs in its backend's run.
collect_ignore = [m for m, b in (("test_kernels.py", "tensorflow"), ("test_jax_kernels.py", "jax")) if b != BACKEND]

# kernel policies a layer test runs under: both where the plugin has kernels (TensorFlow, JAX), else "auto" (the core)
POLICIES = ["auto", "core"] if BACKEND in ("tensorflow", "jax") else ["auto"]


def f32_tol(n_terms, scale=1.0):
    """Tolerance between two float32 computations whose sums have up to ``n_terms`` terms of magnitude ``scale``:
    random-sign round-off grows as sqrt(n) * eps; 8x covers both sides and the few operations around the sums."""
    unit = 8.0 * float(np.sqrt(n_terms)) * float(np.finfo(np.float32).eps)
    return dict(rtol=unit, atol=unit * max(float(scale), 1.0))


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


@pytest.fixture(autouse=True)
def _clean_keras_state():
    """Every test starts from float32, no mixed precision, a fresh name scope and a fixed seed."""
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.fixture(params=POLICIES)
def policy(request):
    """The test under each kernel policy (``normkit.plugin.kernels.use_policy``), so normkit's own math runs too."""
    with use_policy(request.param):
        yield request.param


@pytest.fixture
def float64():
    """Keras's floatx set to float64 for the test (layers, inputs and optimizers)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
