"""The plugin host: hookspecs (``spec``) and the one lazily built PluginManager (``manager``)."""

from normkit.plugin.manager import frameworks, plugin_manager
from normkit.plugin.spec import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec", "plugin_manager", "frameworks"]
