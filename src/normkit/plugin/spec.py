"""Every hook a normkit plugin may implement. Signatures and docstrings only.

A plugin is a module (or object) with functions decorated by ``normkit.hookimpl`` whose names
match these specs; it is found through the entry-point group ``normkit``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "normkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def normkit_array_namespace(array: Any) -> Any | None:
    """Return an Array API namespace for ``array``, or None if this plugin does not serve its type.

    Asked once per array type (the answer is cached), only for types neither normkit (numpy,
    torch, jax) nor array-api-compat knows. Read a library from ``sys.modules`` only through
    ``normkit.plugin.manager.imported_module``: another thread may still be importing it.
    """


@hookspec
def normkit_frameworks() -> dict[str, str]:
    """Return ``{framework name: importable module path}`` of the layers this plugin provides.

    The module is imported only when asked for; two plugins naming one framework is an error.
    """


@hookspec(firstresult=True)
def normkit_kernel(op: str, xp: Any, device: Any, dtype: Any, layout: str) -> Callable[..., Any] | None:
    """Return a fused kernel for ``op`` (e.g. ``"batch_norm"``) on this namespace/device/dtype/layout.

    Asked once per (op, namespace, device type, dtype, layout) and kernel policy: the answer is cached
    (``normkit.plugin.kernels.lookup``; a policy change or a plugin (un)registered asks again) and every
    later call, the functional API's per-call lookup included, reads the cache. The kernel takes the
    same arguments as the normkit function it replaces and must give the same result within round-off,
    or return ``NotImplemented`` for arguments outside its contract (the core computes then).
    """


@hookspec
def normkit_test_backends() -> list[Any]:
    """Return ``normkit.testing.Backend`` objects this plugin adds to the shared array matrix."""


@hookspec
def normkit_test_harnesses() -> list[Any]:
    """Return ``normkit.testing.conformance.Harness`` objects: this plugin's layers against native ones."""
