"""NumPy's fast path for batch norm: C-contiguous ndarrays, one full-size temporary, in place on it.

The generic Array API path allocates x - shift, the centred data and its square; NumPy cannot
fuse them, so here the centring happens in place on one temporary of our own (never on the
input) and the squares are summed by BLAS dots. Same algorithm as ``_moments.centered_moments``
(corrected two-pass); the matrix's numpy backend proves the two equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normkit._moment_types import Centered, Fitted

__all__ = ["applies", "centered_moments", "fit_moments", "nan_min_max", "min_max_in_place", "scale_shift_in_place"]

_VECDOT_MIN_RUN = 256
_BLOCK = 64


def applies(x: Any) -> bool:
    """True for a non-empty C-contiguous NumPy array: the training forward then runs ``centered_moments``.

    Asked only for arrays of array-api-compat's NumPy namespace (``_backend``'s table holds this module for it).
    """
    return type(x) is np.ndarray and x.flags.c_contiguous and x.size > 0


def centered_moments(xc: Any, f: int, count: int) -> Centered:
    """``Centered`` (keepdims) for NumPy with one full-size temporary, ``centered``.

    x is viewed as (outer, C, run). ``s = x - mean(x)`` is our own temporary (never the input);
    its residual mean refines the mean (the corrected two-pass of ``_moments``). The squares are summed
    without a second temporary: with runs of >= 256 values per feature (NCHW images) by a BLAS
    dot per run (``vecdot``), about ten times faster than ``mean(c * c)``; otherwise by ``einsum``.
    """
    outer = 1
    for d in xc.shape[:f]:
        outer *= int(d)
    c = int(xc.shape[f])
    x3 = np.reshape(xc, (outer, c, -1))
    run = x3.shape[2]
    # the first mean, accurate to float32 rounding: numpy sums a contiguous run pairwise (accurate)
    # but accumulates across rows naively, so the rows are summed in float64
    first = (_row_sum(x3, run) / count).astype(xc.dtype, copy=False)
    s = np.subtract(x3, first)
    # the residual's rows too: sorted data drifts in a naive float32 sum (1e6 rows: 1e-5 std)
    residual = (_row_sum(s, run) / count).astype(xc.dtype, copy=False)
    if run >= _VECDOT_MIN_RUN:
        ssq = np.add.reduce(np.vecdot(s, s, axis=-1), axis=0, dtype=np.float64)
    else:
        ssq = _blocked_square_sum(s)
    bshape = tuple(c if i == f else 1 for i in range(xc.ndim))
    r = np.reshape(residual, bshape)
    var = np.maximum(np.reshape(ssq / count, bshape) - r * r, 0).astype(xc.dtype, copy=False)
    mean = np.reshape(first + residual, bshape)
    return Centered(mean, np.reshape(s, xc.shape), r, var, count)


def _row_sum(x3: Any, run: int) -> Any:
    """``sum`` over axes 0 and 2 of ``(outer, C, run)`` (keepdims), rows added in float64.

    A contiguous run is summed pairwise (accurate); across rows numpy adds naively, so rows are
    added in float32 blocks of ``_BLOCK`` and the block sums in float64 (a float64 reduction of
    every row costs 15% of a training step on dense and channels-last input).
    """
    rows = x3 if run == 1 else np.add.reduce(x3, axis=2, keepdims=True)
    outer = rows.shape[0]
    blocks = outer // _BLOCK
    head = blocks * _BLOCK
    total = np.add.reduce(rows[head:], axis=0, keepdims=True, dtype=np.float64)
    if blocks:
        partial = np.add.reduce(rows[:head].reshape((blocks, _BLOCK) + rows.shape[1:]), axis=1)
        total += np.add.reduce(partial, axis=0, keepdims=True, dtype=np.float64)
    return total


def _blocked_square_sum(s: Any) -> Any:
    """``sum(s * s)`` over axes 0 and 2 of ``(outer, C, run)``, in float32 blocks of ``_BLOCK`` rows added in float64.

    einsum accumulates across rows naively: one huge square first (an outlier) then swallows every
    later small one (1e6 rows: 0.6% of the variance lost). Blocks bound the loss to one block's worth.
    """
    outer = s.shape[0]
    blocks = outer // _BLOCK
    head = blocks * _BLOCK
    total = np.zeros(s.shape[1], dtype=np.float64)
    if blocks:
        s4 = s[:head].reshape((blocks, _BLOCK) + s.shape[1:])
        total += np.add.reduce(np.einsum("bijk,bijk->bj", s4, s4), axis=0, dtype=np.float64)
    if head < outer:
        total += np.einsum("ijk,ijk->j", s[head:], s[head:])
    return total


def scale_shift_in_place(centered: Any, scale: Any, bias: Any) -> Any:
    """``centered * scale + bias`` written over ``centered`` (a temporary of ours); ``bias`` may be None."""
    y = np.multiply(centered, scale, out=centered)
    if bias is not None:
        np.add(y, bias, out=y)
    return y


def fit_moments(x: Any, axes: tuple[int, ...]) -> Fitted:
    """``_moments.Fitted`` of a NumPy array (NaN ignored, exact power-of-two scale), two full-size temporaries.

    The algorithm of ``_moments.fit_moments``; NaN is left out by the reductions' ``where=`` mask
    instead of a ``where`` copy, the scale comes from ``frexp``, and the centring happens in place
    on ``x * scale`` (our own temporary, which ``standardize`` then scales in place).
    """
    valid = np.equal(x, x)
    mask = {} if valid.all() else {"where": valid}  # eager NumPy: masked reductions only where NaN is
    lo, hi = nan_min_max(x, axes, bool(mask))
    magnitude = np.maximum(-lo, hi)
    _, exponent = np.frexp(np.where(np.isfinite(magnitude) & (magnitude > 0), magnitude, 1))
    limit = -np.finfo(x.dtype).minexp - 1  # 2**limit and 2**-limit are normal numbers
    scale = np.ldexp(np.ones_like(magnitude), np.clip(1 - exponent, -limit, limit))  # magnitude * scale in [1, 2)
    if mask:
        count = np.add.reduce(valid, axis=axes, keepdims=True, dtype=x.dtype)
    else:
        count = np.full(lo.shape, valid.size // lo.size, dtype=x.dtype)
    total = np.maximum(count, 1)
    wide = np.float64 if x.dtype == np.float32 else x.dtype  # numpy sums across rows naively
    centered = np.multiply(x, scale)
    first = (np.add.reduce(centered, axis=axes, keepdims=True, dtype=wide, **mask) / total).astype(x.dtype)
    np.subtract(centered, first, out=centered)
    residual = (np.add.reduce(centered, axis=axes, keepdims=True, dtype=wide, **mask) / total).astype(x.dtype)
    square = np.multiply(centered, centered)
    square = (np.add.reduce(square, axis=axes, keepdims=True, dtype=wide, **mask) / total).astype(x.dtype)
    var = np.maximum(square - residual * residual, 0).astype(x.dtype)
    return Fitted(count, first + residual, var, lo, hi, scale, centered, residual)


def nan_min_max(x: Any, axes: tuple[int, ...], has_nan: bool = True) -> tuple[Any, Any]:
    """Per-feature min and max over ``axes`` (keepdims) ignoring NaN; +inf/-inf for a feature with no value."""
    if not has_nan:
        return np.min(x, axis=axes, keepdims=True), np.max(x, axis=axes, keepdims=True)
    lo = np.fmin.reduce(x, axis=axes, keepdims=True)  # NaN only where a feature has no value
    hi = np.fmax.reduce(x, axis=axes, keepdims=True)
    return np.where(np.isnan(lo), np.inf, lo).astype(x.dtype), np.where(np.isnan(hi), -np.inf, hi).astype(x.dtype)


def min_max_in_place(x: Any, scale: Any, low: Any, span: Any, width: float, lo: float) -> Any:
    """``(x * scale - low) / span * width + lo`` on one temporary of ours (subtraction before division)."""
    y = np.multiply(x, scale)
    np.subtract(y, low, out=y)
    np.divide(y, span, out=y)
    if width != 1.0:
        np.multiply(y, width, out=y)
    if lo != 0.0:
        np.add(y, lo, out=y)
    return y
