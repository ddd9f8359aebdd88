"""Model tools for Flax NNX: ``recalibrate`` (exact population statistics), ``freeze``, ``fold_batch_norm``.

``recalibrate``: every BatchNorm's ``mean``/``var`` become the statistics of its inputs over all the
batches, in Flax's convention (``var`` biased): ``mean = sum(x) / n``, ``var = m2 / n``. BatchNorms are
done one at a time in the order the forward pass first calls them; for each, the model runs in eval
mode over every batch (cut short after that BatchNorm's last call), each batch gives
``normkit.batch_moments`` of the input in float64 and the batches merge with ``Moments.merge``
(Chan, float64). So each BatchNorm sees the activations of the model whose earlier ones are already
recalibrated. ``freeze``: BatchNorms that normalize with their running statistics whatever
``.train()``, ``nnx.view`` or the call says. ``fold_batch_norm``: ``Conv``/``Linear`` then BatchNorm
in an ``nnx.Sequential`` become one ``Conv``/``Linear``: ``W' = W * s``, ``b' = (b - mean) * s + bias``
with ``s = scale / sqrt(var + epsilon)`` (float64, cast once), the BatchNorm removed.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import normkit
from normkit_flax._layers import BatchNorm
from normkit_flax._state import norm_layers, statistic_dtype

__all__ = ["recalibrate", "freeze", "fold_batch_norm", "FrozenBatchNorm"]


class _Stop(BaseException):
    """Cuts a forward pass short after the captured BatchNorm (BaseException: no ``except Exception`` eats it)."""


_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    """``cls`` whose call reports ``(layer, x, mask)`` to ``layer._normkit_hook`` and normalizes with running statistics."""
    if cls not in _HOOKED:
        def __call__(self: Any, x: Any, use_running_average: Optional[bool] = None, *, mask: Any = None) -> Any:
            _HOOK[0](self, x, mask)
            return cls.__call__(self, x, True, mask=mask)

        _HOOKED[cls] = type(f"_Recalibrating{cls.__name__}", (cls,), {"__call__": __call__})
    return _HOOKED[cls]


_HOOK: list = [lambda layer, x, mask: None]


def _input_of(batch: Any) -> Any:
    """The model input of a batch: the batch, or its first element for a tuple/list (``(x, y)``)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _materialize(batches: Iterable, num_batches: Optional[int]) -> list:
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(batches, (jax.Array, np.ndarray)):
        raise TypeError("recalibrate expects an iterable of batches (a list, a data loader), got a single array; "
                        "wrap it: [x] or jnp.split(x, n)")
    if not hasattr(batches, "__iter__"):
        raise TypeError(f"recalibrate: batches must be an iterable of model inputs, got {type(batches).__name__}")
    inputs: list = []
    for batch in batches:
        if num_batches is not None and len(inputs) >= num_batches:
            break
        inputs.append(_input_of(batch))
    return inputs


def _moments(layer: Any, x: Any, mask: Any) -> normkit.Moments:
    """float64 moments of a BatchNorm's input per feature (its ``axis``), positions outside ``mask`` left out."""
    x64 = np.asarray(x, dtype=np.float64)
    axis = int(layer.axis) % x64.ndim
    m = None if mask is None else np.broadcast_to(np.asarray(mask, bool), x64.shape)
    return normkit.batch_moments(np.moveaxis(x64, axis, -1).reshape(-1, x64.shape[axis]), axis=1,
                                 mask=None if m is None else np.moveaxis(m, axis, -1).reshape(-1, x64.shape[axis]))


def _modes(model: nnx.Module) -> list[tuple[Any, str, Any]]:
    return [(m, a, getattr(m, a)) for _, m in nnx.iter_modules(model)
            for a in ("deterministic", "use_running_average") if hasattr(m, a)]


