"""``freeze``: every batch norm of a Keras model in inference behaviour for good (fine-tuning).

Keras 3's rule for BatchNormalization: a layer with ``trainable=False`` runs in inference mode,
moving statistics and all, even when called with ``training=True`` (in ``fit``), and its gamma/beta
leave the trainable weights. ``freeze`` makes that permanent on normkit's layers (``frozen=True``,
saved in the config: a later ``model.trainable = True`` leaves them frozen); Keras's own layers can
only be given ``trainable=False``, which ``model.trainable = True`` undoes.
"""

from __future__ import annotations

from typing import Any

import keras

from normkit_keras._fold import batch_norm_classes

__all__ = ["freeze"]


def freeze(model: Any) -> Any:
    """Freeze every BatchNormalization in ``model`` (nested models included); returns ``model``.

    The frozen layers normalize with their moving statistics in training and inference, never
    update them, and their gamma/beta are not trained; the setting survives ``model.save`` and
    ``keras.saving.load_model``. Compile the model after freezing (Keras collects the trainable
    weights at compile time). normkit's layers get ``frozen=True`` and stay frozen through a
    later ``model.trainable = True`` (``layer.frozen = False`` lifts it); ``keras.layers``'
    get ``trainable=False`` only, which ``model.trainable = True`` undoes: call ``freeze`` again.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"freeze expects a keras.Model or Layer, got {type(model).__name__}")
    from normkit_keras._batch_normalization import BatchNormalization

    classes = batch_norm_classes()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, BatchNormalization):
            layer.frozen = True
        elif isinstance(layer, classes):
            layer.trainable = False
    return model
