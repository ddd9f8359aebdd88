"""Adversarial NormStates: NaN and inf, wrong shapes and dtypes, float16 limits, the dict round trip.

A ``NormState`` is the currency of every state transfer (torch <-> Keras <-> JSON), so it refuses what no
layer should be given: non-finite statistics or weights (before: accepted, then copied into every framework),
arrays of the wrong shape or kind; ``require_fits`` refuses to put a value into a dtype where it would become
inf (the plugins' set_state/from_state call it). Each refusal names the field, the expected and the received.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from normkit import NormState

FEW = settings(max_examples=15, deadline=None, derandomize=True)
ARRAYS = ("weight", "bias", "running_mean", "running_var")


def batch_state(**changes):
    values = dict(kind="batch", shape=(3,), weight=np.ones(3, "float32"), bias=np.zeros(3, "float32"),
                  running_mean=np.zeros(3, "float32"), running_var=np.ones(3, "float32"), eps=1e-5, momentum=0.1,
                  running_var_correction=1, num_batches_tracked=2, feature_axis=1, input_rank=2)
    values.update(changes)
    return NormState(**values)


@given(field=st.sampled_from(ARRAYS), bad=st.sampled_from([np.nan, np.inf, -np.inf]), at=st.integers(0, 2),
       dtype=st.sampled_from(["float16", "float32", "float64"]))
@FEW
def test_non_finite_values_are_refused_by_field(field, bad, at, dtype):
    value = np.ones(3, dtype)
    value[at] = bad
    arrays = {name: np.ones(3, dtype) for name in ARRAYS}
    arrays[field] = value
    shown = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[str(float(bad))]
    pattern = rf"NormState.{field} must be finite, got 1 non-finite value\(s\) \({shown} at \({at},\)\)"
    with pytest.raises(ValueError, match=pattern):
        batch_state(dtype=dtype, **arrays)
    good = batch_state(dtype=dtype, **{name: np.ones(3, dtype) for name in ARRAYS}).to_dict()
    good[field] = value.tolist()
    with pytest.raises(ValueError, match=pattern):
        NormState.from_dict(good)
    with pytest.raises(ValueError, match=pattern):
        batch_state(dtype=dtype).replace(**{field: value})


def test_many_non_finite_values_are_counted():
    with pytest.raises(ValueError, match=r"running_mean must be finite, got 5 non-finite value\(s\) \(nan at \(0,\), "
                                         r"nan at \(1,\), nan at \(2,\), \.\.\.\)"):
        NormState(kind="batch", shape=(5,), running_mean=np.full(5, np.nan), running_var=np.ones(5), momentum=0.1,
                  running_var_correction=1, feature_axis=1, dtype="float64")


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple).filter(lambda s: s != (3,)),
       field=st.sampled_from(ARRAYS))
@FEW
def test_wrong_shapes_are_refused(shape, field):
    with pytest.raises(ValueError, match=rf"NormState.{field} must have shape \(3,\), got {_re(shape)}"):
        batch_state(**{field: np.ones(shape, "float32")})


@pytest.mark.parametrize("value,kind,pattern", [
    (np.ones(3, "int32"), TypeError, "must be a floating array, got dtype int32"),
    (np.ones(3, bool), TypeError, "must be a floating array, got dtype bool"),
    (np.ones(3, "complex64"), TypeError, "must be a floating array, got dtype complex64"),
    (np.full(3, 0.1, "float64"), ValueError, r"values of dtype float64 are not exact in dtype='float32'"),
    (np.full(3, 1e5, "float64"), None, None),  # exact in float32
])
def test_wrong_dtypes_are_refused(value, kind, pattern):
    if kind is None:
        assert batch_state(running_var=value).running_var.dtype == np.float32
        return
    with pytest.raises(kind, match=f"NormState.weight: {pattern}" if kind is ValueError else pattern):
        batch_state(weight=value)


@pytest.mark.parametrize("changes,pattern", [
    ({"dtype": "float8"}, r"NormState.dtype must be one of .*got 'float8'"),
    ({"eps": float("inf")}, r"NormState.eps must be a finite float >= 0, got inf"),
    ({"momentum": float("nan")}, r"NormState.momentum must be None or a float in \[0, 1\], got nan"),
    ({"momentum": 1.5}, r"NormState.momentum must be None or a float in \[0, 1\], got 1.5"),
    ({"num_batches_tracked": -1}, r"NormState.num_batches_tracked must be None or an int >= 0, got -1"),
    ({"running_var": -np.ones(3, "float32")}, r"NormState.running_var holds negative values .*got np.float32\(-1.0\)"),
])
def test_bad_scalars_are_refused_by_field(changes, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        batch_state(**changes)


# --- dict round trip: bitwise, at every dtype's limits ----------------------------------------------------

def _limits(dtype):
    info = np.finfo(dtype)
    return [0.0, -0.0, float(info.max), -float(info.max), float(info.tiny), float(info.smallest_subnormal), 1.0 / 3.0]


@given(dtype=st.sampled_from(["float16", "float32", "float64"]), data=st.data())
@FEW
def test_dict_round_trip_is_bitwise_at_the_limits(dtype, data):
    pick = st.sampled_from(_limits(dtype))
    values = {name: np.array([data.draw(pick) for _ in range(3)], dtype) for name in ARRAYS}
    values["running_var"] = np.abs(values["running_var"])
    s = batch_state(dtype=dtype, **values)
    back = NormState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and not back.differences(s)
    for name in ARRAYS:
        assert getattr(back, name).tobytes() == values[name].tobytes(), name


def test_bfloat16_states_round_trip_in_float32_storage():
    v = np.array([1.0, 2.0**-126, 3.0 * 2.0**100], "float32")  # exact in bfloat16
    s = batch_state(dtype="bfloat16", weight=v)
    assert s.weight.dtype == np.float32 and NormState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# --- require_fits: the dtype a plugin is about to write into --------------------------------------------

@given(value=st.floats(65520.0, 3e38), field=st.sampled_from(ARRAYS))
@FEW
def test_values_that_overflow_float16_are_refused_naming_the_limit(value, field):
    arr = np.ones(3, "float32")
    arr[1] = np.float32(value)
    s = batch_state(**{field: arr})
    with pytest.raises(ValueError, match=rf"cannot store the state's {field} in Target of dtype float16: it holds "
                                         rf".*above float16's largest finite value 65504.0 \(it would become inf\)"):
        s.require_fits("float16", "Target")
    s.require_fits("bfloat16", "Target")
    s.require_fits("float32", "Target")


@given(value=st.floats(0.0, 65519.99))
@FEW
def test_values_that_round_to_finite_float16_fit(value):
    arr = np.ones(3, "float32")
    arr[0] = np.float32(value)
    if np.float32(value) >= 65520.0:
        return
    batch_state(running_var=arr).require_fits("float16", "Target")
    assert np.isfinite(arr.astype(np.float16)).all()


def test_float64_values_that_overflow_float32_are_refused():
    s = batch_state(dtype="float64", running_var=np.array([1.0, 1e39, 1.0]))
    with pytest.raises(ValueError, match=r"running_var in Target of dtype float32: it holds 1e\+39, above float32's largest"):
        s.require_fits("float32", "Target")
    with pytest.raises(ValueError, match="bfloat16's largest finite value"):
        s.require_fits("bfloat16", "Target")
    s.require_fits("float64", "Target")


def _re(shape):
    import re

    return re.escape(str(tuple(shape)))


def test_numpy_scalars_are_numbers_in_a_state():
    """eps and momentum read from NumPy (np.float32) were refused ('must be None or a float')."""
    s = batch_state(eps=np.float32(1e-3), momentum=np.float64(0.25), num_batches_tracked=np.int64(3))
    assert (s.eps, s.momentum, s.num_batches_tracked) == (float(np.float32(1e-3)), 0.25, 3)
    assert type(s.eps) is float and type(s.momentum) is float and type(s.num_batches_tracked) is int
    with pytest.raises(ValueError, match=r"NormState.momentum must be None or a float in \[0, 1\], got np.True_"):
        batch_state(momentum=np.bool_(True))
