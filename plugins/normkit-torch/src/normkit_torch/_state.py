"""Portable state for torch modules: ``get_state``, ``set_state``, ``from_state``, ``copy_norm_states``.

torch's conventions, translated here and nowhere else: features on axis 1 (every module is
channels-first), ``momentum`` is the weight of the new batch (the ``NormState``'s own convention;
``None`` is BatchNorm's cumulative average; InstanceNorm's ``momentum=None``, no update, is stored
as 0.0), ``running_var`` is updated with the unbiased batch variance (``running_var_correction=1``),
``num_batches_tracked`` is kept, ``affine=False`` / ``bias=False`` are a missing weight / bias,
RMSNorm's ``eps=None`` is recorded as the machine epsilon it resolves to. ``running_var`` itself is
copied unchanged: torch and Keras both use it as the population variance at inference, so inference
outputs match. Training on from a Keras state, torch folds the unbiased batch variance: each step's
running_var is ``momentum * var_B / (n - 1)`` above what Keras would store (n values per feature);
torch's update cannot be changed, so a module from Keras trains on with torch's convention.
Accepted: normkit_torch's modules and torch.nn's (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d,
LayerNorm, GroupNorm, RMSNorm; Lazy ones once initialized).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

import normkit
from normkit import NormState, StateCopyReport
from normkit_torch import _batchnorm as bn, _instancenorm as inorm, _normalization as norm

__all__ = ["get_state", "set_state", "from_state", "norm_states", "copy_norm_states"]

_RMS_CLASSES: tuple[type, ...] = (norm._RMSNormBase,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_RANKS = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5), (nn.InstanceNorm1d, 3), (nn.InstanceNorm2d, 4), (nn.InstanceNorm3d, 5))
_HALF = (torch.float16, torch.bfloat16)
_KNOWN = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _kind(module: Any) -> Optional[str]:
    if isinstance(module, _BatchNorm):
        return "batch"
    if isinstance(module, _InstanceNorm):
        return "instance"
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if isinstance(module, nn.GroupNorm):
        return "group"
    if isinstance(module, _RMS_CLASSES):
        return "rms"
    return None


def _require_kind(module: Any) -> str:
    kind = _kind(module)
    if kind is None:
        raise TypeError(
            f"expected a torch normalization module (BatchNorm*, SyncBatchNorm, InstanceNorm*, LayerNorm, GroupNorm, "
            f"RMSNorm; torch.nn's or normkit_torch's), got {type(module).__name__}"
        )
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"{type(module).__name__} is not initialized yet: run one batch through it first")
    names = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    extra = sorted(set(names) - _KNOWN)
    if extra:  # e.g. batch renormalization's statistics
        raise ValueError(f"{type(module).__name__} carries {extra}, which a NormState does not hold")
    return kind


def _dtype(module: nn.Module) -> torch.dtype:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.float() if t.dtype is torch.bfloat16 else t).numpy()


def _features(module: nn.Module, kind: str) -> tuple[int, ...]:
    """The shape of the module's per-feature arrays."""
    if kind in ("layer", "rms"):
        return tuple(module.normalized_shape)
    return (int(module.num_channels if kind == "group" else module.num_features),)


def _source_name(module: nn.Module) -> str:
    """``torch.nn.BatchNorm2d`` / ``normkit_torch.BatchNorm2d`` (the public spelling, not the defining module)."""
    package = type(module).__module__.split(".")[0]
    return f"{'torch.nn' if package == 'torch' else package}.{type(module).__name__}"


def get_state(module: nn.Module) -> NormState:
    """The ``NormState`` of a torch normalization module (torch.nn's or normkit_torch's)."""
    kind = _require_kind(module)
    dtype = _dtype(module)
    shape = _features(module, kind)
    weight, bias = _numpy(getattr(module, "weight", None)), _numpy(getattr(module, "bias", None))
    running = kind in ("batch", "instance") and getattr(module, "running_mean", None) is not None
    momentum: Optional[float] = None
    if running:
        momentum = module.momentum
        if momentum is None and kind == "instance":  # torch: no update at all, which is momentum 0
            momentum = 0.0
    count = getattr(module, "num_batches_tracked", None) if running else None
    eps = module.eps
    if eps is None:  # RMSNorm: the machine epsilon of the compute dtype (float32's for half precision)
        eps = torch.finfo(torch.float32 if dtype in _HALF else dtype).eps
    rank = next((r for cls, r in _RANKS if isinstance(module, cls)), None)
    feature = kind in ("batch", "instance", "group")
    return NormState(
        kind=kind, shape=shape, weight=weight, bias=bias,
        running_mean=_numpy(module.running_mean) if running else None,
        running_var=_numpy(module.running_var) if running else None,
        eps=float(eps), momentum=momentum, running_var_correction=1 if running else None,
        num_batches_tracked=int(count) or None if count is not None else None,  # 0: none counted, as unknown
        num_groups=int(module.num_groups) if kind == "group" else None,
        feature_axis=1 if feature else None,
        normalized_axes=None if feature else tuple(range(-len(shape), 0)),
        input_rank=rank, dtype=str(dtype).replace("torch.", ""), source=_source_name(module),
    )


