"""normkit's shared test matrix: array backends, float64 NumPy references, the adapters' conformance suite.

Use it from pytest with ``pytest_plugins = ["normkit.testing.pytest_plugin"]``.
"""

from normkit.testing import reference
from normkit.testing.backends import Backend, BackendSpec
from normkit.testing.conformance import CHECKS, Harness, LayerCase

__all__ = ["Backend", "BackendSpec", "Harness", "LayerCase", "CHECKS", "reference"]
