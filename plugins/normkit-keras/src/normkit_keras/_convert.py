"""``convert(model)``: a copy of a Keras model whose normalization layers are normkit's, weights and config kept.

The copy is ``copy.deepcopy(model)`` (its class, graph, weights, dtype policies and sub-models as they are:
a keras-hub ``BertBackbone`` stays a ``BertBackbone``, a subclassed model keeps its ``call``). Then each
normalization layer of exactly a mapped class becomes an instance of its normkit twin in place (its class is
swapped; normkit's classes subclass Keras's and replace ``call`` only), so every graph node, attribute and
variable of the copy stays where it was; the copy's config then names normkit's registered classes.

Mapped: keras.layers' BatchNormalization, LayerNormalization, GroupNormalization, RMSNormalization,
UnitNormalization; keras-hub's RMS layers of Llama's shape (``x * rsqrt(mean(x**2, -1) + epsilon) * scale``
computed in float32: LlamaLayerNorm, MistralLayerNormalization, MixtralLayerNormalization, Phi3LayerNorm,
QwenLayerNorm, QwenMoeLayerNorm, GptOssLayerNormalization) when their compute dtype is float32, where
normkit's RMSNormalization computes the same. Every other layer that looks like a normalization layer is
named in the ``ConversionReport`` (or an ``UnconvertedNormWarning``), never left in silence.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterator

import keras

from normkit._conversion import ConversionReport, UnconvertedNormWarning

__all__ = ["convert", "ConversionReport", "UnconvertedNormWarning", "KERAS_HUB_RMS"]

# keras-hub's classes of Llama's shape: weight ``scale`` (last axis), attribute ``epsilon``, computed in float32
KERAS_HUB_RMS = frozenset({
    "keras_hub.src.models.llama.llama_layernorm.LlamaLayerNorm",
    "keras_hub.src.models.mistral.mistral_layer_norm.MistralLayerNormalization",
    "keras_hub.src.models.mixtral.mixtral_layer_norm.MixtralLayerNormalization",
    "keras_hub.src.models.phi3.phi3_layernorm.Phi3LayerNorm",
    "keras_hub.src.models.qwen.qwen_layernorm.QwenLayerNorm",
    "keras_hub.src.models.qwen_moe.qwen_moe_layernorm.QwenMoeLayerNorm",
    "keras_hub.src.models.gpt_oss.gpt_oss_layer_norm.GptOssLayerNormalization",
})


def _twins() -> dict[type, type]:
    from normkit_keras import _batch_normalization as bn, _family as fam

    layers = keras.layers
    return {
        layers.BatchNormalization: bn.BatchNormalization,
        layers.LayerNormalization: fam.LayerNormalization,
        layers.GroupNormalization: fam.GroupNormalization,
        layers.RMSNormalization: fam.RMSNormalization,
        layers.UnitNormalization: fam.UnitNormalization,
    }


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _walk(layer: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for ``layer`` and every layer inside it, depth first, each object once per path."""
    yield path, layer
    for child in layer._flatten_layers(include_self=False, recursive=False):
        yield from _walk(child, f"{path}/{child.name}" if path else child.name)


def _looks_like_norm(layer: Any) -> bool:
    name = type(layer).__name__.lower()
    return "norm" in name or isinstance(layer, tuple(_twins()))


def _is_normkit(layer: Any) -> bool:
    return type(layer).__module__.startswith("normkit_keras.")


def _target(layer: Any, twins: dict[type, type]) -> tuple[Any, str]:
    """The normkit class for ``layer`` (or None) and, when None, why it stays."""
    cls = type(layer)
    if cls in twins:
        return twins[cls], ""
    from normkit_keras._family import RMSNormalization

    if _qualified(cls) in KERAS_HUB_RMS:
        if layer.compute_dtype == "float32":
            return RMSNormalization, ""
        return None, (f"computes in float32 whatever its dtype policy ({layer.dtype_policy.name}); normkit's "
                      "RMSNormalization computes in the input's dtype: converted under a float32 policy only")
    native = [base.__name__ for base in cls.__mro__[1:] if base in twins]
    if native:
        return None, f"a subclass of keras.layers.{native[0]}: its own methods may change what it computes"
    if isinstance(layer, keras.layers.Normalization):
        return None, ("normkit_keras.Standardize differs from keras.layers.Normalization where a variance is 0 "
                      "(0 instead of x / 1e-7)")
    return None, "no normkit layer computes what it does"


def _swap(layer: Any, cls: type) -> None:
    """Make ``layer`` an instance of ``cls`` (a subclass of its class, or an RMS twin of a keras-hub layer)."""
    before = list(layer.call_signature_parameters)
    if isinstance(layer, keras.layers.BatchNormalization):
        layer._frozen = False
        layer.virtual_batch_size = None
    if not isinstance(layer, cls.__mro__[1]):  # a keras-hub RMS layer: Keras's RMSNormalization reads ``axis``
        layer.axis = -1
    layer.__class__ = cls
    layer._call_signature = inspect.signature(layer.call)
    after = [p.name for p in layer._call_signature.parameters.values()]
    if after != before:  # never reached with the mapped classes: their call signatures are the same
        raise RuntimeError(f"convert: {cls.__name__}.call takes {after}, the layer's took {before}")


def convert(model: Any, *, report: bool = False) -> Any:
    """A copy of ``model`` (any keras Layer: Sequential, functional, subclassed, a keras-hub backbone) in which
    every Keras normalization layer is normkit's; ``model`` is left untouched.

    The copy keeps the model's class, weights, configs and dtype policies (``copy.deepcopy``); the mapped layers
    (module docstring) become their normkit twins in place, which compute the same (``y = gamma * (x - mean) /
    sqrt(var + epsilon) + beta`` and the like, two-pass) and train the same. Anything that looks like a
    normalization layer and is left is named in an ``UnconvertedNormWarning``; ``report=True`` returns
    ``(copy, ConversionReport)`` instead. A keras-hub backbone saved after ``convert`` reloads from its own
    arguments, with Keras's layers: convert it again after loading.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"convert expects a keras.Model or keras Layer, got {type(model).__name__}")
    out = copy.deepcopy(model)
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(out, name, None) is not None:  # compiled functions of the original's layers: rebuilt on use
            setattr(out, name, None)
    twins = _twins()
    summary = ConversionReport([], [])
    seen: set[int] = set()
    for path, layer in _walk(out, ""):
        if id(layer) in seen or _is_normkit(layer) or not (_looks_like_norm(layer) or type(layer) in twins
                                                           or _qualified(type(layer)) in KERAS_HUB_RMS):
            continue
        seen.add(id(layer))
        name = path or layer.name
        target, reason = _target(layer, twins)
        if target is None:
            summary.skipped.append((name, type(layer).__name__, reason))
            continue
        old = type(layer).__name__
        _swap(layer, target)
        summary.converted.append((name, old, f"normkit_keras.{target.__name__}"))
    return summary.finish(out, report=report)
