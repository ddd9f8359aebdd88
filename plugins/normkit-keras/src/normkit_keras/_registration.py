"""Registration of the layers with Keras's serialization on ``import normkit_keras``, without importing keras.

A ``.keras`` file names each layer ``normkit>ClassName``; Keras finds it only if the class was
registered (``keras.saving.register_keras_serializable``) before ``load_model`` (Keras imports a
config's module itself only for its own packages). The layer modules register on import, but they
import keras, which ``import normkit_keras`` must not do (that would fix the Keras backend, and cost
a TensorFlow import, before the user's own ``import keras``). So: if keras is imported already, the
layer modules are imported now; otherwise a one-shot import hook (``sys.meta_path[0]``, removed when
it fires) imports them right after keras finishes importing. Either way every class is registered
before any Keras call can load a model.

Why a hook, and whose: nothing of normkit runs between ``import keras`` and ``load_model`` (Keras
has no plugin registry), so without one a process that imports normkit_keras first could not load
its own files. It is installed only by importing this package, which is the user's choice: normkit's
plugin discovery imports the entry module ``_normkit_keras_plugin``, which lives outside this package
(so its ``__init__`` does not run) and imports it only for an array the plugin serves. A process that
merely discovers plugins (numpy, torch or JAX only) keeps ``sys.meta_path`` as it was.
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
