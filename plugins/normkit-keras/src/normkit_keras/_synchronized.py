"""Synchronized batch norm: the batch statistics of every replica, merged exactly (Chan's formula).

Each replica computes its ``normkit.batch_moments`` (count, mean, m2); one collective gathers
them all, and every replica merges them in replica order with ``Moments.merge``; the output is
``normkit.normalize`` with the merged statistics (gradients flow through the collective) and the
running update ``normkit.update_running_stats``. The collective is the backend's:
TensorFlow's ``tf.distribute`` replica context here (one ``all_gather``, differentiable); with
one replica, or outside a strategy, this is plain ``normkit.batch_norm``.
"""

from __future__ import annotations

from typing import Any

import normkit
from normkit_keras._backend import backend_name

__all__ = ["batch_norm", "replicas"]


def replicas() -> int:
    """Replicas in sync of the current distribution (1 outside one, and on backends without one here)."""
    if backend_name() != "tensorflow":
        return 1
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else int(ctx.num_replicas_in_sync)


def _gather_tensorflow(local: normkit.Moments, n: int) -> list[normkit.Moments]:
    """Every replica's Moments, in replica order, from one differentiable ``all_gather``."""
    import tensorflow as tf

    mean = local.mean
    count = tf.broadcast_to(tf.cast(local.count, mean.dtype), tf.shape(mean))
    packed = tf.stack([count, mean, local.m2])[None]  # (1, 3, C)
    gathered = tf.distribute.get_replica_context().all_gather(packed, axis=0)  # (replicas, 3, C)
    return [normkit.Moments(count=tf.stop_gradient(gathered[i, 0]), mean=gathered[i, 1], m2=gathered[i, 2])
            for i in range(n)]


def batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, training: bool, momentum: Any,
               eps: float, axis: int, mask: Any, correction: float, allow_single_value: bool, xp: Any) -> Any:
    """``normkit.batch_norm``'s signature and result, with global batch statistics in training."""
    n = replicas() if training else 1
    if n == 1:
        return normkit.batch_norm(x, running_mean, running_var, weight, bias, training=training, momentum=momentum,
                                  eps=eps, axis=axis, mask=mask, correction=correction,
                                  allow_single_value=allow_single_value, xp=xp)
    merged = None
    for part in _gather_tensorflow(normkit.batch_moments(x, axis=axis, mask=mask, xp=xp), n):
        merged = part if merged is None else merged.merge(part)
    y = normkit.normalize(x, merged.mean, merged.var, weight, bias, eps=eps, axis=axis, xp=xp)
    new_mean, new_var = normkit.update_running_stats(running_mean, running_var, merged, momentum=momentum,
                                                     correction=correction, xp=xp)
    return normkit.BatchNormResult(y, new_mean, new_var)
