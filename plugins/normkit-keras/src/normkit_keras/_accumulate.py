"""``accumulate_statistics(model)``: batch norm under gradient accumulation, one moving-statistics step per step.

Inside, every normkit ``BatchNormalization`` in training normalizes each call with its batch's statistics as
usual but records the batch's ``normkit.batch_moments`` instead of updating; on exit each folds the exact merge
(Chan, ``Moments.merge``) of what it recorded once, with Keras's convention:

    moving = moving * momentum + merged * (1 - momentum)      (mean, and the biased variance)

equal to one training call on the concatenated micro-batches. Eager calls only (a custom loop on TensorFlow
with ``GradientTape``, on torch with ``backward``, on JAX with ``jax.grad`` of ``stateless_call`` without
``jax.jit``): the records are concrete arrays, which a traced function (``tf.function``, ``jax.jit``,
``model.fit``) cannot hand out, so a call there raises. The fold assigns the model's own variables: on JAX,
read ``model.non_trainable_variables`` again after the context. ``model.fit`` with an optimizer's ``gradient_accumulation_steps=k`` applies
the gradients every k steps but updates the moving statistics on every micro-batch (k momentum steps).
A layer's training call asks ``normkit_keras._recording`` whether to record; this module opens and folds the records.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras

import normkit
from normkit import Moments
from normkit_keras._backend import backend_namespace, native
from normkit_keras._batch_normalization import BatchNormalization, core_arguments
from normkit_keras._recording import LOCK as _LOCK, RECORDS as _RECORDS

__all__ = ["accumulate_statistics"]

def _fold(layer: Any, records: list[Moments]) -> None:
    """One moving-statistics update of ``layer`` with the merge of ``records``, with the conventions of its own
    training call (``core_arguments``: new weight ``1 - momentum``, biased variance)."""
    merged = records[0]
    for part in records[1:]:
        merged = merged.merge(part)
    conventions = core_arguments(layer)
    new_mean, new_var = normkit.update_running_stats(
        native(layer.moving_mean), native(layer.moving_variance), merged, momentum=conventions["momentum"],
        correction=conventions["correction"], xp=backend_namespace(layer=layer))
    layer.moving_mean.assign(new_mean)
    layer.moving_variance.assign(new_var)


@contextlib.contextmanager
def accumulate_statistics(model: Any) -> Iterator[Any]:
    """Gradient accumulation for batch norm in a custom training loop: inside, every BatchNormalization's
    training calls normalize with their batch's statistics but only record them; on exit each layer takes one
    moving-statistics step with the exact merge of its micro-batches (as one call on their concatenation).
    An exception inside discards what was recorded (the statistics stay as they were).

    Every BatchNormalization in ``model`` must be normkit's (``normkit_keras.convert(model)`` first); a Keras one,
    or one with ``renorm=True`` (its own moving state), is refused by name, as is nesting on one layer.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"accumulate_statistics expects a keras.Model or keras Layer, got {type(model).__name__}")
    bns = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
           if isinstance(layer, keras.layers.BatchNormalization)]
    foreign = [f"{bn.name} ({type(bn).__module__}.{type(bn).__name__}{', renorm=True' if bn.renorm else ''})"
               for bn in bns if not isinstance(bn, BatchNormalization) or bn.renorm]
    if foreign:
        raise TypeError("accumulate_statistics needs normkit_keras.BatchNormalization layers without renorm "
                        f"(normkit_keras.convert(model) first); got {', '.join(foreign)}")
    with _LOCK:
        busy = [bn.name for bn in bns if id(bn) in _RECORDS]
        if busy:
            raise RuntimeError(f"accumulate_statistics is already active on {', '.join(busy)}: it does not nest")
        for bn in bns:
            _RECORDS[id(bn)] = []
    try:
        yield model
    except BaseException:
        with _LOCK:
            for bn in bns:
                _RECORDS.pop(id(bn), None)
        raise
    with _LOCK:
        recorded = [(bn, _RECORDS.pop(id(bn))) for bn in bns]
    for layer, records in recorded:
        if records:
            _fold(layer, records)
