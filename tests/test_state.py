"""normkit.NormState: validation, immutability, exact to_dict/from_dict, the momentum complement, copy planning."""

from __future__ import annotations

import json

import numpy as np
import pytest

import normkit as nk
from normkit import NormState, StateCopyReport


def batch_state(dtype: str = "float32", **changes) -> NormState:
    rng = np.random.default_rng(0)
    storage = "float32" if dtype == "bfloat16" else dtype
    values = dict(
        kind="batch", shape=(4,), weight=rng.standard_normal(4).astype(storage),
        bias=rng.standard_normal(4).astype(storage), running_mean=rng.standard_normal(4).astype(storage),
        running_var=rng.uniform(0.1, 2.0, 4).astype(storage), eps=1e-5, momentum=0.1, running_var_correction=1,
        num_batches_tracked=7, feature_axis=1, input_rank=4, dtype=dtype, source="test",
    )
    values.update(changes)
    return NormState(**values)


def bitwise(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_to_dict_is_json_and_round_trips_bitwise(dtype):
    state = batch_state(dtype)
    data = json.loads(json.dumps(state.to_dict()))
    assert isinstance(data["weight"], list) and isinstance(data["shape"], list)
    again = NormState.from_dict(data)
    assert again == state and not again.differences(state)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert bitwise(getattr(again, name), getattr(state, name)), name
    assert again.weight.dtype == np.dtype("float32" if dtype == "bfloat16" else dtype)


@pytest.mark.parametrize("state", [
    NormState("layer", (2, 3), weight=np.ones((2, 3), "float32"), eps=1e-3, normalized_axes=(-2, -1)),
    NormState("rms", (5,), eps=1e-6, normalized_axes=(-1,), dtype="float64"),
    NormState("group", (6,), bias=np.zeros(6, "float32"), num_groups=3, feature_axis=-1, input_rank=3),
    NormState("instance", (3,), feature_axis=1),
], ids=["layer", "rms", "group", "instance"])
def test_every_kind_round_trips_through_json(state):
    assert NormState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_arrays_are_read_only_copies():
    w = np.ones(4, "float32")
    state = batch_state(weight=w)
    w[0] = 5.0
    assert state.weight[0] == 1.0  # the caller's array does not reach the state
    with pytest.raises(ValueError):
        state.weight[0] = 2.0
    with pytest.raises(AttributeError):
        state.eps = 1.0  # frozen


def test_equality_is_bitwise_and_ignores_source():
    state = batch_state()
    assert state == batch_state(source="elsewhere")
    nudged = state.running_var.copy()
    nudged[0] = np.nextafter(nudged[0], np.float32(3))
    other = state.replace(running_var=nudged)
    assert other != state and state.differences(other) == ["running_var"]
    assert state.differences(state.replace(eps=1e-3, momentum=None)) == ["eps", "momentum"]
    assert state.differences(state.replace(feature_axis=-1), ignore=("feature_axis",)) == []


def test_derived_flags():
    s = batch_state(bias=None)
    assert s.scaled and not s.centered and s.affine and s.track_running_stats
    s = batch_state(weight=None, bias=None, running_mean=None, running_var=None, momentum=None,
                    running_var_correction=None, num_batches_tracked=None)
    assert not s.affine and not s.track_running_stats
    ln = NormState("layer", (4, 5), normalized_axes=(2, 3), input_rank=4)
    assert ln.trailing_axes == (-2, -1)
    assert NormState("layer", (4, 5), normalized_axes=(1, 2)).trailing_axes is None  # rank unknown


@pytest.mark.parametrize("m", [0.1, 0.01, 0.3, 0.5, 0.001, 0.0, 1.0, 0.123456, 0.25, 0.0003])
def test_momentum_complement_is_an_exact_involution(m):
    keras_m = NormState.complement(m)
    assert NormState.complement(keras_m) == m
    assert abs(keras_m - (1.0 - m)) <= np.spacing(1.0)  # the decimal 1 - m, within an ulp of the binary one


def test_momentum_complement_of_keras_defaults():
    assert NormState.complement(0.99) == 0.01 and NormState.complement(0.9) == 0.1
    assert 1.0 - (1.0 - 0.1) != 0.1  # why it is done in decimal


@pytest.mark.parametrize("changes, message", [
    ({"kind": "batchnorm"}, "kind must be one of"),
    ({"shape": (0,)}, "positive sizes"),
    ({"weight": np.ones(3, "float32")}, r"weight must have shape \(4,\), got \(3,\)"),
    ({"weight": np.ones(4, "int64")}, "floating array"),
    ({"weight": np.full(4, 0.1, "float64")}, "not exact in dtype='float32'"),
    ({"running_mean": None}, "given together"),
    ({"running_var": -np.ones(4, "float32")}, "running_var holds negative values"),
    ({"running_var": np.full(4, np.nan, "float32")}, "running_var must be finite, got 4 non-finite"),
    ({"eps": -1.0}, "eps must be a finite float >= 0"),
    ({"eps": float("nan")}, "eps must be a finite float >= 0"),
    ({"momentum": 1.5}, r"momentum must be None or a float in \[0, 1\]"),
    ({"running_var_correction": 2}, "running_var_correction must be 0"),
    ({"num_batches_tracked": -1}, "num_batches_tracked must be None or an int >= 0"),
    ({"feature_axis": None}, "feature_axis must be an int"),
    ({"feature_axis": 4}, "out of range for input_rank 4"),
    ({"normalized_axes": (-1,)}, "normalized_axes must be None"),
    ({"num_groups": 2}, "num_groups must be None"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_invalid_states_name_the_field(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        batch_state(**changes)


@pytest.mark.parametrize("values, message", [
    (dict(kind="rms", shape=(3,), bias=np.zeros(3, "float32"), normalized_axes=(-1,)), "bias must be None for kind 'rms'"),
    (dict(kind="group", shape=(6,), num_groups=4, feature_axis=1), "num_groups must divide"),
    (dict(kind="layer", shape=(3,), running_mean=np.zeros(3, "float32"), running_var=np.ones(3, "float32"),
          normalized_axes=(-1,)), "no running statistics"),
    (dict(kind="layer", shape=(3, 4), normalized_axes=(-1,)), "2 sorted distinct axes"),
    (dict(kind="layer", shape=(3, 4), normalized_axes=(-1, -2)), "sorted distinct"),
    (dict(kind="layer", shape=(3,)), "normalized_axes is required"),
    (dict(kind="instance", shape=(3,), momentum=0.1, feature_axis=1), "must be None without running statistics"),
])
def test_invalid_kind_specific_fields(values, message):
    with pytest.raises(ValueError, match=message):
        NormState(**values)


def test_from_dict_rejects_unknown_and_missing_keys():
    data = batch_state().to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gamma'\]"):
        NormState.from_dict({**data, "gamma": [1.0]})
    del data["eps"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['eps'\]"):
        NormState.from_dict(data)
    with pytest.raises(TypeError, match="expects a mapping"):
        NormState.from_dict([("kind", "batch")])


def test_replace_validates_and_names_unknown_fields():
    with pytest.raises(TypeError, match=r"no field\(s\) \['gamma'\]"):
        batch_state().replace(gamma=1)
    dropped = batch_state().replace(running_mean=None, running_var=None, momentum=None, running_var_correction=None)
    assert not dropped.track_running_stats


def test_repr_summarizes_arrays():
    text = repr(batch_state())
    assert "weight=<float32 (4,)>" in text and "eps=1e-05" in text and "num_groups" not in text


def test_plan_pairs_in_order_and_reports_leftovers():
    r = StateCopyReport.plan(["a", "b", "c"], ["x", "y"])
    assert r.pairs == [("a", "x"), ("b", "y")] and r.unmatched_source == ["c"] and r.unmatched_target == []
    assert not r.ok and "source layers without a target: ['c']" in str(r)


def test_plan_by_mapping():
    r = StateCopyReport.plan(["a", "b", "c"], ["x", "y", "z"], {"c": "x", "a": "z"})
    assert r.pairs == [("a", "z"), ("c", "x")]
    assert r.unmatched_source == ["b"] and r.unmatched_target == ["y"]
    with pytest.raises(KeyError, match="source layer 'q'"):
        StateCopyReport.plan(["a"], ["x"], {"q": "x"})
    with pytest.raises(KeyError, match="target layer 'q'"):
        StateCopyReport.plan(["a"], ["x"], {"a": "q"})
    with pytest.raises(ValueError, match=r"same target layer\(s\) \['x'\]"):
        StateCopyReport.plan(["a", "b"], ["x"], {"a": "x", "b": "x"})


def test_exported():
    assert nk.NormState is NormState and "NormState" in nk.__all__


def test_norm_states_reads_a_model_of_either_framework_through_its_plugin():
    """normkit.norm_states: a torch model through normkit-torch, a Keras model through normkit-keras (the
    process's Keras backend), NormStates as they are; anything else is a TypeError naming the type."""
    from frameworks import keras, torch  # both frameworks and plugins: test requirements, never skipped
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(4))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.arange(4.0))
    got = nk.norm_states(net)
    assert list(got) == ["1", "2"] and [s.kind for s in got.values()] == ["batch", "layer"]
    assert bitwise(got["1"].running_mean, np.arange(4.0, dtype="float32"))
    model = keras.Sequential([keras.Input((5, 6)), keras.layers.BatchNormalization(momentum=0.9),
                              keras.layers.GroupNormalization(groups=3)])
    states = nk.norm_states(model)
    assert [s.kind for s in states.values()] == ["batch", "group"]
    assert next(iter(states.values())).momentum == 0.1 and next(iter(states.values())).eps == 1e-3
    assert nk.norm_states([batch_state()]) == {"0": batch_state()}
    assert nk.norm_states({"a": batch_state()}) == {"a": batch_state()}
    with pytest.raises(TypeError, match="cannot read normalization states from int"):
        nk.norm_states(3)
