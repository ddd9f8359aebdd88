"""The Keras plugin's kernel policy: ``"auto"`` (the kernels ``_plugin.KERNELS`` offers) or ``"core"``.

Initial value: the environment variable ``NORMKIT_KERAS_KERNELS``. Read when a layer's ``call`` (or
a ``normkit`` function) runs in Python: on TensorFlow that is when a ``tf.function`` traces, so a
function traced before a change keeps its path; retrace (or recompile the model) after one.
``normkit.plugin.kernels.use_policy`` switches every plugin's policy at once.

A value of ``NORMKIT_KERAS_KERNELS`` other than ``auto``/``core`` never stops the plugin from loading
(its TensorFlow and KerasTensor namespaces keep working): every layer call and ``get_kernel_policy``
raise a ValueError naming the variable, the allowed values and the value found, and normkit's
functions on TensorFlow/JAX arrays warn once and run the core, until ``set_kernel_policy`` (or
``use_policy``) gives a policy.
"""

from __future__ import annotations

import os

from normkit.plugin.kernels import KERNEL_POLICIES, KernelPolicy, current_override

__all__ = ["POLICY", "KERNEL_POLICIES", "set_kernel_policy", "get_kernel_policy"]

ENV_VAR = "NORMKIT_KERAS_KERNELS"


class _EnvironmentPolicy(KernelPolicy):
    """A ``KernelPolicy`` whose invalid environment value is an error where the policy is used, not at import."""

    def __init__(self, env_var: str) -> None:
        raw = os.environ.get(env_var)
        self.invalid = raw if (raw or "").strip().lower() not in ("", *KERNEL_POLICIES) else None
        self._warned = False
        super().__init__(env_var if self.invalid is None else "")  # "": a variable never set, so "auto" for now
        self.env_var = env_var

    def check(self) -> None:
        """Raise the ValueError for a bad environment value (unless ``set`` or ``use_policy`` gave a policy)."""
        if self.invalid is not None and current_override() is None:
            raise ValueError(
                f"the environment variable {self.env_var} must be one of {KERNEL_POLICIES} (or unset), got "
                f"{self.invalid!r}: fix or unset it, or call normkit_keras.set_kernel_policy('auto' or 'core')")

    def set(self, policy: str) -> str:
        previous = super().set(policy)
        self.invalid = None
        return previous

    def get(self) -> str:
        self.check()
        return super().get()

    def enabled(self) -> bool:
        """Asked by the kernel hook (whose errors normkit's plugin manager turns into warnings): a bad environment
        value warns once and leaves the kernels off for normkit's functions; the layers raise (``check``)."""
        if self.invalid is not None and current_override() is None:
            if not self._warned:
                self._warned = True
                import warnings

                try:
                    self.check()
                except ValueError as exc:
                    warnings.warn(f"{exc} (normkit's functions run the core until then)", RuntimeWarning, stacklevel=2)
            return False
        return super().enabled()


POLICY = _EnvironmentPolicy(ENV_VAR)


def set_kernel_policy(policy: str) -> str:
    """Choose ``"auto"`` (TensorFlow's fused kernels where offered) or ``"core"``; returns the previous policy."""
    return POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return POLICY.get()
