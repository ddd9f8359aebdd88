"""Portable state for Keras layers: ``get_state``, ``set_state``, ``from_state``, ``copy_norm_states``.

Keras's conventions, translated here and nowhere else: ``momentum`` is the weight of the old moving
value (the ``NormState`` holds ``1 - momentum``, computed in decimal: 0.99 <-> 0.01 exactly),
``moving_variance`` is updated with the biased batch variance (``running_var_correction=0``) and
copied unchanged (torch's ``running_var`` is the same population-variance estimate at inference),
the feature axis is the layer's ``axis`` (1 channels-first, -1 channels-last), ``center``/``scale``
are a present bias/weight, RMSNormalization's weight is ``scale``, ``GroupNormalization`` with one
channel per group (``groups=-1``) is an instance norm. Keras keeps no batch count: ``set_state``
remembers the state's count on the layer object while its moving statistics stay as written.
Training on from a torch state, Keras folds the biased batch variance: each step's moving_variance
is ``(1 - momentum) * var_B / (n - 1)`` below torch's (n values per feature); inference is identical.
Accepted: normkit_keras's layers and keras.layers' (BatchNormalization, LayerNormalization,
GroupNormalization, RMSNormalization), built.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np

import normkit
from normkit import NormState, StateCopyReport
from normkit_keras import _batch_normalization as _bn, _family as _fam

__all__ = ["get_state", "set_state", "from_state", "norm_states", "copy_norm_states"]

_CLASSES = (
    ("batch", (keras.layers.BatchNormalization, _bn.BatchNormalization)),
    ("layer", (keras.layers.LayerNormalization, _fam.LayerNormalization)),
    ("group", (keras.layers.GroupNormalization, _fam.GroupNormalization)),
    ("rms", (keras.layers.RMSNormalization, _fam.RMSNormalization)),
)
_KNOWN = {"batch": {"gamma", "beta", "moving_mean", "moving_variance"}, "layer": {"gamma", "beta"},
          "group": {"gamma", "beta"}, "rms": {"scale"}}
_COUNT = "_normkit_batch_count"  # (count, moving_mean, moving_variance) as set_state wrote them


def _class_kind(layer: Any) -> Optional[str]:
    for kind, classes in _CLASSES:
        if isinstance(layer, classes):
            return kind
    return None


def _require(layer: Any) -> str:
    kind = _class_kind(layer)
    if kind is None:
        raise TypeError(
            "expected a Keras normalization layer (BatchNormalization, LayerNormalization, GroupNormalization, "
            f"RMSNormalization; keras.layers' or normkit_keras's), got {type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(f"{type(layer).__name__} {layer.name!r} is not built: call layer.build(input_shape) first")
    if kind == "batch" and getattr(layer, "renorm", False):
        raise ValueError("BatchNormalization(renorm=True) keeps renorm statistics a NormState does not carry")
    if kind == "layer" and getattr(layer, "rms_scaling", False):
        raise ValueError("LayerNormalization(rms_scaling=True) is not a layer norm a NormState describes")
    extra = sorted({v.path.split("/")[-1] for v in layer.weights} - _KNOWN[kind])
    if extra:
        raise ValueError(f"{type(layer).__name__} {layer.name!r} carries weights {extra}, which a NormState does not hold")
    return kind


def _numpy(variable: Any) -> Optional[np.ndarray]:
    return None if variable is None else np.asarray(keras.ops.convert_to_numpy(variable.value))


def _rank(layer: Any) -> Optional[int]:
    shape = (layer.get_build_config() or {}).get("input_shape")
    if isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape):
        return len(shape)
    spec = getattr(layer, "input_spec", None)
    return getattr(spec, "ndim", None)


def _feature_axis(axis: int, rank: Optional[int]) -> int:
    """1 for channels-first, negative otherwise (-1 channels-last), where the rank is known."""
    if rank is None:
        return int(axis)
    a = int(axis) % rank
    return 1 if a == 1 else a - rank


def _normalized_axes(layer: Any, rank: Optional[int]) -> tuple[int, ...]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return tuple(sorted(a - rank if (rank is not None and a >= 0) else a for a in axes))


def _weights(layer: Any, kind: str) -> tuple[Any, Any]:
    """(weight, bias) variables: gamma/beta, or RMSNormalization's ``scale``."""
    if kind == "rms":
        return layer.scale, None
    return getattr(layer, "gamma", None), getattr(layer, "beta", None)


