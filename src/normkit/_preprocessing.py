"""Data standardization: z-scores and min-max scaling per feature, as scikit-learn defines them.

standardize:   z = (x - mean) / std, std the population standard deviation; a constant feature gives 0.
min_max_scale: y = lo + (x - min) / (max - min) * (hi - lo); a constant feature gives lo.
"""

from __future__ import annotations

from typing import Any

from normkit._moments import centered_moments
from normkit._namespace import array_namespace
from normkit._validate import as_param, compute_dtype, feature_axis, require_floating

__all__ = ["standardize", "min_max_scale"]


def _prepare(x: Any, axis: int | None, named: tuple, xp: Any) -> tuple:
    if xp is None:
        xp = array_namespace(("x", x), *named)
    require_floating(xp, x)
    if axis is None:
        f = None
        axes = tuple(range(x.ndim))
        pshape: tuple = ()
        bshape: tuple = tuple(1 for _ in range(x.ndim))
    else:
        f = feature_axis(axis, x.ndim)
        axes = tuple(i for i in range(x.ndim) if i != f)
        pshape = (x.shape[f],)
        bshape = tuple(x.shape[f] if i == f else 1 for i in range(x.ndim))
    dtype = compute_dtype(xp, x.dtype)
    xc = x if x.dtype == dtype else xp.astype(x, dtype)
    return xp, axes, pshape, bshape, dtype, xc


def _stat(xp: Any, value: Any, name: str, pshape: tuple, bshape: tuple, dtype: Any, like: Any) -> Any:
    if value is None:
        return None
    if pshape == ():
        arr = xp.asarray(value, dtype=dtype) if not hasattr(value, "shape") else xp.astype(value, dtype)
        if arr.ndim != 0:
            raise ValueError(f"{name} must be a scalar when axis=None, got shape {tuple(arr.shape)}")
        return arr
    return xp.reshape(as_param(xp, value, name, pshape, dtype, like), bshape)


def _zero_to_one(xp: Any, a: Any) -> Any:
    """Replace exact zeros by 1 so a constant feature is left centered instead of divided by zero."""
    one = xp.ones_like(a)
    return xp.where(xp.equal(a, xp.zeros_like(a)), one, a)


def standardize(
    x: Any, *, axis: int | None = -1, mean: Any = None, std: Any = None, xp: Any = None
) -> Any:
    """Z-scores of ``x`` per feature along ``axis``: ``(x - mean) / std`` with the population std.

    ``mean`` and ``std`` fitted earlier (e.g. ``Moments.mean`` and ``Moments.std`` on training data)
    are used when given; otherwise both come from ``x``. A zero std is treated as 1.
    """
    xp, axes, pshape, bshape, dtype, xc = _prepare(x, axis, (("mean", mean), ("std", std)), xp)
    m = _stat(xp, mean, "mean", pshape, bshape, dtype, x)
    s = _stat(xp, std, "std", pshape, bshape, dtype, x)
    if m is None or s is None:
        c = centered_moments(xp, xc, axes)
        var = c.var
        if m is None:
            m = c.mean
        if s is None:
            s = xp.sqrt(var) if mean is None else xp.sqrt(xp.mean((xc - m) * (xc - m), axis=axes, keepdims=True))
    y = (xc - m) / _zero_to_one(xp, s)
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


def min_max_scale(
    x: Any,
    *,
    axis: int | None = -1,
    feature_range: tuple[float, float] = (0.0, 1.0),
    data_min: Any = None,
    data_max: Any = None,
    xp: Any = None,
) -> Any:
    """Scale ``x`` per feature along ``axis`` linearly onto ``feature_range``.

    ``data_min``/``data_max`` fitted earlier (e.g. ``Moments.min``/``Moments.max``) are used when
    given; otherwise they come from ``x``. A constant feature maps to ``feature_range[0]``.
    """
    lo, hi = feature_range
    if not float(lo) < float(hi):
        raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
    xp, axes, pshape, bshape, dtype, xc = _prepare(x, axis, (("data_min", data_min), ("data_max", data_max)), xp)
    dmin = _stat(xp, data_min, "data_min", pshape, bshape, dtype, x)
    dmax = _stat(xp, data_max, "data_max", pshape, bshape, dtype, x)
    if dmin is None:
        dmin = xp.min(xc, axis=axes, keepdims=True) if axes else xc
    if dmax is None:
        dmax = xp.max(xc, axis=axes, keepdims=True) if axes else xc
    scale = (float(hi) - float(lo)) / _zero_to_one(xp, dmax - dmin)
    y = (xc - dmin) * scale + float(lo)
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)
