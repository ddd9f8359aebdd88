"""Recalibration: every BatchNormalization's moving statistics become its inputs' population statistics.

Batch norms are recalibrated one at a time, in the order the forward pass first calls them (a
topological order). For each, the model runs in inference mode over every batch with the layer's
``call`` wrapped to capture its input (the pass stops there); each batch gives
``normkit.batch_moments`` (float64 NumPy, the layer's axis and mask), merged with Chan's formula
(``Moments.merge``, float64 whatever the model's dtype), so each layer sees the activations of the
model whose earlier batch norms are already recalibrated. A layer called k times per forward pass
(a shared layer) gets the merge of the inputs of all k calls (its later calls' inputs computed with
its statistics from before this recalibration, as the one pass runs):

    moving_mean = mean,   moving_variance = m2 / count (biased, Keras's convention)
    (renorm=True layers also get moving_stddev = sqrt(moving_variance + epsilon))
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import keras
import numpy as np

import normkit
from normkit import Moments
from normkit_keras._fold import batch_norm_classes

__all__ = ["recalibrate"]

AUTO_PROGRESS_BATCHES = 200  # progress=None shows a bar (on a terminal) from this many batch forwards


class _Stop(BaseException):
    """Raised by the capture wrapper to cut a forward pass short (BaseException: no ``except Exception`` eats it)."""


def _input_of(batch: Any) -> Any:
    """The model input of a batch: the batch, or the first element of a tuple ``(x, y[, sample_weight])``."""
    return batch[0] if isinstance(batch, tuple) else batch


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or keras.ops.is_tensor(x)


def _batches(data: Any, steps: Optional[int], batch_size: Optional[int]) -> list:
    """The model inputs of the first ``steps`` batches of ``data``, read once."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if _is_array(data):
        size = 32 if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = int(data.shape[0])
        return [data[i:i + size] for i in range(0, n, size)][:steps]
    if batch_size is not None:
        raise ValueError("batch_size applies to array data only; the batches of an iterable are taken as they are")
    if isinstance(data, keras.utils.PyDataset):
        data = (data[i] for i in range(len(data)))
    inputs = []
    for batch in data:
        if steps is not None and len(inputs) >= steps:
            break
        inputs.append(_input_of(batch))
    return inputs


