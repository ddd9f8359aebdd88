"""Shared fixtures. Keras fixes its backend per process: run this directory once per KERAS_BACKEND."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from normkit_keras.testing import KerasHarness  # noqa: E402

BACKEND = keras.backend.backend()
HARNESS = KerasHarness()  # on JAX this enables float64 (jax_enable_x64) before any test runs


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


@pytest.fixture
def float64():
    """Keras's floatx set to float64 for the test (layers, inputs and optimizers)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