def _channels(layer: Any, kind: str, rank: Optional[int]) -> tuple[int, ...]:
    weight, bias = _weights(layer, kind)
    for v in (weight, bias, getattr(layer, "moving_mean", None)):
        if v is not None:
            return tuple(v.shape)
    shape = layer.get_build_config()["input_shape"]
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return tuple(int(shape[a]) for a in axes)


def _counted(layer: Any) -> Optional[int]:
    """The batch count set_state remembered, while the moving statistics are still the ones it wrote."""
    record = layer.__dict__.get(_COUNT)
    if record is None:
        return None
    count, mean, var = record
    same = _numpy(layer.moving_mean).tobytes() == mean.tobytes() and _numpy(layer.moving_variance).tobytes() == var.tobytes()
    return count if same else None


def get_state(layer: Any) -> NormState:
    """The ``NormState`` of a built Keras normalization layer (keras.layers' or normkit_keras's)."""
    kind = _require(layer)
    rank = _rank(layer)
    shape = _channels(layer, kind, rank)
    weight, bias = _weights(layer, kind)
    arrays = {"weight": _numpy(weight), "bias": _numpy(bias)}
    dtype = next((str(v.dtype) for v in (weight, bias, getattr(layer, "moving_mean", None)) if v is not None),
                 layer.variable_dtype)
    extra: dict[str, Any] = {}
    if kind == "batch":
        extra = dict(
            running_mean=_numpy(layer.moving_mean), running_var=_numpy(layer.moving_variance),
            momentum=NormState.complement(layer.momentum), running_var_correction=0, num_batches_tracked=_counted(layer),
        )
    if kind in ("batch", "group"):
        extra["feature_axis"] = _feature_axis(layer.axis, rank)
    if kind == "group":
        groups = int(layer.groups)
        if groups == shape[0]:  # one channel per group (groups=-1): instance norm without running statistics
            kind = "instance"
        else:
            extra["num_groups"] = groups
    if kind in ("layer", "rms"):
        extra["normalized_axes"] = _normalized_axes(layer, rank)
    return NormState(
        kind=kind, shape=shape, **arrays, eps=float(layer.epsilon), input_rank=rank, dtype=dtype,
        source=("keras.layers." if type(layer).__module__.startswith("keras") else "normkit_keras.") + type(layer).__name__,
        **extra,
    )


def _batch_problem(state: NormState) -> Optional[str]:
    """Why Keras's BatchNormalization cannot hold a batch norm ``state`` (None when it can)."""
    if not state.track_running_stats:
        return ("the state has no running statistics (it normalizes with batch statistics at inference); "
                "Keras's BatchNormalization always uses its moving statistics there")
    if state.momentum is None:
        return ("the state's momentum is None (torch's cumulative average), which Keras has no equivalent of: "
                "choose one, e.g. state.replace(momentum=0.01) or from_state(..., momentum=0.99)")
    return None


def _compatible(kind: str, layer: Any, state: NormState) -> Optional[str]:
    """Why ``state`` cannot go into ``layer`` (None when it can)."""
    name = f"{type(layer).__name__} {layer.name!r}"
    rank = _rank(layer)
    channels = _channels(layer, kind, rank)
    if kind == "group":
        groups = int(layer.groups)
        if state.kind == "instance" or (state.kind == "group" and state.num_groups == state.shape[0]):
            if state.track_running_stats:
                return "Keras has no instance normalization with running statistics (torch track_running_stats=True)"
            if groups != channels[0]:
                return f"an instance norm state needs one channel per group; {name} has groups={groups}"
        elif state.kind != "group":
            return f"kind mismatch: a {state.kind} norm state ({state.source or 'NormState'}) cannot go into {name}"
        elif groups != state.num_groups:
            return f"num_groups mismatch: the state has {state.num_groups}, {name} has groups={groups}"
    elif state.kind != kind:
        return f"kind mismatch: a {state.kind} norm state ({state.source or 'NormState'}) cannot go into {name} ({kind} norm)"
    if tuple(state.shape) != channels:
        return f"size mismatch: the state's per-feature shape is {state.shape}, {name} has {channels}"
    if kind == "batch":
        return _batch_problem(state)
    if kind in ("layer", "rms"):
        ours = _normalized_axes(layer, rank)
        theirs = state.trailing_axes or state.normalized_axes
        if tuple(ours) != tuple(theirs):
            return f"{name} normalizes axes {list(ours)}, the state axes {list(state.normalized_axes)} (input_rank {state.input_rank})"
    return None


