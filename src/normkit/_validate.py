"""Argument checks shared by every normkit function. Each error names the argument, the expected and the received."""

from __future__ import annotations

import numbers
import operator
from typing import Any

from normkit._backend import concrete_scalar, python_scalar
from normkit._namespace import device_of, is_array, type_name

__all__ = [
    "as_int",
    "feature_axis",
    "reduce_axes",
    "require_floating",
    "compute_dtype",
    "as_param",
    "static_count",
    "positive_eps",
    "nonnegative_eps",
    "momentum_value",
    "num_batches_value",
    "running_stats_shape",
    "mask_weights",
    "two_or_more_values",
    "require_floating_state",
    "samples_per_feature",
]


def _shape(x: Any) -> tuple:
    return tuple(x.shape)


def as_int(value: Any, name: str, what: str) -> int:
    """``value`` as a Python int (NumPy integers accepted); booleans, floats and strings refused by name."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int ({what}), got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int ({what}), got {type(value).__name__} {value!r}") from None


def feature_axis(axis: int, ndim: int, *, name: str = "axis") -> int:
    """``axis`` as a non-negative int in ``range(ndim)``."""
    axis = as_int(axis, name, "the feature axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input of rank {ndim} (expected {-ndim} <= {name} < {ndim})")
    return axis % ndim


def reduce_axes(axis: int | tuple[int, ...] | list[int] | None, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Normalized, sorted, de-duplicated reduction axes (Array API convention: the axes reduced)."""
    if axis is None:
        return tuple(range(ndim))
    if not isinstance(axis, (tuple, list)):
        axis = (as_int(axis, name, "an axis"),)
    out = []
    for a in axis:
        out.append(feature_axis(a, ndim, name=name))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={tuple(axis)} names the same axis twice")
    return tuple(sorted(out))


def require_floating(xp: Any, x: Any, name: str = "x") -> None:
    """Refuse non-arrays and integer, boolean and complex input: normalization is defined on real floats only."""
    if not is_array(x):
        got = "None" if x is None else type(x).__name__
        raise TypeError(f"{name} must be an array, got {got}")
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
    if is_array(value):
        if not _shape_matches(tuple(value.shape), tuple(shape)):
            raise ValueError(f"{name} must have shape {tuple(shape)} (one value per feature), got shape {tuple(value.shape)}")
        if value.dtype != dtype:
            value = xp.astype(value, dtype)
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float, list, tuple)):
        raise TypeError(f"{name} must be an array, a number or a sequence of numbers, got {type_name(value)}")
    arr = xp.asarray(value, dtype=dtype, device=device_of(xp, like))
    if arr.ndim == 0:
        return xp.broadcast_to(arr, shape)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one value per feature), got shape {tuple(arr.shape)}")
    return arr


def static_count(shape: tuple, axes: tuple[int, ...]) -> int | None:
    """Number of elements reduced over ``axes``, or None when a reduced dimension is unknown.

    Unknown is None (tf.function, KerasTensor), NaN (dask after boolean indexing) or symbolic (a torch
    SymInt under torch.export / torch.compile(dynamic=True), a jax shape-polymorphic dimension): ``int()``
    of a symbol would specialize the traced program to this one size.
    """
    n = 1
    for a in axes:
        d = shape[a]
        if d is None or not isinstance(d, (numbers.Integral, float)) or d != d:
            return None
        n = n * int(d)
    return n


def samples_per_feature(x: Any, axis: int | None, axes: tuple[int, ...], what: str) -> None:
    """Fitting statistics per feature needs a sample axis: refuse 1-D input and zero samples, naming both.

    A 1-D ``x`` with a feature axis holds one sample per feature (every z-score would be 0), as
    scikit-learn refuses it; ``axis=None`` (statistics over all of ``x``) takes any rank.
    """
    shape = _shape(x)
    if axis is not None and x.ndim < 2:
        raise ValueError(
            f"{what} expects x with a sample axis and a feature axis (rank >= 2), got x of shape {shape} with "
            f"axis={axis}: that is one sample per feature. Use x[:, None] for one feature, x[None, :] for one "
            "sample, or axis=None for statistics over all of x"
        )
    if static_count(shape, axes) == 0:
        raise ValueError(f"{what} got no samples: x has shape {shape} and the reduced axes {axes} hold no values")


