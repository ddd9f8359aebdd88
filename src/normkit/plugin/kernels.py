"""Kernel selection, in one place: the policy switch, the table type, loading, and the cached lookup.

A kernel is an optimization with the contract of the normkit function it stands in for: same
arguments, same result within round-off, or ``NotImplemented`` for arguments outside its contract
(the core then computes). Plugins offer kernels through the ``normkit_kernel`` hook, each from a
``KernelTable`` of its own; everything else lives here:

- ``KernelPolicy``: a plugin's ``"auto"``/``"core"`` switch (``"core"``: the generic core, the
  reference every kernel is tested equal to). Every change bumps ``generation()``, which is part
  of every cache key, so no cached choice outlives a policy change.
- ``KernelTable``: ``{(op, device type, dtype name, layout): "module:function"}``, loaded on first use.
- ``lookup``: the hook's answer for one configuration, cached; call it once per module and
  configuration, or per call (a dict read) as the functional API does.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from normkit.plugin.manager import on_plugins_changed, plugin_manager

__all__ = [
    "KERNEL_POLICIES",
    "KernelPolicy",
    "KernelTable",
    "load",
    "generation",
    "use_policy",
    "current_override",
    "lookup",
    "device_type",
    "dtype_name",
    "namespace_name",
]

KERNEL_POLICIES = ("auto", "core")

_LOCK = threading.Lock()
_GENERATION = [0]
_CACHE: dict[tuple, Any] = {}
_MISSING = object()
# set by use_policy in the current thread (contextvars context) only: wins over every KernelPolicy's own value
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("normkit_kernel_policy", default=None)
_OPEN = [0]  # use_policy blocks open in every thread: 0 is the fast path (no override anywhere)
_LAST: list[str | None] = [None]  # the override last set or restored by any thread: what torch.compile traces read


def _tracing() -> bool:
    """True while torch.compile traces: it cannot read a ContextVar (a graph break), only plain globals."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_compiling())


def current_override() -> str | None:
    """The policy ``use_policy`` set for this thread, or None (each plugin's own value applies).

    While torch.compile traces it is the override last set by any thread (a plain global the compiled
    graph is guarded on): with blocks open in several threads at once, compile in one of them only.
    """
    if not _OPEN[0]:
        return None
    if _tracing():
        return _LAST[0]
    return _OVERRIDE.get()


def generation() -> int:
    """A counter bumped by every policy change (and plugin registration): part of every kernel cache key."""
    return _GENERATION[0]


def invalidate() -> None:
    """Forget every cached kernel choice (a policy changed, a plugin came or went)."""
    with _LOCK:
        _GENERATION[0] += 1
        _CACHE.clear()


on_plugins_changed(invalidate)


class KernelPolicy:
    """A process-wide ``"auto"``/``"core"`` switch; ``value`` is a plain attribute, cheap to read per call.

    The first value comes from the environment variable ``env_var``.
    """

    def __init__(self, env_var: str) -> None:
        self.env_var = env_var
        value = os.environ.get(env_var, "auto").strip().lower() or "auto"
        if value not in KERNEL_POLICIES:
            raise ValueError(f"{env_var} must be one of {KERNEL_POLICIES}, got {value!r}")
        self.value = value

    def set(self, policy: str) -> str:
        """Switch to ``policy``; returns the previous one."""
        if policy not in KERNEL_POLICIES:
            raise ValueError(f"kernel policy must be one of {KERNEL_POLICIES}, got {policy!r}")
        previous, self.value = self.value, policy
        if previous != policy:
            invalidate()
        return previous

    def get(self) -> str:
        """The current policy (``use_policy`` overrides it for a block)."""
        return current_override() or self.value

    def enabled(self) -> bool:
        """True when plugin kernels may be used."""
        return (current_override() or self.value) == "auto"


@contextmanager
def use_policy(policy: str) -> Iterator[None]:
    """Every plugin's policy is ``policy`` for the block, those loaded during it included (the test
    matrix runs each backend and each conformance case both ways).

    The override belongs to the thread that enters the block (a ``contextvars`` variable: an asyncio
    task or ``contextvars.copy_context().run`` carries it too); other threads keep seeing the process
    default (each ``KernelPolicy``'s own value), and nesting restores the enclosing block's policy, so
    blocks entered and left by several threads in any interleaving leave the process as it was.
    """
    if policy not in KERNEL_POLICIES:
        raise ValueError(f"kernel policy must be one of {KERNEL_POLICIES}, got {policy!r}")
    with _LOCK:
        token = _OVERRIDE.set(policy)
        _OPEN[0] += 1
        _LAST[0] = policy
    invalidate()
    try:
        yield
    finally:
        with _LOCK:
            _OVERRIDE.reset(token)
            _OPEN[0] -= 1
            _LAST[0] = _OVERRIDE.get()
        invalidate()


def load(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function named ``"package.module:function"`` (a callable is returned as is)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def device_type(device: Any) -> str:
    """``"cpu"``, ``"cuda"``, ... of a device object or string (None: ``"none"``, e.g. inside a graph)."""
    if device is None:
        return "none"
    kind = getattr(device, "type", None) or getattr(device, "platform", None)
    if isinstance(kind, str):
        return kind
    return str(device).split(":")[0].lower()


def namespace_name(xp: Any) -> str:
    """A hashable name of an array namespace: a module's ``__name__``, else its class's dotted name."""
    name = getattr(xp, "__name__", None)
    if isinstance(name, str):
        return name
    return f"{type(xp).__module__}.{type(xp).__qualname__}"


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ... of any library's dtype object."""
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    return str(dtype).rpartition(".")[2]


class KernelTable:
    """A plugin's kernels: ``{(op, device type, dtype name, layout): "module:function"}`` for some namespaces.

    ``layout`` ``"any"`` in an entry matches every layout. ``lookup`` answers None (the core) when
    the policy is ``"core"``, the namespace is not one of ``namespaces`` or no entry matches.
    """

    def __init__(self, entries: dict[tuple[str, str, str, str], str], *, namespaces: Callable[[Any], bool],
                 policy: KernelPolicy) -> None:
        self.entries = dict(entries)
        self.namespaces = namespaces
        self.policy = policy

    def lookup(self, op: str, xp: Any, device: Any, dtype: Any, layout: str = "any") -> Callable[..., Any] | None:
        if not self.policy.enabled() or not self.namespaces(xp):
            return None
        key = (op, device_type(device), dtype_name(dtype))
        target = self.entries.get(key + (layout,)) or self.entries.get(key + ("any",))
        return None if target is None else load(target)


def lookup(op: str, xp: Any, device: Any, dtype: Any, layout: str = "any", *,
           resolve: bool = True) -> Callable[..., Any] | None:
    """The kernel the plugins offer for this configuration, or None; the hook is asked once per key.

    ``resolve=False`` answers from the cache only (None when not yet asked): for callers that must
    not call the hook now, such as code being traced by torch.compile.
    """
    # the thread's override is part of the key: two threads under different policies never share an answer
    key = (op, namespace_name(xp), device_type(device), dtype_name(dtype), layout, current_override(), _GENERATION[0])
    found = _CACHE.get(key, _MISSING)
    if found is not _MISSING or not resolve:
        return None if found is _MISSING else found
    found = plugin_manager().hook.normkit_kernel(op=op, xp=xp, device=device, dtype=dtype, layout=layout)
    with _LOCK:
        if key[-1] == _GENERATION[0]:
            _CACHE[key] = found
    return found