def recalibrate(model: nnx.Module, batches: Iterable, num_batches: Optional[int] = None) -> nnx.Module:
    """Set every BatchNorm's ``mean``/``var`` of ``model`` (in place) to the exact population statistics of its inputs.

    ``batches``: an iterable of model inputs (or ``(x, y)`` tuples, the first element taken); the first
    ``num_batches`` (all when None) are read once. ``var`` is the biased population variance (Flax's
    convention); a ``mask=`` given to a BatchNorm's call leaves positions out. Batches may differ in size.
    The model's forward must run eagerly (call ``recalibrate`` outside ``jax.jit``); it runs in eval mode
    and every module's ``deterministic``/``use_running_average`` is restored. No batch, NaN/inf
    activations, a feature that saw no value or a failing forward raise, every BatchNorm left as it was.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"recalibrate expects a flax.nnx.Module, got {type(model).__name__}")
    found = {name or "model": m for name, m in norm_layers(model).items() if isinstance(m, nnx.BatchNorm)}
    named, bns = {id(m): name for name, m in found.items()}, list(found.values())
    inputs = _materialize(batches, num_batches)
    if not inputs:
        raise ValueError(f"recalibrate got no batch: batches must yield at least one model input (got an empty "
                         f"{type(batches).__name__}); no statistics were changed")
    saved = [(v, v[...]) for bn in bns for v in (bn.mean, bn.var)]
    modes = _modes(model)
    classes = [(bn, type(bn)) for bn in bns]
    model.eval()
    try:
        for bn, cls in classes:
            object.__setattr__(bn, "__class__", _hooked_class(cls))
        order, calls = _call_order(model, inputs[0])
        for bn in order:
            total = _population(model, bn, inputs, calls[id(bn)])
            _assign(bn, total, named[id(bn)])
    except BaseException:
        for variable, value in saved:  # an error part-way (NaN, a failing batch): every BatchNorm as it was
            variable.set_value(value)
        raise
    finally:
        for bn, cls in classes:
            object.__setattr__(bn, "__class__", cls)
        for module, attr, value in modes:
            setattr(module, attr, value)
        _HOOK[0] = lambda layer, x, mask: None
    return model


def _call_order(model: nnx.Module, first: Any) -> tuple[list, dict[int, int]]:
    """BatchNorms in the order the forward pass first calls them, and how often each is called per pass."""
    order: list = []
    calls: dict[int, int] = {}

    def hook(layer: Any, x: Any, mask: Any) -> None:
        if id(layer) not in calls:
            order.append(layer)
        calls[id(layer)] = calls.get(id(layer), 0) + 1

    _HOOK[0] = hook
    model(first)
    return order, calls


def _population(model: nnx.Module, target: Any, inputs: list, calls: int) -> normkit.Moments:
    """Merged float64 ``Moments`` of ``target``'s inputs over every batch (each pass stops after its last call)."""
    total: list[Optional[normkit.Moments]] = [None]
    seen = [0]

    def hook(layer: Any, x: Any, mask: Any) -> None:
        if layer is not target:
            return
        part = _moments(layer, x, mask)
        total[0] = part if total[0] is None else total[0].merge(part)
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    _HOOK[0] = hook
    for x in inputs:
        seen[0] = 0
        try:
            model(x)
        except _Stop:
            pass
    assert total[0] is not None  # the call-order pass saw target called
    return total[0]


def _assign(bn: Any, total: normkit.Moments, name: str) -> None:
    count = np.asarray(total.count)
    if np.any(count < 1):
        empty = np.flatnonzero(np.broadcast_to(count, np.shape(total.mean)) < 1).tolist()
        raise ValueError(f"recalibrate: {name} saw no value in feature(s) {empty[:8]} (every position masked); "
                         "no statistics were changed")
    mean, var = np.asarray(total.mean), np.asarray(total.var)
    finite = np.isfinite(mean) & np.isfinite(var)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise ValueError(f"recalibrate: the inputs of {name} hold NaN or inf in feature(s) {bad[:8]}: expected "
                         "finite activations (check the batches); no statistics were changed")
    for variable, value in ((bn.mean, mean), (bn.var, var)):  # a float64 layer's in float64, as set_state
        variable.set_value(jnp.asarray(np.reshape(value, variable.shape), dtype=statistic_dtype(bn, variable)))


class FrozenBatchNorm(BatchNorm):
    """A BatchNorm that always normalizes with its running statistics (``freeze``): ``.train()``, ``nnx.view``
    and ``use_running_average=False`` leave it in inference; its statistics never change."""

    def __call__(self, x: Any, use_running_average: Optional[bool] = None, *, mask: Any = None) -> Any:
        return super().__call__(x, True, mask=mask)


_BN_CONFIG = ("use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype", "use_bias", "use_scale",
              "axis_name", "axis_index_groups", "use_fast_variance", "promote_dtype")


def _frozen(bn: Any) -> FrozenBatchNorm:
    """A ``FrozenBatchNorm`` with ``bn``'s configuration holding ``bn``'s very Variables (no copy)."""
    new = FrozenBatchNorm(bn.num_features, rngs=nnx.Rngs(0), **{k: getattr(bn, k) for k in _BN_CONFIG})
    for name in ("mean", "var", "scale", "bias"):
        setattr(new, name, getattr(bn, name))
    return new


