"""Data standardization: z-scores and min-max scaling per feature, as scikit-learn defines them.

standardize:   z = (x - mean) / std, std the population standard deviation; a constant feature gives 0.
min_max_scale: y = lo + (x - min) / (max - min) * (hi - lo); a constant feature gives lo.

Fitting follows scikit-learn: NaN is ignored when the statistics are fitted and kept in the
output. Each feature is computed on ``x * scale``, ``scale`` an exact power of two that brings its
largest magnitude near 1 (``fit_moments``), so subnormal data (whose squares underflow) and huge
data (whose range or squares overflow) keep their answers. 1-D ``x`` with a feature axis is one
sample per feature: fitting on it is refused, as scikit-learn refuses it.
"""

from __future__ import annotations

from typing import Any

from normkit._backend import backend
from normkit._moments import fit_moments, power_of_two_scale, scalar_like
from normkit._namespace import array_namespace
from normkit._validate import as_param, compute_dtype, feature_axis, require_floating, samples_per_feature

__all__ = ["standardize", "min_max_scale"]


def _prepare(x: Any, axis: int | None, named: tuple, xp: Any) -> tuple:
    if xp is None:
        xp = array_namespace(("x", x), *named)
    require_floating(xp, x)
    if axis is None:
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
        if len(arr.shape) != 0:  # len(shape): a tf.Variable has a shape but no ndim
            raise ValueError(f"{name} must be a scalar when axis=None, got shape {tuple(arr.shape)}")
        return arr
    return xp.reshape(as_param(xp, value, name, pshape, dtype, like), bshape)


def _zero_to_one(xp: Any, a: Any) -> Any:
    """Replace exact zeros by 1 so a constant feature is left centered instead of divided by zero."""
    return xp.where(xp.equal(a, xp.zeros_like(a)), xp.ones_like(a), a)


def _back(xp: Any, y: Any, x: Any) -> Any:
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


def standardize(
    x: Any, *, axis: int | None = -1, mean: Any = None, std: Any = None, xp: Any = None
) -> Any:
    """Z-scores of ``x`` per feature along ``axis``: ``(x - mean) / std`` with the population std.

    ``mean`` and ``std`` fitted earlier (e.g. ``Moments.mean`` and ``Moments.std`` on training data)
    are used when given; otherwise both come from ``x``, ignoring NaN (scikit-learn's rule: NaN
    stays NaN in the output; pass a NumPy masked array as ``x.filled(np.nan)``). A zero std is
    treated as 1; the gradient of a constant feature is finite (0 through its std).
    """
    xp, axes, pshape, bshape, dtype, xc = _prepare(x, axis, (("mean", mean), ("std", std)), xp)
    m = _stat(xp, mean, "mean", pshape, bshape, dtype, x)
    s = _stat(xp, std, "std", pshape, bshape, dtype, x)
    if m is not None and s is not None:
        return _back(xp, (xc - m) / _zero_to_one(xp, s), x)
    samples_per_feature(x, axis, axes, "standardize")
    fit = fit_moments(xp, xc, axes)  # statistics of u = x * scale; z is the same on u as on x
    if m is None:
        var = fit.var
    else:  # the root mean square deviation about the given mean, over the non-NaN values
        d = xc * fit.scale - m * fit.scale
        d0 = xp.where(xp.equal(d, d), d, scalar_like(xp, 0.0, d))
        var = xp.sum(d0 * d0, axis=axes, keepdims=True) / xp.maximum(fit.count, scalar_like(xp, 1.0, fit.count))
    if s is None:
        # where before sqrt, not after: sqrt's gradient at 0 is inf, and inf * 0 is NaN
        sd = xp.sqrt(_zero_to_one(xp, var))
    else:
        sd = _zero_to_one(xp, s) * fit.scale
    if m is not None:
        return _back(xp, d / sd, x)
    # u - mean as centered - residual: the fitted mean is never rounded into the difference
    fast = backend(xp).fast_for(fit.centered)
    if fast is not None:  # fit.centered is our own temporary: scaled in place
        inv = 1.0 / sd
        return _back(xp, fast.scale_shift_in_place(fit.centered, inv, -fit.residual * inv), x)
    return _back(xp, (fit.centered - fit.residual) / sd, x)


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
    given; otherwise they come from ``x``, ignoring NaN (NaN stays NaN in the output; pass a NumPy
    masked array as ``x.filled(np.nan)``). A constant
    feature maps to ``feature_range[0]``. The range is computed on ``x * scale`` (a power of two),
    so neither a range beyond the dtype's largest value nor subnormal data gives inf or NaN.
    """
    lo, hi = feature_range
    if not float(lo) < float(hi):
        raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
    xp, axes, pshape, bshape, dtype, xc = _prepare(x, axis, (("data_min", data_min), ("data_max", data_max)), xp)
    dmin = _stat(xp, data_min, "data_min", pshape, bshape, dtype, x)
    dmax = _stat(xp, data_max, "data_max", pshape, bshape, dtype, x)
    fast = backend(xp).fast_for(xc)
    if dmin is None or dmax is None:
        samples_per_feature(x, axis, axes, "min_max_scale")
        if fast is not None:
            lo_x, hi_x = fast.nan_min_max(xc, axes, not xc.size or bool(xp.any(xp.isnan(xc))))
        else:
            valid = xp.equal(xc, xc)
            lo_x = xp.min(xp.where(valid, xc, scalar_like(xp, float("inf"), xc)), axis=axes, keepdims=True)
            hi_x = xp.max(xp.where(valid, xc, scalar_like(xp, float("-inf"), xc)), axis=axes, keepdims=True)
        dmin = lo_x if dmin is None else dmin
        dmax = hi_x if dmax is None else dmax
    scale = power_of_two_scale(xp, xp.maximum(xp.maximum(-dmin, dmin), xp.maximum(-dmax, dmax)))
    low = dmin * scale
    span = _zero_to_one(xp, dmax * scale - low)
    width, lo = float(hi) - float(lo), float(lo)
    if fast is not None:
        return _back(xp, fast.min_max_in_place(xc, scale, low, span, width, lo), x)
    y = (xc * scale - low) / span
    if width != 1.0:
        y = y * width
    if lo != 0.0:
        y = y + lo
    return _back(xp, y, x)
