"""Tolerances from float round-off, and the reference's view of the data, for the hostile-input tests.

    |got - want| <= (n + 8) * eps * (1 + |want|) + 2 * tiny

``eps`` and ``tiny`` are the dtype's machine epsilon and smallest normal number, ``n`` the number
of values reduced into one statistic. Summing n values naively errs by at most (n - 1) * eps / 2
of their magnitudes, which for centred values is the standard deviation: an error of n * eps / 2
in a z-score's centre and, through the variance, in its scale (the |want| term); the 8 covers
the few single roundings (centring, division, square root), and the factor 2 a margin. ``tiny``
absorbs results among the subnormals (fewer bits) or flushed to zero (XLA). Where the error is
relative to something else (a mean: |mean| + std), the caller passes ``scale`` instead of 1 + |want|.

The reference runs in ``np.longdouble`` (x86's 80-bit extended precision) on ``x - pivot``: a
float64 reference shares the round-off of a float64 mean (at mean 1e4, std 0.01 its z-scores are
1e-12 off, where normkit's corrected two-pass is not). Libraries that flush subnormal numbers to
zero in every operation (XLA: jax and TensorFlow) see subnormal input as zeros: so does their reference.
"""

from __future__ import annotations

import warnings

import numpy as np

if not np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:
    raise RuntimeError("the hostile-input tests need numpy's extended precision (np.longdouble wider than float64)")


_FLUSHES: dict[tuple[str, str], bool] = {}


def flushes_subnormals(backend, dtype):
    """True where ``backend`` computes with subnormal inputs as zeros (XLA sets flush-to-zero on CPU)."""
    key = (backend.name, dtype)
    if key not in _FLUSHES:
        sub = np.array([np.finfo(dtype).smallest_normal / 4], dtype)
        one = backend.asarray(np.ones(1, dtype))
        _FLUSHES[key] = bool(backend.to_numpy(backend.asarray(sub) * one)[0] == 0)
    return _FLUSHES[key]


def as_seen(backend, x, dtype):
    """``x`` as ``backend`` computes with it (subnormals are zeros where it flushes them), in extended precision."""
    if flushes_subnormals(backend, dtype):
        x = np.where(np.abs(x) < np.finfo(dtype).smallest_normal, 0.0, x)
    return x.astype(np.longdouble)


def pivot(x, axes):
    """The smallest value of each group reduced over ``axes`` (keepdims), to subtract before the reference.

    Every function here is invariant under a shift per group (and the statistics move with it);
    ``x - pivot`` is exact or nearly so in extended precision, so the reference's own mean no
    longer rounds at the scale of the offset (float64 data at 1e4 +- 0.01 needs that).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group: its pivot is NaN, as its output
        return np.nanmin(x, axis=axes, keepdims=True)


def assert_close(got, want, dtype, n, *, what="", scale=None, kinds=None, kind_axis=-1):
    """The module's tolerance: (n + 8) * eps * (scale or 1 + |want|) + 2 * tiny; NaN and inf where the reference has them.

    ``kinds`` names the data along ``kind_axis`` (the kind of each statistic), for the message.
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    info = np.finfo(dtype)
    special = ~np.isfinite(want)
    where = f"{dtype} {what}".strip()
    bad = np.where(special, got, 0.0) != np.where(special, want, 0.0)
    bad &= ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = f" ({kinds[at[kind_axis]]} data)" if kinds is not None else ""
        raise AssertionError(f"{where}: got {got[at]!r} where the reference has {want[at]!r} at {at}{kind}")
    want = np.where(special, 0.0, want)
    scale = 1.0 + np.abs(want) if scale is None else np.where(np.isfinite(scale), scale, 0.0)
    bound = np.broadcast_to((n + 8) * float(info.eps) * scale + 2 * float(info.smallest_normal), want.shape)
    err = np.abs(np.where(special, 0.0, got - want))
    if not (err <= bound).all():
        at = np.unravel_index(np.argmax(err - bound), err.shape)
        kind = f" ({kinds[at[kind_axis]]} data)" if kinds is not None else ""
        raise AssertionError(
            f"{where}: |got - want| = {err[at]:.3g} > {bound[at]:.3g} at {tuple(int(i) for i in at)}{kind} "
            f"(got {got[at]!r}, want {want[at]!r})"
        )
