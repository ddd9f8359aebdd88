"""normkit-flax tests: float64 cases need jax_enable_x64 (set before any array is made)."""

import jax

jax.config.update("jax_enable_x64", True)
