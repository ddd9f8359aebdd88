"""Fold inference-mode BatchNormalization layers into the convolution or Dense layer before them (a new model).

Per output channel c of a layer ``y = x * kernel + bias`` followed by a batch norm (inference):

    scale = gamma / sqrt(moving_variance + epsilon)
    kernel'[..., c] = kernel[..., c] * scale[c]        bias' = (bias - moving_mean) * scale + beta

computed in float64 NumPy and stored in the layer's variable dtype. DepthwiseConv's output channel
``i * depth_multiplier + m`` scales ``kernel[..., i, m]``; SeparableConv folds into its pointwise kernel.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

__all__ = ["fold_batch_norm", "UnfoldedBatchNormWarning", "batch_norm_classes"]


class UnfoldedBatchNormWarning(UserWarning):
    """BatchNormalization layers ``fold_batch_norm`` left in the model; ``.unfolded`` lists ``(name, reason)``."""

    def __init__(self, unfolded: list[tuple[str, str]]) -> None:
        self.unfolded = unfolded
        lines = "".join(f"\n  {name}: {reason}" for name, reason in unfolded)
        super().__init__(f"fold_batch_norm left {len(unfolded)} batch norm layer(s) in the model:{lines}")


def batch_norm_classes() -> tuple[type, ...]:
    """keras.layers.BatchNormalization and normkit_keras.BatchNormalization."""
    from normkit_keras._batch_normalization import BatchNormalization

    return (keras.layers.BatchNormalization, BatchNormalization)


def _foldable_classes() -> tuple[type, ...]:
    L = keras.layers
    return (L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D,
            L.SeparableConv2D, L.Dense)


def _is_model(layer: Any) -> bool:
    return isinstance(layer, keras.Model)


def _is_functional(model: Any) -> bool:
    return hasattr(model, "_nodes_by_depth") and not isinstance(model, keras.Sequential)


def _reason(layer: Any, bn: Any) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (None when it can)."""
    if keras.activations.serialize(layer.activation) != "linear":
        return f"{layer.name} applies an activation ({keras.activations.serialize(layer.activation)}) before it"
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None) is not None:
        return f"{layer.name} uses LoRA or quantization"
    if not (layer.built and bn.built):
        return "the model is not built"
    rank = bn.input_spec.ndim if bn.input_spec is not None else None
    if rank is None:
        return "its input rank is unknown"
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    layer_axis = 1 if channels_first else rank - 1
    if bn.axis % rank != layer_axis:
        return f"it normalizes axis {bn.axis}, {layer.name}'s channels are on axis {layer_axis}"
    return None


def _fold_weights(layer: Any, bn: Any) -> dict[str, np.ndarray]:
    """The new layer's weights by variable name (with ``bias``), folded in float64."""
    old = {v.name: np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in layer.weights}
    c = bn.moving_mean.shape[0]
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), np.float64)
    var = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), np.float64)
    gamma = np.asarray(keras.ops.convert_to_numpy(bn.gamma), np.float64) if bn.scale else np.ones(c)
    beta = np.asarray(keras.ops.convert_to_numpy(bn.beta), np.float64) if bn.center else np.zeros(c)
    scale = gamma / np.sqrt(var + bn.epsilon)
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        name = "pointwise_kernel"
        kernel = old[name] * scale
    elif isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        name = "kernel"
        k = old[name]
        kernel = k * scale.reshape(k.shape[-2], k.shape[-1])
    else:
        name = "kernel"
        kernel = old[name] * scale
    bias = old.get("bias", np.zeros(c))
    new = dict(old)
    new[name] = kernel
    new["bias"] = (bias - mean) * scale + beta
    return new


def _graph_pairs(model: Any) -> tuple[dict[int, Any], dict[int, str]]:
    """({id(bn): layer}, {id(bn): reason}) for the batch norms of a functional model's own graph."""
    nodes = [n for depth in model._nodes_by_depth.values() for n in depth]
    calls: dict[int, int] = {}
    consumers: dict[int, int] = {}
    for n in nodes:
        calls[id(n.operation)] = calls.get(id(n.operation), 0) + 1
        for kt in n.input_tensors:
            consumers[id(kt)] = consumers.get(id(kt), 0) + 1
    for kt in model.outputs:
        consumers[id(kt)] = consumers.get(id(kt), 0) + 1
    pairs, reasons = {}, {}
    bn_classes, foldable = batch_norm_classes(), _foldable_classes()
    for n in nodes:
        bn = n.operation
        if not isinstance(bn, bn_classes):
            continue
        args, kwargs = n.arguments.args, n.arguments.kwargs
        if len(n.input_tensors) != 1 or len(args) != 1 or any(v is not None and v is not False for v in kwargs.values()):
            reasons[id(bn)] = "it is called with extra arguments (training=True, a mask)"
            continue
        kt = n.input_tensors[0]
        layer = kt._keras_history.operation
        if not isinstance(layer, foldable):
            reasons[id(bn)] = "no Conv/DepthwiseConv/SeparableConv/Dense directly before it"
        elif consumers[id(kt)] != 1:
            reasons[id(bn)] = f"{layer.name}'s output has other consumers"
        elif calls[id(layer)] != 1 or calls[id(bn)] != 1:
            reasons[id(bn)] = f"it or {layer.name} is called more than once in the model"
        else:
            pairs[id(bn)] = layer
    return pairs, reasons


