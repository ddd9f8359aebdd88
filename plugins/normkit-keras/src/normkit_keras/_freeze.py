"""``freeze``: every batch norm of a Keras model in inference behaviour for good (fine-tuning).

Keras 3's rule for BatchNormalization (keras.layers' and normkit_keras's alike): a layer with
``trainable=False`` runs in inference mode, moving statistics and all, even when called with
``training=True`` (in ``fit``), and its gamma/beta leave the trainable weights. ``trainable`` is
part of the layer config, so a saved and reloaded model keeps it.
"""

from __future__ import annotations

from typing import Any

import keras

from normkit_keras._fold import batch_norm_classes

__all__ = ["freeze"]


def freeze(model: Any) -> Any:
    """Set ``trainable=False`` on every BatchNormalization in ``model`` (nested models included); returns ``model``.

    The frozen layers normalize with their moving statistics in training and inference, never
    update them, and their gamma/beta are not trained; the setting survives ``model.save`` and
    ``keras.saving.load_model``. Compile the model after freezing (Keras collects the trainable
    weights at compile time). A later ``model.trainable = True`` makes every sublayer trainable
    again, batch norms included: call ``freeze`` again after it.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"freeze expects a keras.Model or Layer, got {type(model).__name__}")
    classes = batch_norm_classes()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, classes):
            layer.trainable = False
    return model
