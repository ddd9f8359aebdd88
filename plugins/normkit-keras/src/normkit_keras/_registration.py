"""Registration of the layers with Keras's serialization on ``import normkit_keras``, without importing keras.

A ``.keras`` file names each layer ``normkit>ClassName``; Keras finds it only if the class was
registered (``keras.saving.register_keras_serializable``) before ``load_model``. The layer modules
register on import, but importing them imports keras, which ``normkit_keras`` must not do (the
plugin's entry module lives in this package). So: if keras is imported already, the layer modules
are imported now; otherwise a one-shot import hook imports them right after keras finishes
importing. Either way every class is registered before any Keras call can load a model.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from typing import Any

__all__ = ["LAYER_MODULES", "register_with_keras"]

LAYER_MODULES = ("normkit_keras._batch_normalization", "normkit_keras._family", "normkit_keras._preprocessing")

_LOCK = threading.Lock()


def _import_layer_modules() -> None:
    try:
        for module in LAYER_MODULES:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - never break the user's `import keras`
        warnings.warn(f"normkit_keras could not register its layers with Keras: {exc!r}", RuntimeWarning, stacklevel=2)


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``keras`` so the layer modules load right after it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        _remove_hook()
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _import_layer_modules()

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance only
        return spec


_HOOK = _AfterKerasImport()


def _remove_hook() -> None:
    with _LOCK:
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)


def register_with_keras() -> None:
    """Register every normkit_keras layer with Keras now if keras is loaded, else right after it loads."""
    if "keras" in sys.modules:
        _import_layer_modules()
        return
    with _LOCK:
        if _HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _HOOK)
