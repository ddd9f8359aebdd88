"""normkit's entry point for Flax NNX (group ``normkit``, name ``flax``).

Thin on purpose: importing this module imports neither jax nor flax. jax arrays need no namespace
hook (normkit serves ``jax.numpy`` itself) and the layers need no fused kernel: their fast path is
their Flax twin's own code (``_policy``). ``testing.FlaxHarness`` joins the shared matrix (hook
``normkit_test_harnesses``): the conformance suite and, through ``get_state``/``from_state``, portability.
"""

from __future__ import annotations

from typing import Any

from normkit import hookimpl

__all__ = ["normkit_frameworks", "normkit_test_harnesses"]


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    return {"flax": "normkit_flax"}


@hookimpl
def normkit_test_harnesses() -> list[Any]:
    from normkit_flax.testing import FlaxHarness

    return [FlaxHarness()]
