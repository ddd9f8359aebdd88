"""The portability checks: a layer's ``NormState`` moves between two frameworks exactly, and computes the same.

For every ``PortCase`` (one layer kind, configuration and input layout) and every ordered pair of
frameworks (A, B), each a plugin module with ``get_state``/``from_state`` plus the conformance
harness's NumPy ``forward``:

- ``round_trip``: A -> state -> B -> state -> A gives A's state back bitwise (arrays) and equal
  (scalars); B's state differs from A's only in the fields that describe the holder
  (``CONVENTION_FIELDS``); the state survives JSON on the way.
- ``inference``: A's layer and B's layer built from A's state give the float64 reference's output
  to float32 round-off (``output_tolerance``), on channels-first and channels-last input; a framework
  that cannot hold the case's layout (torch: channels-first only) gets the input transposed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from normkit import NormState
from normkit.testing import reference

__all__ = ["PortCase", "Framework", "CASES", "CHECKS", "CONVENTION_FIELDS", "reference_output", "output_tolerance"]

# fields that say how the holding framework keeps the state, not what the state is
CONVENTION_FIELDS = ("running_var_correction", "feature_axis", "input_rank")


@dataclass(frozen=True)
class PortCase:
    """One layer configuration: its state (in the case's layout) and an input shape in that layout."""

    id: str
    state: NormState
    input_shape: tuple[int, ...]
    layout: Optional[str] = None  # "channels_first" / "channels_last" for batch, group, instance


@dataclass
class Framework:
    """A framework as the checks see it: its plugin module and a NumPy inference call."""

    name: str
    module: Any  # get_state(layer), from_state(state, layout=, input_rank=), set_state(layer, state)
    forward: Callable[[Any, np.ndarray], np.ndarray]

    @classmethod
    def from_harness(cls, harness: Any) -> "Framework":
        """The plugin registered for ``harness.name`` (``normkit.plugin.manager.framework``) and its forward."""
        from normkit.plugin.manager import framework

        return cls(harness.name, framework(harness.name), lambda layer, x: harness.forward(layer, x, training=False))


def _state(kind: str, shape: tuple[int, ...], seed: int, *, dtype: str = "float32", scale: bool = True,
           center: bool = True, running: bool = False, **fields: Any) -> NormState:
    """A state with random, non-trivial arrays (weights near 1, offsets, means, variances in [0.25, 4])."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}
    if scale:
        arrays["weight"] = 1.0 + 0.5 * rng.standard_normal(shape)
    if center:
        arrays["bias"] = 0.5 * rng.standard_normal(shape)
    if running:
        arrays["running_mean"] = rng.standard_normal(shape)
        arrays["running_var"] = rng.uniform(0.25, 4.0, shape)
        fields.setdefault("running_var_correction", 1)
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    return NormState(kind=kind, shape=shape, dtype=dtype, source="normkit.testing.portability", **arrays, **fields)


def _layouts(id: str, kind: str, channels: int, spatial: tuple[int, ...], batch: int, seed: int,
             **kw: Any) -> list[PortCase]:
    """The case twice: features on axis 1 (channels-first) and on the last axis (channels-last)."""
    rank = 2 + len(spatial)
    out = []
    for layout, axis, shape in (("channels_first", 1, (batch, channels) + spatial),
                                ("channels_last", -1, (batch,) + spatial + (channels,))):
        state = _state(kind, (channels,), seed, feature_axis=axis if rank > 2 else 1, input_rank=rank, **kw)
        out.append(PortCase(f"{id}-{layout}", state, shape, layout))
    return out


CASES: list[PortCase] = [
    *_layouts("batch2d", "batch", 6, (5, 3), 4, 1, running=True, eps=1e-4, momentum=0.1, num_batches_tracked=7),
    *_layouts("batch3d-no-bias-float64", "batch", 3, (4, 2, 3), 2, 2, dtype="float64", center=False, running=True,
              eps=1e-5, momentum=0.01),
    PortCase("batch1d-no-affine", _state("batch", (5,), 3, scale=False, center=False, running=True, eps=1e-3,
                                          momentum=0.3, num_batches_tracked=2, feature_axis=1, input_rank=2), (8, 5)),
    *_layouts("instance2d", "instance", 4, (5, 6), 2, 4, eps=1e-5),
    *_layouts("instance1d-no-affine", "instance", 3, (7,), 3, 5, scale=False, center=False, eps=1e-3),
    *_layouts("group2d", "group", 6, (4, 5), 2, 6, num_groups=3, eps=1e-5),
    *_layouts("group1d-no-bias", "group", 8, (5,), 3, 7, num_groups=2, center=False, eps=2e-4),
    PortCase("layer-last", _state("layer", (5,), 8, eps=1e-5, normalized_axes=(-1,)), (3, 4, 5)),
    PortCase("layer-hw-no-bias", _state("layer", (4, 5), 9, center=False, eps=1e-3, normalized_axes=(-2, -1)),
             (3, 6, 4, 5)),
    PortCase("rms-last", _state("rms", (6,), 10, center=False, eps=1e-6, normalized_axes=(-1,)), (2, 3, 6)),
    PortCase("rms-hw", _state("rms", (3, 4), 11, center=False, eps=1e-5, normalized_axes=(-2, -1)), (2, 5, 3, 4)),
]


def reference_output(state: NormState, x: np.ndarray) -> np.ndarray:
    """The float64 inference output of the layer ``state`` describes, on ``x`` in the state's layout."""
    w = None if state.weight is None else state.weight.astype(np.float64)
    b = None if state.bias is None else state.bias.astype(np.float64)
    if state.kind == "batch":
        return reference.batch_norm(x, state.running_mean, state.running_var, w, b, training=False, eps=state.eps,
                                    axis=state.feature_axis)[0]
    if state.kind == "instance":
        return reference.instance_norm(x, w, b, axis=state.feature_axis, eps=state.eps)
    if state.kind == "group":
        return reference.group_norm(x, state.num_groups, w, b, axis=state.feature_axis, eps=state.eps)
    if state.kind == "layer":
        return reference.layer_norm(x, w, b, axis=state.normalized_axes, eps=state.eps)
    return reference.rms_norm(x, w, axis=state.normalized_axes, eps=state.eps)


def output_tolerance(y_ref: np.ndarray, dtype: str) -> float:
    """64 units of roundoff of the largest output: an output passes about ten roundings after statistics
    summed over at most a few hundred terms (blocked or pairwise sums: a few ulps); conventions crossed
    wrongly (eps 1e-5 vs 1e-3, a variance off by n/(n-1)) move outputs by 1e-4 relative or more."""
    return 64 * float(np.finfo(dtype).eps) * max(1.0, float(np.max(np.abs(y_ref))))


def _input(case: PortCase, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(case.input_shape) * 2.0 + 0.5
    return x.astype(case.state.dtype)


def build(fw: Framework, state: NormState, case: PortCase) -> Any:
    """``fw``'s layer for ``state`` in the case's layout, or in the other where ``fw`` holds one only.

    torch's layers are channels-first only, Flax's GroupNorm channels-last only; ``run`` transposes.
    """
    rank = len(case.input_shape)
    if case.layout is None:
        return fw.module.from_state(state, input_rank=rank)
    try:
        return fw.module.from_state(state, layout=case.layout, input_rank=rank)
    except ValueError:
        other = "channels_first" if case.layout == "channels_last" else "channels_last"
        return fw.module.from_state(state, layout=other, input_rank=rank)


def run(fw: Framework, layer: Any, case: PortCase, x: np.ndarray) -> np.ndarray:
    """Inference output of ``layer`` on ``x`` (in the case's layout), transposed in and out as the layer needs."""
    src, dst = case.state.feature_axis, fw.module.get_state(layer).feature_axis
    if src is None or src % x.ndim == dst % x.ndim:
        return fw.forward(layer, x)
    return np.moveaxis(fw.forward(layer, np.ascontiguousarray(np.moveaxis(x, src, dst))), dst, src)


def _assert_equal(got: NormState, want: NormState, what: str, ignore: tuple[str, ...] = ()) -> None:
    diff = got.differences(want, ignore=ignore)
    assert not diff, f"{what}: fields {diff} differ\n  got  {got}\n  want {want}"


def _assert_conventions_only(b: NormState, a: NormState, what: str) -> None:
    """``b`` equals ``a`` but for how the holder keeps it: its variance update, a layout it cannot hold, an unknown rank."""
    _assert_equal(b, a, what, ignore=CONVENTION_FIELDS)
    if a.feature_axis is not None and a.feature_axis != b.feature_axis:
        assert {a.feature_axis, b.feature_axis} == {1, -1}, f"{what}: feature axis {a.feature_axis} -> {b.feature_axis}"
    if a.input_rank is not None and b.input_rank is not None:
        assert a.input_rank == b.input_rank, f"{what}: input_rank {a.input_rank} -> {b.input_rank}"
    assert (a.running_var_correction is None) == (b.running_var_correction is None), what


def check_round_trip(a: Framework, b: Framework, case: PortCase) -> None:
    """A -> state -> B -> state -> A is exact; B's state is A's up to the holder's conventions."""
    sa = a.module.get_state(build(a, case.state, case))
    _assert_conventions_only(sa, case.state, f"{a.name} from_state -> get_state")
    _assert_equal(a.module.get_state(build(a, sa, case)), sa, f"{a.name} -> {a.name}")
    sb = b.module.get_state(build(b, sa, case))
    _assert_conventions_only(sb, sa, f"{a.name} -> {b.name}")
    assert NormState.from_dict(json.loads(json.dumps(sb.to_dict()))) == sb, "JSON round trip"
    _assert_equal(a.module.get_state(build(a, sb, case)), sa, f"{a.name} -> {b.name} -> {a.name}")


def check_inference(a: Framework, b: Framework, case: PortCase) -> None:
    """A's layer and B's layer built from A's state both give the float64 reference to float32 round-off;
    A's layer rebuilt from B's state gives A's output bitwise."""
    x = _input(case)
    y_ref = reference_output(case.state, x)
    tol = output_tolerance(y_ref, case.state.dtype)
    layer_a = build(a, case.state, case)
    sa = a.module.get_state(layer_a)
    layer_b = build(b, sa, case)
    y_a, y_b = run(a, layer_a, case, x), run(b, layer_b, case, x)
    for name, y in ((a.name, y_a), (b.name, y_b)):
        assert y.shape == x.shape and y.dtype == x.dtype, f"{name}: output {y.shape} {y.dtype}"
        err = float(np.max(np.abs(y.astype(np.float64) - y_ref)))
        assert err <= tol, f"{name} output vs float64 reference: max abs error {err:.3g} > {tol:.3g}"
    err = float(np.max(np.abs(y_a.astype(np.float64) - y_b)))
    assert err <= tol, f"{a.name} vs {b.name} output: max abs difference {err:.3g} > {tol:.3g}"
    y_back = run(a, build(a, b.module.get_state(layer_b), case), case, x)
    np.testing.assert_array_equal(y_back, y_a, err_msg=f"{a.name} -> {b.name} -> {a.name} output")


CHECKS: dict[str, Callable[[Framework, Framework, PortCase], None]] = {
    "round_trip": check_round_trip,
    "inference": check_inference,
}
