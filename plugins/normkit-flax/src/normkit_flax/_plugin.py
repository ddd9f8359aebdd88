"""normkit's entry point for Flax NNX (group ``normkit``, name ``flax``).

Thin on purpose: importing this module imports neither jax nor flax. jax arrays need no namespace
hook (normkit serves ``jax.numpy`` itself) and the layers need no fused kernel: their fast path is
their Flax twin's own code (``_policy``). ``testing.FlaxHarness`` joins the shared matrix (hook
``normkit_test_harnesses``) once ``get_state``/``from_state`` exist: the portability suite needs them.
"""

from __future__ import annotations

from normkit import hookimpl

__all__ = ["normkit_frameworks"]


@hookimpl
def normkit_frameworks() -> dict[str, str]:
    return {"flax": "normkit_flax"}
