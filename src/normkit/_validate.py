"""Argument checks shared by every normkit function. Each error names the argument, the expected and the received."""

from __future__ import annotations

from typing import Any

from normkit._namespace import device_of, is_array, type_name

__all__ = [
    "feature_axis",
    "reduce_axes",
    "require_floating",
    "compute_dtype",
    "as_param",
    "static_count",
    "positive_eps",
]


def _shape(x: Any) -> tuple:
    return tuple(x.shape)


def feature_axis(axis: int, ndim: int, *, name: str = "axis") -> int:
    """``axis`` as a non-negative int in ``range(ndim)``."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name} must be an int (the feature axis), got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input of rank {ndim} (expected {-ndim} <= {name} < {ndim})")
    return axis % ndim


def reduce_axes(axis: int | tuple[int, ...] | list[int] | None, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Normalized, sorted, de-duplicated reduction axes (Array API convention: the axes reduced)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int) and not isinstance(axis, bool):
        axis = (axis,)
    out = []
    for a in axis:
        out.append(feature_axis(a, ndim, name=name))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={tuple(axis)} names the same axis twice")
    return tuple(sorted(out))


def require_floating(xp: Any, x: Any, name: str = "x") -> None:
    """Refuse integer, boolean and complex input: normalization is defined on real floats only."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}; "
            f"cast it first, e.g. xp.astype({name}, xp.float32)"
        )


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """float16 and bfloat16 are reduced in float32; other floating dtypes in themselves."""
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    return xp.float32


def _shape_matches(got: tuple, want: tuple) -> bool:
    """Equal shapes, where an unknown (symbolic, None) dimension matches anything."""
    return len(got) == len(want) and all(g is None or w is None or g == w for g, w in zip(got, want))


def as_param(xp: Any, value: Any, name: str, shape: tuple, dtype: Any, like: Any) -> Any:
    """``value`` as an array of ``shape`` in ``dtype`` on ``like``'s device; Python numbers and sequences are converted."""
    if value is None:
        return None
    device = device_of(xp, like)
    if is_array(value):
        if not _shape_matches(tuple(value.shape), tuple(shape)):
            raise ValueError(f"{name} must have shape {tuple(shape)} (one value per feature), got shape {tuple(value.shape)}")
        if value.dtype != dtype:
            value = xp.astype(value, dtype)
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float, list, tuple)):
        raise TypeError(f"{name} must be an array, a number or a sequence of numbers, got {type_name(value)}")
    arr = xp.asarray(value, dtype=dtype, device=device)
    if arr.ndim == 0:
        return xp.broadcast_to(arr, shape)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one value per feature), got shape {tuple(arr.shape)}")
    return arr


def static_count(shape: tuple, axes: tuple[int, ...]) -> int | None:
    """Number of elements reduced over ``axes``, or None when a reduced dimension is unknown."""
    n = 1
    for a in axes:
        d = shape[a]
        if d is None:
            return None
        n = n * int(d)
    return n


def positive_eps(eps: float, name: str = "eps") -> float:
    """``eps`` as a float > 0: with eps <= 0 a constant feature divides by zero."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {type(eps).__name__} {eps!r}") from None
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0 (it keeps a constant feature from dividing by zero), got {eps!r}")
    return value
