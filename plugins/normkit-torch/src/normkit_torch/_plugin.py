"""normkit's entry point for PyTorch (group ``normkit``, name ``torch``).

Thin on purpose: loading it never imports torch; the layers module and the harness are named or
imported only when a hook is called.
"""

from __future__ import annotations

from typing import Any

from normkit import hookimpl


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    """The torch framework: its layers live in ``normkit_torch``."""
    return {"torch": "normkit_torch"}


@hookimpl
def normkit_test_harnesses() -> list[Any]:
    """The conformance harness of normkit_torch's modules against torch.nn's."""
    from normkit_torch.testing import TorchHarness

    return [TorchHarness()]