def _writes(layer: Any, state: NormState) -> Callable[[], None]:
    """Validate ``state`` against ``layer`` completely, then return the function that writes it."""
    kind = _require(layer)
    problem = _compatible(kind, layer, state)
    if problem:
        raise ValueError(problem)
    weight, bias = _weights(layer, kind)
    copies: list[tuple[Any, np.ndarray]] = []
    for variable, value, identity, what, flag in (
        (weight, state.weight, 1.0, "weight", "scale=False"), (bias, state.bias, 0.0, "bias", "center=False"),
    ):
        if variable is not None:
            copies.append((variable, value if value is not None else np.full(state.shape, identity, dtype="float64")))
        elif value is not None and not bool(np.all(value == identity)):
            raise ValueError(f"{type(layer).__name__} {layer.name!r} has no {what} ({flag}), but the state's {what} is not all {identity:g}")
    if kind == "batch":
        copies += [(layer.moving_mean, state.running_mean), (layer.moving_variance, state.running_var)]
    for dtype in {str(variable.dtype) for variable, _ in copies}:  # a value above float16's 65504 would be stored as inf
        state.require_fits(dtype, f"{type(layer).__name__} {layer.name!r}")

    def write() -> None:
        for variable, value in copies:
            variable.assign(keras.ops.cast(keras.ops.convert_to_tensor(np.array(value, copy=True)), variable.dtype))
        layer.epsilon = state.eps
        if kind == "batch":
            layer.momentum = NormState.complement(state.momentum)
            count = state.num_batches_tracked
            record = (count, _numpy(layer.moving_mean), _numpy(layer.moving_variance)) if count else None
            object.__setattr__(layer, _COUNT, record)  # a plain attribute: not a weight, not tracked, not saved

    return write


def set_state(layer: Any, state: NormState) -> None:
    """Write ``state`` into a built Keras layer: weights, moving statistics, ``epsilon``, ``momentum`` (1 - the state's).

    Checks kind, groups, sizes and axes first and writes nothing on a mismatch. A weight the
    layer has and the state lacks is set to the identity (gamma/scale 1, beta 0: exactly
    equivalent); one the state has and the layer lacks is an error unless it is the identity.
    Set the state before tracing or compiling a function that calls the layer (traced code keeps
    the epsilon it saw). ``axis`` is the layer's own: the per-feature arrays fit either layout.
    """
    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    _writes(layer, state)()


def _feature_layout(state: NormState, layout: Optional[str], axis: Optional[int]) -> int:
    if layout not in (None, "channels_first", "channels_last"):
        raise ValueError(f"layout must be None, 'channels_first' or 'channels_last', got {layout!r}")
    if layout is not None and axis is not None:
        raise ValueError(f"give layout= or axis=, not both (got layout={layout!r}, axis={axis!r})")
    if axis is not None:
        return int(axis)
    return {"channels_first": 1, "channels_last": -1}.get(layout, state.feature_axis)  # type: ignore[arg-type]


def _build_shape(state: NormState, axes: Sequence[int], rank: Optional[int]) -> tuple:
    if rank is None:
        if state.kind not in ("layer", "rms"):
            raise ValueError(
                f"the {state.kind} norm state does not record its input rank (e.g. torch's BatchNorm1d takes (N, C) "
                "and (N, C, L), GroupNorm any rank): pass input_rank= or input_shape="
            )
        rank = max([len(axes) + 1] + [-a + 1 if a < 0 else a + 1 for a in axes])
    shape: list = [None] * rank
    for a, d in zip(axes, state.shape):
        shape[a] = d
    return tuple(shape)


