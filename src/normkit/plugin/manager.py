"""The one PluginManager: built on first use, thread-safe, loads entry points of group ``normkit``.

A plugin that fails, at import or in a hook at call time, is named (plugin, hook, reason) and
skipped, so normkit and every other plugin keep working: a ``PluginLoadWarning``, or with
``NORMKIT_STRICT_PLUGINS=1`` (CI) a ``PluginError`` raised once, at the first call that meets the
failure. After that error the failing plugin (at import) or hook (at call time) stays out of
the way, so one bad plugin never disables a healthy one.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable

import pluggy

from normkit._imports import imported_module
from normkit.plugin import spec

__all__ = [
    "plugin_manager", "frameworks", "framework", "strict", "register", "unregister", "failures",
    "imported_module", "PluginLoadWarning", "PluginError",
]

_LOCK = threading.RLock()
_MANAGER: pluggy.PluginManager | None = None
_DISABLED: set[tuple[str, str]] = set()  # (plugin, hook) that raised in strict mode: skipped since
_FAILURES: list[tuple[str, str, BaseException]] = []
_ON_CHANGE: list[Callable[[], None]] = []  # the caches of answers that depend on the registered plugins


class PluginLoadWarning(UserWarning):
    """A normkit plugin could not be loaded, or one of its hooks raised; it was skipped."""


class PluginError(RuntimeError):
    """Strict mode (``NORMKIT_STRICT_PLUGINS=1``): a normkit plugin failed to load or a hook raised."""


def strict() -> bool:
    """True when ``NORMKIT_STRICT_PLUGINS`` asks for plugin failures to be errors."""
    return os.environ.get("NORMKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def failures() -> list[tuple[str, str, BaseException]]:
    """``(plugin, hook or "load", exception)`` of every plugin failure seen in this process."""
    return list(_FAILURES)


def _hook_failed(plugin: str, hook: str, exc: Exception) -> None:
    _FAILURES.append((plugin, hook, exc))
    message = f"normkit plugin {plugin!r}: its hook {hook}() raised {exc!r}"
    if strict():
        _DISABLED.add((plugin, hook))
        raise PluginError(f"{message} (NORMKIT_STRICT_PLUGINS is set; the hook is skipped from now on)") from exc
    warnings.warn(f"{message}; skipped", PluginLoadWarning, stacklevel=4)


def _guard(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    """``function`` that reports its exceptions by plugin and hook and answers None ("no answer") instead."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if (plugin, hook) in _DISABLED:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of a third party's hook
            _hook_failed(plugin, hook, exc)
            return None

    return guarded


class _Manager(pluggy.PluginManager):
    """pluggy's manager whose every hook implementation is guarded (``_guard``) as it is registered."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        name = super().register(plugin, name)
        if name is None:
            return None
        for caller in self.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _guard(impl.function, name, caller.name)  # type: ignore[misc]
        return name


def _load_entry_points(pm: pluggy.PluginManager) -> list[str]:
    """Register every installed plugin that imports; returns the failures' descriptions."""
    failed = []
    for ep in entry_points(group=spec.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure of a third party's import
            _FAILURES.append((ep.name, "load", exc))
            failed.append(f"normkit plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}")
            if not strict():
                warnings.warn(f"{failed[-1]}; it is skipped", PluginLoadWarning, stacklevel=3)
    return failed


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, with the built-in hookimpls and every installed plugin registered.

    In strict mode a plugin that failed to load raises ``PluginError`` here once, after every
    healthy plugin is registered; later calls return the manager.
    """
    global _MANAGER
    pm = _MANAGER
    if pm is not None:
        return pm
    with _LOCK:
        if _MANAGER is None:
            pm = _Manager(spec.PROJECT)
            pm.add_hookspecs(spec)
            failed = _load_entry_points(pm)
            _MANAGER = pm
            if failed and strict():
                raise PluginError("; ".join(failed) + " (NORMKIT_STRICT_PLUGINS is set)")
        return _MANAGER


def on_plugins_changed(forget: Callable[[], None]) -> None:
    """Call ``forget`` whenever a plugin is registered or unregistered in-process (``register``, ``unregister``).

    The caches of answers that depend on the plugins subscribe as they are defined (the namespace lookup's,
    ``normkit._namespace.clear_cache``; the kernel lookup's, ``normkit.plugin.kernels.invalidate``), so the host
    never imports the modules that ask it. Not in ``__all__``: normkit's own caches use it.
    """
    with _LOCK:
        if forget not in _ON_CHANGE:
            _ON_CHANGE.append(forget)


def _forget_answers() -> None:
    """Cached namespace and kernel answers depend on the registered plugins: drop them."""
    for forget in list(_ON_CHANGE):
        forget()


def register(plugin: object, name: str | None = None) -> str | None:
    """Register a plugin object in-process (tests, notebooks); returns its name."""
    with _LOCK:
        name = plugin_manager().register(plugin, name=name)
        _forget_answers()
        return name


def unregister(plugin: object) -> None:
    """Undo ``register``."""
    with _LOCK:
        pm = plugin_manager()
        name = pm.get_name(plugin)
        pm.unregister(plugin)
        _DISABLED.difference_update({key for key in _DISABLED if key[0] == name})
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


# framework name -> the first-party distribution that provides it (named when it is missing)
_FIRST_PARTY = {"torch": "normkit-torch", "keras": "normkit-keras", "flax": "normkit-flax"}


def framework(name: str) -> ModuleType:
    """Import and return the layers module of framework ``name`` (e.g. ``"torch"``)."""
    known = frameworks()
    if name not in known:
        wanted = _FIRST_PARTY.get(name)
        hint = (f"install the distribution {wanted!r} (pip install {wanted})" if wanted else
                f"install a distribution whose entry point (group {spec.PROJECT!r}) registers {name!r}")
        raise LookupError(f"no normkit plugin provides framework {name!r}; installed: {sorted(known)}; {hint}")
    return importlib.import_module(known[name])