def _real_number(value: Any, name: str, expected: str) -> float:
    """``value`` as a finite float (NumPy scalars too); strings, booleans, None and arrays are refused by name."""
    value = python_scalar(value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if not isinstance(value, (int, float)) and is_array(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return out


def positive_eps(eps: float, name: str = "eps") -> float:
    """``eps`` as a finite float > 0: with eps <= 0 a constant feature divides by zero."""
    value = _real_number(eps, name, "a positive number")
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0 (it keeps a constant feature from dividing by zero), got {eps!r}")
    return value


def nonnegative_eps(eps: float, name: str = "eps") -> float:
    """``eps`` as a finite float >= 0 (inference, and the per-sample norms, accept 0 as torch does)."""
    value = _real_number(eps, name, "a non-negative number")
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {eps!r}")
    return value


def _array_scalar(value: Any, name: str, expected: str) -> float | None:
    """A 0-d real array's value where known now (``concrete_scalar``), None where traced or lazy; other
    shapes and boolean or complex dtypes are refused by name."""
    shape = tuple(value.shape)
    if shape:
        raise ValueError(f"{name} must be {expected} or a 0-d array, got an array of shape {shape}")
    kind = str(value.dtype).rpartition(".")[2]
    if kind.startswith(("bool", "complex")):
        raise TypeError(f"{name} must be {expected}, got a 0-d array of dtype {value.dtype}")
    found = concrete_scalar(value)
    if found is not None and found != found:
        raise ValueError(f"{name} must be {expected}, got a 0-d array holding nan")
    return found


def momentum_value(momentum: Any, name: str = "momentum", *, allow_none: bool = False) -> Any:
    """``momentum`` (the weight of the new batch) as a float in [0, 1]: Python and NumPy numbers, or a 0-d array.

    A 0-d array is range-checked where its value is known now (NumPy, array-api-strict, eager torch and
    jax, eager TensorFlow; ``concrete_scalar``) and returned as is; a traced or lazy one (jax.jit,
    torch.compile, dask, tf.function) cannot be checked without breaking the trace and is taken as is.
    """
    if momentum is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number in [0, 1], got None")
    momentum = python_scalar(momentum)
    if not isinstance(momentum, (int, float)) and is_array(momentum):
        found = _array_scalar(momentum, name, "a number in [0, 1]")
        if found is not None and not 0.0 <= found <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (the weight of the new batch), got a 0-d array holding {found!r}")
        return momentum
    value = _real_number(momentum, name, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the weight of the new batch), got {momentum!r}")
    return value


def num_batches_value(num_batches: Any, name: str = "num_batches") -> Any:
    """``num_batches`` (batches averaged by ``momentum=None``, this one included) as a number >= 1, or a 0-d
    array (checked where its value is known now, as ``momentum_value`` does)."""
    expected = "a count of batches >= 1 (this batch included)"
    if num_batches is None:
        raise ValueError(f"momentum=None (a cumulative average) needs {name}, the number of batches averaged")
    num_batches = python_scalar(num_batches)
    if not isinstance(num_batches, (int, float)) and is_array(num_batches):
        found = _array_scalar(num_batches, name, expected)
        if found is not None and not found >= 1:
            raise ValueError(f"{name} must be {expected}, got a 0-d array holding {found!r}")
        return num_batches
    value = _real_number(num_batches, name, expected)
    if not value >= 1:
        raise ValueError(f"{name} must be {expected}, got {num_batches!r}")
    return value


def running_stats_shape(running_mean: Any, running_var: Any, shape: tuple, what: str | None = None) -> None:
    """``running_mean`` and ``running_var`` must have the per-feature shape ``shape`` exactly (never broadcast)."""
    per = "one value per feature" if what is None else f"one value per feature, as {what}"
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        got = tuple(value.shape)
        if not _shape_matches(got, tuple(shape)):
            raise ValueError(f"{name} must have shape {tuple(shape)} ({per}), got shape {got}")


def require_floating_state(xp: Any, value: Any, name: str) -> None:
    """Running statistics must be floating arrays: an integer buffer would truncate the update."""
    if is_array(value) and not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {value.dtype}: an integer buffer would truncate the update")


def two_or_more_values(x: Any, what: str) -> None:
    """Batch statistics need a batch axis and a feature axis."""
    if x.ndim < 2:
        raise ValueError(f"{what} expects x with a batch axis and a feature axis (rank >= 2), got shape {tuple(x.shape)}")


def mask_weights(xp: Any, mask: Any, x: Any, axis: int) -> Any:
    """``mask`` of rank ``ndim - 1`` (x's shape without the feature axis) or ``ndim``, as a broadcastable array."""
    if mask.ndim == x.ndim - 1:
        mask = xp.expand_dims(mask, axis=axis)
    elif mask.ndim != x.ndim:
        raise ValueError(
            f"mask must have rank {x.ndim - 1} (x's shape without the feature axis) or {x.ndim}, "
            f"got shape {tuple(mask.shape)} for x of shape {tuple(x.shape)}"
        )
    for i, (m, d) in enumerate(zip(mask.shape, x.shape)):
        if m is not None and d is not None and m not in (1, d):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)} (axis {i})")
    return mask