def from_state(
    state: NormState,
    *,
    layout: Optional[str] = None,
    axis: Any = None,
    input_rank: Optional[int] = None,
    input_shape: Optional[Sequence[Optional[int]]] = None,
    dtype: Optional[str] = None,
    **overrides: Any,
) -> Any:
    """A new normkit_keras layer holding ``state``: built now where the input rank is known, else on its first call.

    The layout is the state's (a torch state, features on axis 1, gives ``axis=1``): pass
    ``layout="channels_last"`` (or ``axis=-1``) for Keras's usual channels-last layer.
    Batch and group norm build with the input rank of the state, ``input_rank=`` or ``input_shape=``;
    without one (torch's BatchNorm1d and GroupNorm take several ranks) the layer is returned unbuilt,
    as every Keras layer is, and writes the state when it builds (its first call): a size mismatch is
    raised then.
    ``overrides`` are constructor arguments in Keras's conventions (``epsilon``; ``momentum``
    as Keras's, the weight of the old value). ``dtype`` defaults to the state's.
    """
    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    if "epsilon" in overrides:
        state = state.replace(eps=overrides.pop("epsilon"))
    if "momentum" in overrides:
        state = state.replace(momentum=NormState.complement(overrides.pop("momentum")))
    kwargs: dict[str, Any] = {"epsilon": state.eps, "dtype": dtype or state.dtype}
    if state.kind in ("layer", "rms"):
        axes = list(axis) if isinstance(axis, (list, tuple)) else ([axis] if axis is not None else list(state.normalized_axes))
        kwargs["axis"] = axes
    else:
        feature = _feature_layout(state, layout, axis)
        axes = [feature]
        kwargs["axis"] = feature
    if state.kind != "rms":
        kwargs.update(center=state.centered, scale=state.scaled)
    if state.kind == "batch":
        problem = _batch_problem(state)
        if problem:
            raise ValueError(problem)
        cls, kwargs["momentum"] = _bn.BatchNormalization, NormState.complement(state.momentum)
    elif state.kind in ("group", "instance"):
        if state.track_running_stats:
            raise ValueError("Keras has no instance normalization with running statistics (torch track_running_stats=True)")
        cls, kwargs["groups"] = _fam.GroupNormalization, state.num_groups or -1
    else:
        cls = _fam.LayerNormalization if state.kind == "layer" else _fam.RMSNormalization
    kwargs.update(overrides)
    layer = cls(**kwargs)
    rank = input_rank or state.input_rank
    if input_shape is None and rank is None and state.kind not in ("layer", "rms"):
        _set_state_on_build(layer, state)  # the rank comes with the first input, as for every Keras layer
        return layer
    layer.build(tuple(input_shape) if input_shape is not None else _build_shape(state, axes, rank))
    set_state(layer, state)
    return layer


def _set_state_on_build(layer: Any, state: NormState) -> None:
    """Make ``layer.build`` (Keras's wrapped one, run by the first call) write ``state`` once the weights exist."""
    build = layer.build

    @functools.wraps(build)
    def build_then_set_state(*args: Any, **kwargs: Any) -> None:
        build(*args, **kwargs)
        layer.build = build  # once: a rebuild (load, clone) keeps Keras's own
        set_state(layer, state)

    layer.build = build_then_set_state


def _norm_layers(model: Any) -> dict[str, Any]:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"expected a Keras layer or model, got {type(model).__name__}")
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(layer: Any) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if _class_kind(layer) is not None:
            found[getattr(layer, "path", None) or layer.name] = layer
            return
        children = layer.layers if hasattr(layer, "layers") else list(layer._flatten_layers(include_self=False, recursive=False))
        for child in children:
            visit(child)

    visit(model)
    return found


def norm_states(model: Any) -> dict[str, NormState]:
    """``{layer path: NormState}`` of every normalization layer in a Keras model, in definition order."""
    return {name: get_state(layer) for name, layer in _norm_layers(model).items()}


def _source_states(source: Any) -> dict[str, NormState]:
    """States from a Keras model, else as ``normkit.norm_states`` reads them (NormStates, another framework's model)."""
    return norm_states(source) if isinstance(source, keras.layers.Layer) else normkit.norm_states(source)


def copy_norm_states(source: Any, target: Any, *, mapping: Optional[Mapping[str, str]] = None,
                     strict: bool = True) -> StateCopyReport:
    """Copy every normalization layer's state of ``source`` into the Keras model ``target``, paired in
    definition order (or by ``mapping`` {source name: target layer path}).

    ``source`` is a torch model (read with ``normkit_torch.norm_states``), a Keras model, or states
    by name. Every pair is checked first; ``strict`` (the default) raises ``ValueError`` with the
    report and copies nothing if a pair mismatches (kind, groups, size, axes) or a layer is left
    over; otherwise the compatible pairs are copied and the report lists the rest.
    """
    return StateCopyReport.carry_out(_source_states(source), _norm_layers(target), _writes, mapping, strict=strict)
