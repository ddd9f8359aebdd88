"""Kernel policy: whether a plugin's layers may use the fused kernels its ``normkit_kernel`` hook offers.

``"auto"`` (default): the kernel offered for the input's namespace, device, dtype and layout, where
one is; ``"core"``: always the generic normkit core, the reference every kernel is tested equal to.
Each plugin holds one ``KernelPolicy`` whose first value comes from an environment variable.
"""

from __future__ import annotations

import os

__all__ = ["KernelPolicy", "KERNEL_POLICIES"]

KERNEL_POLICIES = ("auto", "core")


class KernelPolicy:
    """A process-wide ``"auto"``/``"core"`` switch; ``value`` is a plain attribute, cheap to read per call."""

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
        return previous

    def get(self) -> str:
        """The current policy."""
        return self.value

    def enabled(self) -> bool:
        """True when plugin kernels may be used."""
        return self.value == "auto"
