"""The torch plugin's kernel policy: ``"auto"`` (torch's kernels, ``_plugin.TABLE``) or ``"core"`` (the normkit core).

Initial value: the environment variable ``NORMKIT_TORCH_KERNELS``; ``set_kernel_policy`` changes it. The entry point
(``_plugin``, whose kernel table consults it) and the functional API (``_functional``) both read this one object;
importing it never imports torch.
"""

from __future__ import annotations

from normkit.plugin.kernels import KernelPolicy

__all__ = ["POLICY"]

POLICY = KernelPolicy("NORMKIT_TORCH_KERNELS")
