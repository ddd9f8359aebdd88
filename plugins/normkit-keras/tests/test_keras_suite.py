"""Keras's own normalization tests (the ``*_test.py`` files of the keras wheel) run against normkit's layers.

Each Keras ``TestCase`` class is subclassed here; for the duration of every test method the name
``layers`` in its Keras test module is a proxy on ``keras.src.layers`` whose normalization classes are
normkit's (``Normalization`` is ``normkit_keras.Standardize``), so every ``layers.BatchNormalization(...)``
in Keras's test builds normkit's layer. ``tearDown`` asserts that a test whose source names a replaced
class really got normkit's. Runs on the process's Keras backend (the Makefile runs this directory once
per KERAS_BACKEND); the Keras test modules keep their own backend skips.

``EXPECTED_FAILURES``: the differences that are not normkit bugs, each a strict xfail with its reason
(empty now: every Keras test passes); ``EXPECTED_SKIPS``: Keras's own skips that a default install hits.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import keras
import pytest
from keras.src import layers as keras_layers

import normkit_keras as nk

BACKEND = keras.backend.backend()

REPLACED = {
    "BatchNormalization": nk.BatchNormalization,
    "LayerNormalization": nk.LayerNormalization,
    "GroupNormalization": nk.GroupNormalization,
    "RMSNormalization": nk.RMSNormalization,
    "UnitNormalization": nk.UnitNormalization,
    "Normalization": nk.Standardize,  # keras.layers.Normalization's drop-in (a subclass of it)
}

MODULES = {  # Keras test module -> its TestCase class
    "keras.src.layers.normalization.batch_normalization_test": "BatchNormalizationTest",
    "keras.src.layers.normalization.layer_normalization_test": "LayerNormalizationTest",
    "keras.src.layers.normalization.group_normalization_test": "GroupNormalizationTest",
    "keras.src.layers.normalization.rms_normalization_test": "RMSNormalizationTest",
    "keras.src.layers.normalization.unit_normalization_test": "UnitNormalizationTest",
    "keras.src.layers.preprocessing.normalization_test": "NormalizationTest",
}

# (Keras test class, method name or its parameterized prefix, backends or None for all) -> reason
EXPECTED_FAILURES: dict[tuple[str, str, tuple[str, ...] | None], str] = {}

# Keras's own skips on a default install (each a pytest skip inside Keras's test), with why
EXPECTED_SKIPS = {
    "test_adapt_grain_dataset": "needs the 'grain' package (pytest.importorskip in Keras's test); not a test dependency",
    "test_call_on_meta_device_after_built": "Keras runs it on the torch backend only",
}


class _Layers(types.ModuleType):
    """A layers module (``keras.src.layers`` or ``keras.layers``) with normkit's classes for ``names``; records
    which of them were looked up."""

    def __init__(self, base: types.ModuleType, names: set[str]) -> None:
        super().__init__(base.__name__)
        self.base, self.names = base, names
        self.served: set[str] = set()

    def __getattr__(self, name: str):
        if name in self.names:
            self.served.add(name)
            return REPLACED[name]
        return getattr(self.base, name)


def _expected_failure(class_name: str, method: str) -> str | None:
    for (cls, prefix, backends), reason in EXPECTED_FAILURES.items():
        if cls == class_name and re.fullmatch(re.escape(prefix) + r"\d*", method) and (
                backends is None or BACKEND in backends):
            return reason
    return None


def _suite_class(module_name: str, class_name: str) -> type:
    module = importlib.import_module(module_name)
    keras_class = getattr(module, class_name)

    def setUp(self) -> None:  # noqa: N802 - unittest's name
        source = inspect.getsource(getattr(keras_class, self._testMethodName))
        self._named = set(re.findall(r"\blayers\.(\w+)", source)) & set(REPLACED)
        direct = set(re.findall(r"\bkeras\.layers\.(\w+)", source)) & set(REPLACED)  # after `import keras` in a test
        self._proxies = [_Layers(keras_layers, set(REPLACED)), _Layers(keras.layers, direct)]
        self._restore = module.layers, keras.layers
        module.layers = self._proxies[0]
        if direct:  # only the names the test uses: normkit's own code reads keras.layers.BatchNormalization
            keras.layers = self._proxies[1]
        keras_class.setUp(self)

    def tearDown(self) -> None:  # noqa: N802
        try:
            keras_class.tearDown(self)
        finally:
            module.layers, keras.layers = self._restore
        served = self._proxies[0].served | self._proxies[1].served
        if not served and self._testMethodName in EXPECTED_SKIPS:
            return  # skipped inside Keras's test before it built a layer
        assert self._named <= served, f"normkit's {sorted(self._named)} were not used, only {sorted(served)}"

    body = {"setUp": setUp, "tearDown": tearDown, "__module__": __name__}
    for name in dir(keras_class):
        reason = _expected_failure(class_name, name) if name.startswith("test") else None
        if reason is not None:
            body[name] = pytest.mark.xfail(strict=True, reason=reason)(getattr(keras_class, name))
    return type(f"TestKeras{class_name}", (keras_class,), body)


for _module, _class in MODULES.items():
    _suite = _suite_class(_module, _class)
    globals()[_suite.__name__] = _suite
del _module, _class, _suite


def test_every_keras_normalization_test_file_is_run():
    """The six Keras test files ship in the wheel and each contributes its tests (none silently missing)."""
    for module_name, class_name in MODULES.items():
        keras_class = getattr(importlib.import_module(module_name), class_name)
        tests = [n for n in dir(keras_class) if n.startswith("test")]
        assert len(tests) >= 3, (module_name, tests)
        assert f"TestKeras{class_name}" in globals()


def test_expected_failures_name_real_tests():
    """Every listed difference names a Keras test that exists (a renamed test would make the list stale)."""
    for cls, prefix, _ in EXPECTED_FAILURES:
        keras_class = getattr(importlib.import_module(next(m for m, c in MODULES.items() if c == cls)), cls)
        assert any(re.fullmatch(re.escape(prefix) + r"\d*", n) for n in dir(keras_class)), (cls, prefix)
    for name in EXPECTED_SKIPS:
        assert any(hasattr(getattr(importlib.import_module(m), c), name) for m, c in MODULES.items()), name
