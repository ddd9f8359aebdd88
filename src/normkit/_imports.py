"""Which libraries are loaded: ``imported_module``, read by the namespace lookup, the plugin host and the plugins.

It sits below both ``_namespace`` and ``plugin.manager`` (which re-export it), so neither imports the other for it.
"""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["imported_module"]

_READY: dict[str, ModuleType] = {}


def imported_module(name: str) -> ModuleType | None:
    """``sys.modules[name]`` once its import has finished, else None (not imported, or still importing).

    While another thread imports a library its module is already in ``sys.modules`` but half
    built; reading ``torch.Tensor`` from it then raises ``AttributeError``. An array of a library
    that is still importing cannot have reached normkit, so None is the right answer for it.
    """
    module = sys.modules.get(name)
    if module is None or module is _READY.get(name):
        return module
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    _READY[name] = module
    return module
