"""normkit's own hookimpls, registered in code like any plugin's: the core array matrix backends."""

from __future__ import annotations

from typing import Any

from normkit.plugin.spec import hookimpl


@hookimpl
def normkit_test_backends() -> list[Any]:
    from normkit.testing.backends import builtin_backends

    return builtin_backends()
