"""The Keras plugin's kernel policy: ``"auto"`` (the kernels ``_plugin.KERNELS`` offers) or ``"core"``.

Initial value: the environment variable ``NORMKIT_KERAS_KERNELS``. Read when a layer's ``call`` (or
a ``normkit`` function) runs in Python: on TensorFlow that is when a ``tf.function`` traces, so a
function traced before a change keeps its path; retrace (or recompile the model) after one.
``normkit.plugin.kernels.use_policy`` switches every plugin's policy at once.
"""

from __future__ import annotations

from normkit.plugin.kernels import KERNEL_POLICIES, KernelPolicy

__all__ = ["POLICY", "KERNEL_POLICIES", "set_kernel_policy", "get_kernel_policy"]

POLICY = KernelPolicy("NORMKIT_KERAS_KERNELS")


def set_kernel_policy(policy: str) -> str:
    """Choose ``"auto"`` (TensorFlow's fused kernels where offered) or ``"core"``; returns the previous policy."""
    return POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return POLICY.get()
