"""The Flax plugin's kernel policy: ``"auto"`` (Flax's own computation where the layer asks for it) or ``"core"``.

``"auto"``: a layer with ``use_fast_variance=True`` and no ``axis_name`` runs its Flax twin's own code
(Flax's numbers, bit for bit); ``"core"``: every layer computes with normkit's exact core. Initial
value: ``NORMKIT_FLAX_KERNELS``; ``normkit.plugin.kernels.use_policy`` switches every plugin at once.
Read when a layer's ``__call__`` runs in Python (under ``jax.jit``: when it traces).
"""

from __future__ import annotations

from normkit.plugin.kernels import KERNEL_POLICIES, KernelPolicy

__all__ = ["POLICY", "KERNEL_POLICIES", "set_kernel_policy", "get_kernel_policy"]

POLICY = KernelPolicy("NORMKIT_FLAX_KERNELS")


def set_kernel_policy(policy: str) -> str:
    """Choose ``"auto"`` (Flax's own fast-variance code where a layer asks for it) or ``"core"``; returns the previous one."""
    return POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return POLICY.get()
