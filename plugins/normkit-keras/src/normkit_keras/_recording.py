"""The training call's side of ``accumulate_statistics``: record this batch instead of updating the moving statistics?

A ``BatchNormalization`` training call asks ``record``; inside ``accumulate_statistics`` (``normkit_keras._accumulate``,
which opens the records and folds them on exit) the batch's ``Moments`` are recorded here and the call leaves its
moving statistics alone. The layer imports this module; ``_accumulate`` imports the layer, never the reverse.
"""

from __future__ import annotations

import threading
from typing import Any

import keras

import normkit
from normkit import Moments
from normkit_keras import _synchronized

__all__ = ["record", "RECORDS", "LOCK"]

LOCK = threading.Lock()
RECORDS: dict[int, list[Moments]] = {}  # id(layer) -> the Moments of each training call inside the context


def _traced(x: Any) -> bool:
    """Whether ``x`` is a symbolic value of a traced function (its statistics cannot leave the trace)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        return torch.compiler.is_compiling()
    return False


def record(layer: Any, x: Any, mask: Any, xp: Any) -> bool:
    """Called by a BatchNormalization training call that would update its moving statistics with batch ``x``:
    True when it must not (inside ``accumulate_statistics``: the batch's Moments are recorded for the fold)."""
    records = RECORDS.get(id(layer))
    if records is None:
        return False
    x = keras.ops.stop_gradient(x)  # under jax.grad without jit: the concrete value behind the tracer
    if _traced(x):
        raise RuntimeError(
            f"accumulate_statistics: BatchNormalization {layer.name!r} was called inside a traced function "
            "(tf.function, jax.jit, model.fit); call the model eagerly inside the context")
    batch = None
    if layer.synchronized:  # every replica's statistics, as the call normalized with
        batch = _synchronized.global_moments(x, axis=layer.axis, mask=mask, xp=xp, layer=layer._description())
    if batch is None:
        batch = normkit.batch_moments(x, axis=layer.axis, mask=mask, xp=xp)
    records.append(batch)
    return True
