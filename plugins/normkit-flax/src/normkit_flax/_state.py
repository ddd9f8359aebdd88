"""Portable state for Flax NNX layers: ``get_state``, ``set_state``, ``from_state``, ``norm_states``, ``copy_norm_states``.

Flax's conventions, translated here and nowhere else: ``momentum`` is the weight of the old value
(the ``NormState`` holds ``1 - momentum``, in decimal: 0.99 <-> 0.01 exactly); ``var`` is updated
with the biased batch variance (``running_var_correction=0``) and copied unchanged (torch's
``running_var`` and Keras's ``moving_variance`` are the same inference variance); the feature axis
is BatchNorm's ``axis`` / InstanceNorm's ``feature_axes`` (GroupNorm's channels are always last);
``use_scale``/``use_bias`` are a present weight/bias. Flax keeps ``mean``/``var`` in float32 whatever
``param_dtype``: a float64 layer's statistics are stored in float64 here (the wider of the two), so a
float64 state is held exactly. Flax keeps no batch count: ``set_state`` remembers the state's count
for the layer object while its statistics stay as written (``num_batches_tracked``); a cumulative
average (torch ``momentum=None``) has no Flax equivalent and is refused.
Accepted: normkit_flax's layers and flax.nnx's (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

import normkit
from normkit import NormState, StateCopyReport

__all__ = ["get_state", "set_state", "from_state", "norm_states", "copy_norm_states", "norm_layers"]

_CLASSES = (("batch", nnx.BatchNorm), ("layer", nnx.LayerNorm), ("rms", nnx.RMSNorm), ("group", nnx.GroupNorm),
            ("instance", nnx.InstanceNorm))
# layer -> (count, mean bytes, var bytes) as set_state wrote them: kept off the layer (its graph stays Flax's)
_COUNTS: "weakref.WeakKeyDictionary[Any, tuple[int, bytes, bytes]]" = weakref.WeakKeyDictionary()


def kind_of(layer: Any) -> Optional[str]:
    """``"batch"``, ``"layer"``, ``"rms"``, ``"group"``, ``"instance"`` for a Flax normalization layer, else None."""
    for kind, cls in _CLASSES:
        if isinstance(layer, cls):
            return kind
    return None


def _require(layer: Any) -> str:
    kind = kind_of(layer)
    if kind is None:
        raise TypeError("expected a Flax NNX normalization layer (BatchNorm, LayerNorm, RMSNorm, GroupNorm, "
                        f"InstanceNorm; flax.nnx's or normkit_flax's), got {type(layer).__name__}")
    return kind


def _numpy(variable: Any) -> Optional[np.ndarray]:
    if variable is None:
        return None
    a = np.asarray(variable[...])
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def _dtype(layer: Any) -> str:
    """The layer's parameter dtype name (its Params', else ``param_dtype``)."""
    for name in ("scale", "bias"):
        v = getattr(layer, name, None)
        if isinstance(v, nnx.Variable):
            return jnp.dtype(v.dtype).name
    return jnp.dtype(layer.param_dtype).name


def _axes(value: Any) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, (int, np.integer)) else tuple(sorted(int(a) for a in value))


def _features(layer: Any) -> int:
    """The number of features (Flax's GroupNorm keeps ``num_groups * group_size``, no ``num_features``)."""
    if isinstance(layer, nnx.GroupNorm):
        return int(layer.num_groups) * int(layer.group_size)
    return int(layer.num_features)


def _single_axis(layer: Any, name: str) -> int:
    axes = _axes(getattr(layer, name))
    if len(axes) != 1:
        raise ValueError(f"{type(layer).__name__} has {name}={getattr(layer, name)!r}: a NormState's {kind_of(layer)} "
                         "norm has one feature axis")
    return axes[0]


def _normalized(layer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """layer/rms: (normalized axes, per-feature shape); Flax's ``reduction_axes`` must be its ``feature_axes``."""
    reduced, features = _axes(layer.reduction_axes), _axes(layer.feature_axes)
    name = type(layer).__name__
    if reduced != features:
        raise ValueError(f"{name} has reduction_axes={layer.reduction_axes!r} and feature_axes={layer.feature_axes!r}: "
                         "a NormState's weight spans exactly the normalized axes (they must be equal)")
    scale = getattr(layer, "scale", None)
    if isinstance(scale, nnx.Variable) and len(scale.shape) == len(reduced):
        return reduced, tuple(scale.shape)
    if len(reduced) != 1:
        raise ValueError(f"{name} normalizes axes {reduced} with a flat (num_features,) weight: its per-axis shape "
                         "is unknown (build it with normkit_flax.from_state, which keeps the weight's shape)")
    return reduced, (_features(layer),)


def get_state(layer: Any) -> NormState:
    """The ``NormState`` of a Flax NNX normalization layer (flax.nnx's or normkit_flax's)."""
    kind = _require(layer)
    extra: dict[str, Any] = {}
    shape: tuple[int, ...] = (_features(layer),)
    if kind == "batch":
        mean, var = _numpy(layer.mean), _numpy(layer.var)
        extra = dict(running_mean=mean, running_var=var, momentum=NormState.complement(float(layer.momentum)),
                     running_var_correction=0, num_batches_tracked=_counted(layer, mean, var),
                     feature_axis=_single_axis(layer, "axis"))
    elif kind == "group":
        extra = dict(num_groups=int(layer.num_groups), feature_axis=-1)
        if layer.reduction_axes is not None:
            raise ValueError(f"GroupNorm has reduction_axes={layer.reduction_axes!r}: a NormState's group norm "
                             "reduces every axis but the batch (reduction_axes=None)")
    elif kind == "instance":
        extra = dict(feature_axis=_single_axis(layer, "feature_axes"))
    else:
        axes, shape = _normalized(layer)
        extra = dict(normalized_axes=axes)
    package = type(layer).__module__.split(".")[0]
    return NormState(
        kind=kind, shape=shape, weight=_numpy(getattr(layer, "scale", None)),
        bias=_numpy(getattr(layer, "bias", None)) if kind != "rms" else None, eps=float(layer.epsilon),
        dtype=_dtype(layer), source=f"{'flax.nnx' if package == 'flax' else package}.{type(layer).__name__}", **extra,
    )


def _counted(layer: Any, mean: np.ndarray, var: np.ndarray) -> Optional[int]:
    """The batch count set_state remembered, while the statistics are still the ones it wrote."""
    record = _COUNTS.get(layer)
    if record is None:
        return None
    count, m, v = record
    return count if (mean.tobytes(), var.tobytes()) == (m, v) else None


def _batch_problem(state: NormState) -> Optional[str]:
    """Why a Flax BatchNorm cannot hold a batch norm ``state`` (None when it can)."""
    if not state.track_running_stats:
        return ("the state has no running statistics (it normalizes with batch statistics at inference); Flax's "
                "BatchNorm always keeps mean/var")
    if state.momentum is None:
        return ("the state's momentum is None (torch's cumulative average), which Flax has no equivalent of: "
                "choose one, e.g. state.replace(momentum=0.01) or from_state(..., momentum=0.99)")
    return None


def _compatible(kind: str, layer: Any, state: NormState) -> Optional[str]:
    """Why ``state`` cannot go into ``layer`` (None when it can): kind, groups, size, axes, running statistics."""
    name = type(layer).__name__
    one_per_channel = state.kind == "instance" or (state.kind == "group" and state.num_groups == state.shape[0])
    if kind == "group" and state.kind == "instance":
        if layer.num_groups != _features(layer):
            return f"an instance norm state needs one channel per group; {name} has num_groups={layer.num_groups}"
    elif kind == "instance" and state.kind == "group" and one_per_channel:
        pass
    elif kind != state.kind:
        return f"kind mismatch: a {state.kind} norm state ({state.source or 'NormState'}) cannot go into {name} ({kind} norm)"
    elif kind == "group" and layer.num_groups != state.num_groups:
        return f"num_groups mismatch: the state has {state.num_groups}, {name} has {layer.num_groups}"
    if kind in ("layer", "rms"):
        axes, shape = _normalized(layer)
        theirs = state.trailing_axes or state.normalized_axes
        if len(axes) != len(theirs) or (all(a < 0 for a in axes + theirs) and axes != tuple(theirs)):
            return f"{name} normalizes axes {axes}, the state axes {state.normalized_axes} (input_rank {state.input_rank})"
        if len(shape) == len(state.shape) and shape != tuple(state.shape) or int(np.prod(state.shape)) != int(np.prod(shape)):
            return f"size mismatch: the state's per-feature shape is {state.shape}, {name} has {shape}"
    elif tuple(state.shape) != (_features(layer),):
        return f"size mismatch: the state's per-feature shape is {state.shape}, {name} has ({_features(layer)},)"
    if kind == "batch":
        return _batch_problem(state)
    if state.track_running_stats:
        return f"{name} keeps no running statistics, the state has them (torch track_running_stats=True)"
    return None


def statistic_dtype(layer: Any, variable: Any) -> Any:
    """Flax's float32 statistics, widened to a float64 layer's dtype (so a float64 state is held exactly)."""
    return jnp.promote_types(variable.dtype, jnp.dtype(layer.param_dtype))


def _writes(layer: Any, state: NormState) -> Callable[[], None]:
    """Validate ``state`` against ``layer`` completely, then return the function that writes it."""
    kind = _require(layer)
    problem = _compatible(kind, layer, state)
    name = type(layer).__name__
    if problem:
        raise ValueError(problem)
    copies: list[tuple[Any, np.ndarray, Any]] = []  # (variable, value, stored dtype)
    for attr, value, identity, flag in (("scale", state.weight, 1.0, "use_scale=False"),
                                        ("bias", state.bias, 0.0, "use_bias=False")):
        variable = getattr(layer, attr, None)
        if isinstance(variable, nnx.Variable):
            v = value if value is not None else np.full(state.shape, identity)
            copies.append((variable, np.reshape(v, variable.shape), variable.dtype))
        elif value is not None and not bool(np.all(value == identity)):
            raise ValueError(f"{name} has no {attr} ({flag}), but the state's {'weight' if attr == 'scale' else 'bias'} "
                             f"is not all {identity:g}")
    if kind == "batch":
        for variable, value in ((layer.mean, state.running_mean), (layer.var, state.running_var)):
            copies.append((variable, value, statistic_dtype(layer, variable)))
    for dtype in {jnp.dtype(d).name for _, _, d in copies}:  # a value above float16's 65504 would be stored as inf
        state.require_fits(dtype, name)

    def write() -> None:
        for variable, value, dtype in copies:
            variable.set_value(jnp.asarray(np.array(value, copy=True), dtype=dtype))
        layer.epsilon = state.eps
        if kind == "batch":
            layer.momentum = NormState.complement(state.momentum)
            count = state.num_batches_tracked
            if count:
                _COUNTS[layer] = (count, _numpy(layer.mean).tobytes(), _numpy(layer.var).tobytes())
            else:
                _COUNTS.pop(layer, None)

    return write


def set_state(layer: Any, state: NormState) -> None:
    """Write ``state`` into a Flax layer in place: ``scale``, ``bias``, ``mean``, ``var``, ``epsilon``, ``momentum``.

    Checks kind, groups, sizes and axes first and writes nothing on a mismatch. ``momentum`` becomes
    Flax's (``1 - state.momentum``, exact in decimal). A weight the layer has and the state lacks is
    set to the identity (scale 1, bias 0); one the state has and the layer lacks is an error unless it
    is the identity. The layer's own axis is kept (the per-feature arrays fit either layout). Set the
    state before tracing a function that calls the layer (traced code keeps the epsilon it saw).
    """
    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    _writes(layer, state)()


def _feature_axis(state: NormState, layout: Optional[str], axis: Optional[int]) -> int:
    if layout not in (None, "channels_first", "channels_last"):
        raise ValueError(f"layout must be None, 'channels_first' or 'channels_last', got {layout!r}")
    if layout is not None and axis is not None:
        raise ValueError(f"give layout= or axis=, not both (got layout={layout!r}, axis={axis!r})")
    if axis is not None:
        return int(axis)
    return {"channels_first": 1, "channels_last": -1}.get(layout, state.feature_axis)  # type: ignore[arg-type]


def from_state(state: NormState, *, rngs: Optional[nnx.Rngs] = None, layout: Optional[str] = None,
               axis: Optional[int] = None, input_rank: Optional[int] = None, param_dtype: Any = None,
               **overrides: Any) -> Any:
    """A new normkit_flax layer holding ``state`` (Flax's default mode: a BatchNorm trains, as Flax's does).

    The class follows the kind: BatchNorm (``axis`` from ``layout``/``axis=`` or the state's feature
    axis: a torch state gives ``axis=1``, pass ``layout="channels_last"`` for NHWC), InstanceNorm
    (``feature_axes`` likewise), GroupNorm (channels last only: ``layout="channels_first"`` is refused),
    LayerNorm/RMSNorm over the state's normalized axes (a multi-axis weight keeps its shape).
    ``use_fast_variance=False`` (normkit's exact statistics, as torch and Keras compute them) unless
    overridden. ``param_dtype`` defaults to the state's dtype; ``rngs`` (only initializes what the
    state overwrites) to ``nnx.Rngs(0)``. ``overrides`` are constructor arguments in Flax's conventions
    (``epsilon``; ``momentum`` as Flax's, the weight of the old value). ``input_rank`` is accepted for
    the other plugins' signature: Flax layers take any rank.
    """
    import normkit_flax._layers as layers

    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    if input_rank is not None and (isinstance(input_rank, bool) or not isinstance(input_rank, int) or input_rank < 1):
        raise ValueError(f"input_rank must be None or a positive int, got {input_rank!r}")
    if "epsilon" in overrides:
        state = state.replace(eps=overrides.pop("epsilon"))
    if "momentum" in overrides:
        state = state.replace(momentum=NormState.complement(float(overrides.pop("momentum"))))
    kwargs: dict[str, Any] = {"epsilon": state.eps, "param_dtype": param_dtype or jnp.dtype(state.dtype),
                              "use_scale": state.scaled, "use_fast_variance": False}
    if state.kind != "rms":
        kwargs["use_bias"] = state.centered
    num_features = int(np.prod(state.shape))
    if state.kind == "batch":
        problem = _batch_problem(state)
        if problem:
            raise ValueError(problem)
        cls = layers.BatchNorm
        kwargs.update(axis=_feature_axis(state, layout, axis), momentum=NormState.complement(state.momentum))
    elif state.kind in ("group", "instance"):
        if state.track_running_stats:
            raise ValueError("Flax has no instance normalization with running statistics (torch track_running_stats=True)")
        feature = _feature_axis(state, layout, axis)
        if state.kind == "instance":
            cls, kwargs["feature_axes"] = layers.InstanceNorm, feature
        else:
            rank = input_rank or state.input_rank
            if feature != -1 and not (rank is not None and feature % rank == rank - 1):
                raise ValueError(f"Flax's GroupNorm keeps its channels on the last axis; the state's feature axis is "
                                 f"{feature}: pass layout='channels_last' and feed channels-last input")
            cls, kwargs["num_groups"] = layers.GroupNorm, state.num_groups
    else:
        axes = state.trailing_axes or state.normalized_axes
        cls = layers.LayerNorm if state.kind == "layer" else layers.RMSNorm
        kwargs.update(reduction_axes=axes, feature_axes=axes)
    kwargs.update(overrides)
    layer = cls(num_features, rngs=rngs if rngs is not None else nnx.Rngs(0), **kwargs)
    if len(state.shape) > 1:  # Flax reshapes any scale/bias to the feature axes' shape: keep the state's
        for name in ("scale", "bias"):
            variable = getattr(layer, name, None)
            if isinstance(variable, nnx.Variable):
                variable.set_value(jnp.reshape(variable[...], state.shape))
    if state.kind == "batch":  # a float64 layer holds float64 statistics (Flax's are float32)
        for variable in (layer.mean, layer.var):
            variable.set_value(variable[...].astype(statistic_dtype(layer, variable)))
    set_state(layer, state)
    return layer


def _walk(node: Any, path: tuple, seen: set[int]) -> Iterator[tuple[tuple, Any]]:
    """(path, layer) of every normalization layer under ``node``, in definition (attribute insertion) order."""
    if isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _walk(child, path + (i,), seen)
        return
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _walk(child, path + (key,), seen)
        return
    if not isinstance(node, nnx.Module) or id(node) in seen:
        return
    seen.add(id(node))
    if kind_of(node) is not None:
        yield path, node
        return
    for key, child in vars(node).items():
        if not key.startswith("_"):
            yield from _walk(child, path + (key,), seen)


def norm_layers(model: Any) -> dict[str, Any]:
    """``{path: layer}`` of every normalization layer in an NNX module, in definition order (paths as ``"a.0.bn"``)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected a flax.nnx.Module, got {type(model).__name__}")
    return {".".join(str(p) for p in path): layer for path, layer in _walk(model, (), set())}


def norm_states(model: Any) -> dict[str, NormState]:
    """``{path: NormState}`` of every normalization layer in an NNX module, in definition order."""
    return {name: get_state(layer) for name, layer in norm_layers(model).items()}


def _source_states(source: Any) -> dict[str, NormState]:
    """States from an NNX model, else as ``normkit.norm_states`` reads them (NormStates, a torch or Keras model)."""
    keras = sys.modules.get("keras")  # a Keras layer on the JAX backend is Keras's, not ours
    if isinstance(source, nnx.Module) and not (keras is not None and isinstance(source, keras.layers.Layer)):
        return norm_states(source)
    return normkit.norm_states(source)


def copy_norm_states(source: Any, target: Any, *, mapping: Optional[Mapping[str, str]] = None,
                     strict: bool = True) -> StateCopyReport:
    """Copy every normalization layer's state of ``source`` into the NNX model ``target``, paired in definition
    order (or by ``mapping`` {source name: target path}).

    ``source`` is a torch or Keras model (read by its plugin's ``norm_states``), an NNX model, or states
    by name. Every pair is checked first; ``strict`` (the default) raises ``ValueError`` with the report
    and copies nothing if a pair mismatches (kind, groups, size, axes) or a layer is left over;
    otherwise the compatible pairs are copied and the report lists the rest.
    """
    return StateCopyReport.carry_out(_source_states(source), norm_layers(target), _writes, mapping, strict=strict)