def _children(node: Any) -> list[tuple[Any, Any]]:
    """(key, child) of a module's attributes or a list's entries."""
    if isinstance(node, nnx.List):
        return list(enumerate(node))
    return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]


def _replace(node: Any, change: Any, seen: set[int]) -> None:
    """Replace every module ``m`` under ``node`` for which ``change(m)`` returns a module (in place)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    for key, child in _children(node):
        if not isinstance(child, nnx.Module):
            continue
        new = change(child)
        if new is None:
            _replace(child, change, seen)
        elif isinstance(node, nnx.List):
            node[key] = new
        else:
            setattr(node, key, new)


def freeze(model: nnx.Module) -> nnx.Module:
    """Make every BatchNorm of ``model`` (in place; the model itself if it is one, returned) a ``FrozenBatchNorm``.

    The frozen layer keeps the same Variables (``mean``, ``var``, ``scale``, ``bias``: checkpoints and
    ``nnx.Optimizer(wrt=nnx.Param)`` unchanged) and normalizes with ``mean``/``var`` whatever the mode:
    ``model.train()`` then trains everything else with the BatchNorms in inference.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"freeze expects a flax.nnx.Module, got {type(model).__name__}")
    def change(m):
        return _frozen(m) if isinstance(m, nnx.BatchNorm) and not isinstance(m, FrozenBatchNorm) else None

    top = change(model)
    if top is not None:
        return top
    _replace(model, change, set())
    return model


def _fold_pair(layer: Any, bn: Any) -> Any:
    """A copy of ``layer`` (Conv/Linear, output features last) with ``bn`` (inference) folded into it."""
    kernel = np.asarray(layer.kernel[...], np.float64)
    out = kernel.shape[-1]
    if int(bn.axis) != -1 or bn.num_features != out:
        raise ValueError(f"fold_batch_norm: {type(bn).__name__}(axis={bn.axis}, {bn.num_features} features) after "
                         f"{type(layer).__name__} with {out} output features: the BatchNorm must normalize the last "
                         "axis (axis=-1) over the layer's output features")
    s = np.ones(out) if bn.scale is None else np.asarray(bn.scale[...], np.float64)
    s = s / np.sqrt(np.asarray(bn.var[...], np.float64) + bn.epsilon)
    shift = np.zeros(out) if bn.bias is None else np.asarray(bn.bias[...], np.float64)
    b = np.zeros(out) if layer.bias is None else np.asarray(layer.bias[...], np.float64)
    new = nnx.clone(layer)
    new.kernel[...] = jnp.asarray(kernel * s, new.kernel.dtype)
    folded = (b - np.asarray(bn.mean[...], np.float64)) * s + shift
    if new.bias is None:
        new.bias = nnx.Param(jnp.asarray(folded, new.kernel.dtype))
        new.use_bias = True
    else:
        new.bias[...] = jnp.asarray(folded, new.bias.dtype)
    return new


def _fold_sequential(seq: nnx.Sequential) -> None:
    layers = list(seq.layers)
    folded: list = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nnx.Sequential):
            _fold_sequential(layer)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, (nnx.Conv, nnx.Linear)) and isinstance(nxt, nnx.BatchNorm):
            folded.append(_fold_pair(layer, nxt))
            i += 2
            continue
        folded.append(layer)
        i += 1
    seq.layers = nnx.List(folded)


def fold_batch_norm(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in which every ``nnx.Conv``/``nnx.Linear`` followed by a BatchNorm in an ``nnx.Sequential``
    (nested ones too) is one ``Conv``/``Linear`` computing the pair's inference output; ``model`` is unchanged.

    The BatchNorm must normalize the layer's output features (``axis=-1``, Flax's channels-last); a
    layer without bias gets one. The fold is computed in float64 and cast once to the layer's dtype.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"fold_batch_norm expects a flax.nnx.Module, got {type(model).__name__}")
    copy = nnx.clone(model)
    sequentials = [m for _, m in nnx.iter_modules(copy) if isinstance(m, nnx.Sequential)]
    nested = {id(c) for s in sequentials for c in s.layers if isinstance(c, nnx.Sequential)}
    for seq in sequentials:
        if id(seq) not in nested:
            _fold_sequential(seq)
    return copy