def _compatible(kind: str, module: nn.Module, state: NormState) -> Optional[str]:
    """Why ``state`` cannot go into ``module`` of ``kind`` (None when it can): kind, groups, size, axes."""
    name = type(module).__name__
    one_per_channel = state.kind in ("group", "instance") and not state.track_running_stats and (
        state.kind == "instance" or state.num_groups == state.shape[0]
    )
    if kind == "group" and state.kind == "instance" and one_per_channel:
        if module.num_groups != module.num_channels:
            return f"an instance norm state needs one channel per group; {name} has num_groups={module.num_groups}"
    elif kind == "instance" and state.kind == "group" and one_per_channel:
        pass
    elif kind != state.kind:
        return f"kind mismatch: a {state.kind} norm state ({state.source or 'NormState'}) cannot go into {name} ({kind} norm)"
    elif kind == "group" and module.num_groups != state.num_groups:
        return f"num_groups mismatch: the state has {state.num_groups}, {name} has {module.num_groups}"
    features = _features(module, kind)
    if tuple(state.shape) != features:
        return f"size mismatch: the state's per-feature shape is {state.shape}, {name} has {features}"
    if kind in ("layer", "rms"):
        want = tuple(range(-len(features), 0))
        if state.trailing_axes != want:
            return (
                f"{name} normalizes the trailing axes {want}; the state normalizes axes {state.normalized_axes} "
                f"(input_rank {state.input_rank})"
            )
    return None


def _writes(module: nn.Module, state: NormState) -> Callable[[], None]:
    """Validate ``state`` against ``module`` completely, then return the function that writes it."""
    kind = _require_kind(module)
    problem = _compatible(kind, module, state)
    name = type(module).__name__
    if problem:
        raise ValueError(problem)
    copies: list[tuple[torch.Tensor, Any]] = []
    for attr, identity, flag in (("weight", 1.0, "affine=False"), ("bias", 0.0, "bias=False or affine=False")):
        target, value = getattr(module, attr, None), getattr(state, attr)
        if target is not None:
            copies.append((target, value if value is not None else np.full(state.shape, identity)))
        elif value is not None and not bool(np.all(value == identity)):
            raise ValueError(f"{name} has no {attr} ({flag}), but the state's {attr} is not all {identity:g}")
    running = getattr(module, "running_mean", None) is not None
    if running != state.track_running_stats:
        raise ValueError(
            f"{name} has track_running_stats={running}, the state {'has' if state.track_running_stats else 'has no'} "
            "running statistics: inference would normalize differently"
        )
    if running:
        if state.momentum is None and kind == "instance":
            raise ValueError(f"{name} has no cumulative average (the state's momentum is None)")
        copies += [(module.running_mean, state.running_mean), (module.running_var, state.running_var)]
    for dtype in {tensor.dtype for tensor, _ in copies}:  # a value above float16's 65504 would be stored as inf
        state.require_fits(str(dtype).replace("torch.", ""), name)
    counter = getattr(module, "num_batches_tracked", None)

    def write() -> None:
        with torch.no_grad():
            for tensor, value in copies:
                tensor.copy_(torch.from_numpy(np.array(value, copy=True)).reshape(tensor.shape))
            if counter is not None:
                counter.fill_(state.num_batches_tracked or 0)
        module.eps = state.eps
        if running:
            module.momentum = state.momentum

    return write


def set_state(module: nn.Module, state: NormState) -> None:
    """Write ``state`` into ``module`` in place: weights, running statistics, eps, momentum, batch count.

    Checks kind, groups and sizes first and writes nothing on a mismatch. The state's eps and
    momentum replace the module's. A weight or bias the module has and the state lacks is set to
    1 or 0 (the identity, exactly equivalent); one the state has and the module lacks is an
    error unless it is the identity. Values are converted to the module's dtype and device.
    """
    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    _writes(module, state)()