def _numpy64(x: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


class _Wrapped:
    """Wraps a layer's ``call`` (instance attribute, removed afterwards) to run ``before(args, kwargs)`` first."""

    def __init__(self, layer: Any, before: Callable) -> None:
        self.layer, self.original = layer, layer.call
        self.before = before

    def __enter__(self) -> None:
        original, before = self.original, self.before

        def call(*args: Any, **kwargs: Any) -> Any:
            before(args, kwargs)
            return original(*args, **kwargs)

        object.__setattr__(self.layer, "call", call)

    def __exit__(self, *exc: Any) -> None:
        object.__delattr__(self.layer, "call")


def _run(model: Any, x: Any) -> None:
    try:
        model(x, training=False)
    except _Stop:
        pass


def _call_order(model: Any, bns: list, first: Any) -> tuple[list, dict]:
    order: list = []
    calls: dict[int, int] = {}

    def record(layer: Any) -> Callable:
        def before(args: tuple, kwargs: dict) -> None:
            if id(layer) not in calls:
                order.append(layer)
            calls[id(layer)] = calls.get(id(layer), 0) + 1
        return before

    wrappers = [_Wrapped(bn, record(bn)) for bn in bns]
    for w in wrappers:
        w.__enter__()
    try:
        _run(model, first)
    finally:
        for w in wrappers:
            w.__exit__()
    return order, calls


def _population(model: Any, bn: Any, inputs: list, calls: int, tick: Callable) -> Moments:
    total: list[Optional[Moments]] = [None]
    seen = [0]

    def before(args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["inputs"]
        mask = kwargs.get("mask")
        mask = None if mask is None else np.asarray(keras.ops.convert_to_numpy(mask), dtype=bool)
        part = normkit.batch_moments(_numpy64(x), axis=bn.axis, mask=mask)
        total[0] = part if total[0] is None else total[0].merge(part)
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    with _Wrapped(bn, before):
        for x in inputs:
            seen[0] = 0
            _run(model, x)
            tick()
    assert total[0] is not None  # the call-order pass saw bn called
    return total[0]


def _assign(bn: Any, total: Moments, name: str) -> None:
    count = np.asarray(total.count)
    if np.min(count) < 1:
        raise ValueError(f"recalibrate: {name} saw no value for some feature (every position masked)")
    finite = np.isfinite(np.asarray(total.mean)) & np.isfinite(np.asarray(total.m2))
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise ValueError(f"recalibrate: the inputs of {name} hold NaN or inf in feature(s) {bad[:8]}: expected "
                         "finite activations (check the data); no moving statistics were changed")
    var = np.asarray(total.var)
    bn.moving_mean.assign(np.asarray(total.mean).astype(bn.moving_mean.dtype))
    bn.moving_variance.assign(var.astype(bn.moving_variance.dtype))
    if getattr(bn, "renorm", False):
        bn.moving_stddev.assign(np.sqrt(var + bn.epsilon).astype(bn.moving_stddev.dtype))


_STATE = ("moving_mean", "moving_variance", "moving_stddev")


def _snapshot(bns: list) -> list[tuple[Any, np.ndarray]]:
    return [(v, np.array(keras.ops.convert_to_numpy(v))) for bn in bns
            for v in (getattr(bn, k, None) for k in _STATE) if v is not None]


def _progress(progress: Optional[bool], total: int) -> Any:
    show = progress if progress is not None else (total >= AUTO_PROGRESS_BATCHES and sys.stdout.isatty())
    return keras.utils.Progbar(total, unit_name="batch") if show else None


def recalibrate(
    model: Any, data: Any, steps: Optional[int] = None, progress: Optional[bool] = None, *,
    batch_size: Optional[int] = None,
) -> Any:
    """Set every BatchNormalization's moving statistics in ``model`` to the exact statistics of its inputs.

    ``data``: an array (split into batches of ``batch_size``, default 32) or an iterable of batches
    (a list, a tf.data.Dataset, a generator, a PyDataset), each the model input or a tuple
    ``(x, y[, sample_weight])``; the first ``steps`` batches (all when None) are read once and kept
    for the passes (one per batch norm, each stopping at it). Batch norms (keras.layers' and
    normkit_keras's, in nested models too) get ``moving_mean`` and the biased ``moving_variance``
    of their inputs over all batches (masked positions excluded; a layer called several times per
    forward pass: all its calls' inputs), computed in float64; batches may differ in size. No batch,
    NaN/inf activations or a failing batch raise, with every layer's statistics left as they were. The
    model runs eagerly in inference mode (``training=False``). ``progress``: a Keras progress bar
    (True), none (False), or one on a terminal from 200 batch forwards (None). Returns ``model``.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"recalibrate expects a keras.Model, got {type(model).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"recalibrate: progress must be True, False or None, got {progress!r}")
    if not (_is_array(data) or hasattr(data, "__iter__") or isinstance(data, keras.utils.PyDataset)):
        raise TypeError("recalibrate: data must be an array or an iterable of batches (a list, a tf.data.Dataset, "
                        f"a generator, a PyDataset), got {type(data).__name__}")
    classes = batch_norm_classes()
    bns = [layer for layer in model._flatten_layers(include_self=False, recursive=True) if isinstance(layer, classes)]
    unbuilt = [bn.name for bn in bns if not bn.built]
    if unbuilt:
        raise ValueError(f"recalibrate: build the model first (call it once); unbuilt: {', '.join(unbuilt)}")
    inputs = _batches(data, steps, batch_size)
    if not inputs:
        raise ValueError("recalibrate got no batch: data must yield at least one model input "
                         f"(got an empty {type(data).__name__}); no moving statistics were changed")
    order, calls = _call_order(model, bns, inputs[0])
    missed = [bn.name for bn in bns if id(bn) not in calls]
    if missed:
        warnings.warn(f"recalibrate: the forward pass never calls {', '.join(missed)}; their statistics are unchanged",
                      stacklevel=2)
    bar = _progress(progress, len(order) * len(inputs))
    done = [0]

    def tick() -> None:
        done[0] += 1
        if bar is not None:
            bar.update(done[0])

    saved = _snapshot(order)
    try:
        for bn in order:
            _assign(bn, _population(model, bn, inputs, calls[id(bn)], tick), bn.name)
    except BaseException:
        for variable, value in saved:  # an error part-way (NaN, a failing batch): every layer as it was
            variable.assign(value)
        raise
    return model
