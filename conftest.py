"""Root conftest: every test directory (core and plugins) shares normkit's pytest plugin."""

pytest_plugins = ["normkit.testing.pytest_plugin"]
