"""The one PluginManager: built on first use, thread-safe, loads entry points of group ``normkit``.

A plugin that fails to import is named in a warning with the reason and skipped, unless
``NORMKIT_STRICT_PLUGINS=1`` is set, in which case the error propagates (CI sets it).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from normkit.plugin import spec

__all__ = ["plugin_manager", "frameworks", "framework", "strict", "PluginLoadWarning"]

_LOCK = threading.RLock()
_MANAGER: pluggy.PluginManager | None = None


class PluginLoadWarning(UserWarning):
    """A normkit plugin could not be loaded and was skipped."""


def strict() -> bool:
    """True when ``NORMKIT_STRICT_PLUGINS`` asks for plugin failures to be errors."""
    return os.environ.get("NORMKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in entry_points(group=spec.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure of a third party's import
            if strict():
                raise RuntimeError(f"normkit plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}") from exc
            warnings.warn(
                f"normkit plugin {ep.name!r} ({ep.value}) failed to load and is skipped: {exc!r}",
                PluginLoadWarning,
                stacklevel=2,
            )


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, with the built-in hookimpls and every installed plugin registered."""
    global _MANAGER
    pm = _MANAGER
    if pm is not None:
        return pm
    with _LOCK:
        if _MANAGER is None:
            pm = pluggy.PluginManager(spec.PROJECT)
            pm.add_hookspecs(spec)
            _load_entry_points(pm)
            _MANAGER = pm
        return _MANAGER


def _forget_answers() -> None:
    """Cached namespace and kernel answers depend on the registered plugins: drop them."""
    from normkit._namespace import clear_cache
    from normkit.plugin.kernels import invalidate

    clear_cache()
    invalidate()


def register(plugin: object, name: str | None = None) -> str | None:
    """Register a plugin object in-process (tests, notebooks); returns its name."""
    with _LOCK:
        name = plugin_manager().register(plugin, name=name)
        _forget_answers()
        return name


def unregister(plugin: object) -> None:
    """Undo ``register``."""
    with _LOCK:
        plugin_manager().unregister(plugin)
        _forget_answers()


def frameworks() -> dict[str, str]:
    """``{name: module path}`` of every registered framework; a name claimed twice is an error."""
    merged: dict[str, str] = {}
    for answer in plugin_manager().hook.normkit_frameworks():
        for name, module in answer.items():
            if name in merged and merged[name] != module:
                raise RuntimeError(
                    f"framework {name!r} is registered twice: by {merged[name]!r} and by {module!r}"
                )
            merged[name] = module
    return merged


def framework(name: str) -> ModuleType:
    """Import and return the layers module of framework ``name`` (e.g. ``"torch"``)."""
    known = frameworks()
    if name not in known:
        raise LookupError(f"no normkit plugin provides framework {name!r}; installed: {sorted(known)}")
    return importlib.import_module(known[name])


def kernel(op: str, xp: object, device: object, dtype: object, layout: str = "any"):  # noqa: ANN201
    """The fused kernel a plugin offers for this configuration, or None. Call once, keep the answer."""
    return plugin_manager().hook.normkit_kernel(op=op, xp=xp, device=device, dtype=dtype, layout=layout)