def _module_class(state: NormState, rank: Optional[int]) -> type:
    if state.kind == "batch":
        return {None: bn.BatchNorm, 2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}.get(
            rank, bn.BatchNorm
        )
    if state.kind == "instance":
        classes = {2: inorm.InstanceNorm1d, 3: inorm.InstanceNorm1d, 4: inorm.InstanceNorm2d, 5: inorm.InstanceNorm3d}
        if rank not in classes:
            raise ValueError(
                f"an instance norm state needs its input rank to choose InstanceNorm1d/2d/3d: got input_rank={rank}; "
                "pass input_rank=3, 4 or 5"
            )
        return classes[rank]
    return {"layer": norm.LayerNorm, "group": norm.GroupNorm, "rms": norm.RMSNorm}[state.kind]


def _constructor(state: NormState) -> tuple[tuple, dict[str, Any]]:
    c = state.shape[0]
    kwargs: dict[str, Any] = {"eps": state.eps}
    if state.kind in ("batch", "instance"):
        args: tuple = (c,)
        kwargs.update(momentum=state.momentum if state.track_running_stats else 0.1, affine=state.affine,
                      track_running_stats=state.track_running_stats)
    elif state.kind == "group":
        args, kwargs["affine"] = (state.num_groups, c), state.affine
    elif state.kind == "layer":
        args, kwargs["elementwise_affine"] = (state.shape,), state.affine
    else:
        return (state.shape,), {"eps": state.eps, "elementwise_affine": state.scaled}
    if state.affine and not state.centered:
        kwargs["bias"] = False
    return args, kwargs


def from_state(
    state: NormState,
    *,
    layout: Optional[str] = None,
    input_rank: Optional[int] = None,
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    **overrides: Any,
) -> nn.Module:
    """A new normkit_torch module holding ``state`` (in training mode, as every new torch module).

    torch modules take the features on axis 1: a channels-last state (Keras's ``feature_axis=-1``)
    becomes the same module, to be fed the input permuted to channels-first (``layout`` accepts
    None or ``"channels_first"`` only). The class follows the kind and the input rank
    (``input_rank=`` or the state's: BatchNorm1d/2d/3d, or ``BatchNorm`` for any rank;
    InstanceNorm1d/2d/3d). ``dtype`` defaults to the state's. ``overrides`` are constructor
    arguments in torch's conventions (``eps``, ``momentum`` replace the state's values).
    """
    if not isinstance(state, NormState):
        raise TypeError(f"state must be a normkit.NormState, got {type(state).__name__}")
    if layout not in (None, "channels_first"):
        raise ValueError(
            f"layout must be None or 'channels_first' (torch's modules normalize features on axis 1; permute a "
            f"channels-last input, e.g. x.permute(0, 3, 1, 2)), got {layout!r}"
        )
    changes = {k: overrides.pop(k) for k in ("eps", "momentum") if k in overrides}
    if changes:
        state = state.replace(**changes)
    cls = _module_class(state, input_rank if input_rank is not None else state.input_rank)
    args, kwargs = _constructor(state)
    kwargs.update(overrides)
    module = cls(*args, **kwargs, device=device, dtype=dtype or getattr(torch, state.dtype))
    set_state(module, state)
    return module


def _norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if _kind(m) is not None}


def norm_states(model: nn.Module) -> dict[str, NormState]:
    """``{qualified name: NormState}`` of every normalization module in ``model``, in definition order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return {name: get_state(m) for name, m in _norm_layers(model).items()}


def _source_states(source: Any) -> dict[str, NormState]:
    """States from a torch model, else as ``normkit.norm_states`` reads them (NormStates, another framework's model)."""
    keras = sys.modules.get("keras")  # Keras layers are torch modules on Keras's torch backend: not ours
    if isinstance(source, nn.Module) and not (keras is not None and isinstance(source, keras.layers.Layer)):
        return norm_states(source)
    return normkit.norm_states(source)


def copy_norm_states(
    source: Union[nn.Module, Mapping[str, NormState], Sequence[NormState], Any],
    target: nn.Module,
    *,
    mapping: Optional[Mapping[str, str]] = None,
    strict: bool = True,
) -> StateCopyReport:
    """Copy every normalization layer's state of ``source`` into ``target``'s, paired in definition order
    (or by ``mapping`` {source name: target name}).

    ``source`` is a torch model, a Keras model (read with ``normkit_keras.norm_states``), or states
    by name. Every pair is checked first; ``strict`` (the default) raises ``ValueError`` with the
    report and copies nothing if a pair mismatches (kind, groups, size) or a layer is left over;
    otherwise the compatible pairs are copied and the report lists the rest.
    """
    return StateCopyReport.carry_out(_source_states(source), _norm_layers(target), _writes, mapping, strict=strict)