def _sequential_pairs(model: Any) -> tuple[dict[int, Any], dict[int, str]]:
    layers = list(model.layers)
    pairs, reasons = {}, {}
    bn_classes, foldable = batch_norm_classes(), _foldable_classes()
    counts: dict[int, int] = {}
    for layer in layers:
        counts[id(layer)] = counts.get(id(layer), 0) + 1
    for i, bn in enumerate(layers):
        if not isinstance(bn, bn_classes):
            continue
        prev = layers[i - 1] if i else None
        if not isinstance(prev, foldable):
            reasons[id(bn)] = "no Conv/DepthwiseConv/SeparableConv/Dense directly before it"
        elif counts[id(prev)] != 1 or counts[id(bn)] != 1:
            reasons[id(bn)] = f"it or {prev.name} is used more than once in the model"
        else:
            pairs[id(bn)] = prev
    return pairs, reasons


def _clone_config(layer: Any, **changes: Any) -> Any:
    return layer.__class__.from_config({**layer.get_config(), **changes})


def _fold_model(model: Any, path: str, unfolded: list[tuple[str, str]]) -> Any:
    if isinstance(model, keras.Sequential):
        pairs, reasons = _sequential_pairs(model)
    elif _is_functional(model):
        pairs, reasons = _graph_pairs(model)
    else:
        raise TypeError(
            f"fold_batch_norm needs a Sequential or functional keras.Model, got {type(model).__name__} "
            "(a subclassed model has no graph to fold along)"
        )
    if not model.built:
        raise ValueError(f"fold_batch_norm: build {model.name} first (call it once or give it an Input)")
    bns = {id(b): b for b in model.layers}
    for bn_id, layer in list(pairs.items()):
        reason = _reason(layer, bns[bn_id])
        if reason is not None:
            del pairs[bn_id]
            reasons[bn_id] = reason
    folded_layers = {id(layer): bn_id for bn_id, layer in pairs.items()}
    clones: dict[int, Any] = {}
    skipped: set[int] = set()

    def clone(layer: Any) -> Any:
        if _is_model(layer):
            new = _fold_model(layer, f"{path}/{layer.name}", unfolded)
        elif id(layer) in pairs:
            new = keras.layers.Identity(name=layer.name)  # a marker: never called in the new model
            skipped.add(id(new))
        elif id(layer) in folded_layers:
            new = _clone_config(layer, use_bias=True)
        else:
            new = _clone_config(layer)
        clones[id(layer)] = new
        return new

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        return args[0] if id(layer) in skipped else layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        head = model._layers[0]
        inputs = []
        if isinstance(head, keras.layers.InputLayer):
            inputs = [keras.Input(batch_shape=head.batch_shape, dtype=head.dtype, name=head.name)]
        new_model = keras.Sequential(inputs + [clone(layer) for layer in model.layers if id(layer) not in pairs],
                                     name=model.name, trainable=model.trainable)
    else:
        new_model = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        new = clones.get(id(layer))
        if new is None or id(layer) in pairs or _is_model(layer):
            continue
        if id(layer) in folded_layers:
            weights = _fold_weights(layer, bns[folded_layers[id(layer)]])
            new.set_weights([weights[v.name] for v in new.weights])
        else:
            new.set_weights(layer.get_weights())
    for layer in model.layers:
        if isinstance(layer, batch_norm_classes()) and id(layer) not in pairs:
            unfolded.append((f"{path}/{layer.name}", reasons.get(id(layer), "no foldable layer before it")))
    return new_model


def fold_batch_norm(model: Any) -> Any:
    """A NEW model equal to ``model`` in inference, with its foldable BatchNormalization layers folded away.

    A batch norm (keras.layers' or normkit_keras's) folds into the Conv1D/2D/3D, DepthwiseConv1D/2D,
    SeparableConv1D/2D (its pointwise kernel) or Dense layer that produces its only input, when that
    output has no other consumer, the layer has no activation, both are called once, and the batch
    norm normalizes the layer's channel axis (``data_format`` channels_last or channels_first). The
    layer gains a bias where it had none; the batch norm is gone from the new model. Sequential and
    functional models (nested ones too) are folded; the original model is left as it was.
    Batch norms left are listed with the reason in one ``UnfoldedBatchNormWarning`` (``.unfolded``).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"fold_batch_norm expects a keras.Model, got {type(model).__name__}")
    unfolded: list[tuple[str, str]] = []
    new_model = _fold_model(model, model.name, unfolded)
    if unfolded:
        warnings.warn(UnfoldedBatchNormWarning(unfolded), stacklevel=2)
    return new_model
