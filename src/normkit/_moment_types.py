"""The result types of one pass over the data, shared by the generic algorithms (``_moments``) and NumPy's fast
path (``_numpy_fast``): both build them, neither imports the other to do so."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Centered", "Fitted"]


class Centered(NamedTuple):
    """What one pass over ``x`` leaves behind (keepdims): ``x - mean == centered - residual``.

    ``centered`` is the full-size ``x - (mean - residual)``; callers reuse it for the output as
    ``centered * scale + (bias - residual * scale)``, which needs no further full-size pass.
    """

    mean: Any
    centered: Any
    residual: Any
    var: Any
    count: Any


class Fitted(NamedTuple):
    """NaN-ignoring statistics of ``x`` over the reduced axes (keepdims), as the fitting functions use them.

    ``scale`` is an exact power of two per feature that brings ``max |x|`` into [1, 4) (1 where a
    feature has no finite value); ``mean``/``var`` (biased) are those of ``x * scale`` over the
    ``count`` non-NaN values, so ``mean(x) = mean / scale`` and ``var(x) = var / scale**2``.
    ``min``/``max`` are x's own (+inf/-inf for a feature with no value: the identities of a merge).
    ``x * scale - mean == centered - residual`` (full size, NaN where x is NaN), as in ``Centered``.
    """

    count: Any
    mean: Any
    var: Any
    min: Any
    max: Any
    scale: Any
    centered: Any
    residual: Any
