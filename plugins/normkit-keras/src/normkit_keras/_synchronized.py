"""Synchronized batch norm: the batch statistics of every replica, merged exactly (Chan's formula).

Each replica's ``normkit.batch_moments`` (count, mean, m2) goes through one collective, and the
rows are merged with ``Moments.merge``; the output is ``normkit.normalize`` with the merged
statistics and the running update ``normkit.update_running_stats``, as one replica on the
concatenated batch. Where each replica's statistics come from, per backend:

- TensorFlow, inside a ``tf.distribute`` replica context with several replicas: one ``all_gather``
  (differentiable). Outside ``strategy.run`` the layer sees the whole batch: plain batch norm.
- JAX under ``keras.distribution`` (``DataParallel``, ``ModelParallel``): the batch is one global
  array and XLA reduces across devices: plain batch norm is already global. Inside ``shard_map`` or
  ``pmap`` (manual mesh axes: the layer sees one device's shard): one ``jax.lax.psum`` of one-hot
  rows over those axes (differentiable; the statistics come out the same on every device). Several processes, no distribution, no manual axes: an error.
- torch with ``torch.distributed`` initialized and world size > 1: ``normkit_torch``'s
  ``all_gather_moments`` and an autograd function whose backward all-reduces two sums
  (``_synchronized_torch``).
- Anything else (one replica, one device, no process group): plain ``normkit.batch_norm``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import normkit
from normkit_keras._backend import backend_name

__all__ = ["batch_norm", "global_moments", "normalize", "merge_rows"]


class _Collective(NamedTuple):
    """A backend's collective over replicas and the few array functions the merge needs beyond ``xp``."""

    replicas: int
    gather: Callable[[Any], Any]  # this replica's packed (3, C) -> every replica's (replicas, 3, C), differentiable
    stack: Callable[[list], Any]  # along a new axis 0
    concat: Callable[[list], Any]  # along axis 0
    stop_gradient: Callable[[Any], Any]


def _tensorflow_collective() -> Optional[_Collective]:
    """One ``all_gather`` in a replica context with several replicas; None outside one or with one replica."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or int(ctx.num_replicas_in_sync) == 1:
        return None
    return _Collective(int(ctx.num_replicas_in_sync), lambda packed: ctx.all_gather(packed[None], axis=0), tf.stack,
                       lambda parts: tf.concat(parts, axis=0), tf.stop_gradient)


def _jax_manual_axes(x: Any) -> tuple[str, ...]:
    """The manual mesh axes ``x`` is split over (inside ``shard_map``/``pmap``); () for a global array."""
    import jax

    aval = jax.typeof(x)
    mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
    if mesh is None:
        return ()
    manual = tuple(name for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
                   if kind == jax.sharding.AxisType.Manual)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)  # known under check_vma
    return tuple(a for a in manual if a in varying) if varying else manual


def _jax_collective(x: Any, layer: str) -> Optional[_Collective]:
    """Every device's rows over the manual axes of ``x`` (one ``psum``); None for a global array; an error where
    the layer would see one process's batch only."""
    import jax
    import jax.numpy as jnp

    axes = _jax_manual_axes(x)
    if axes:
        n = int(jax.lax.axis_size(axes))

        def gather(packed: Any) -> Any:  # a psum of one-hot rows: the result is the same (invariant) on every device
            onehot = jnp.asarray(jnp.arange(n) == jax.lax.axis_index(axes), packed.dtype)
            return jax.lax.psum(onehot[:, None, None] * packed[None], axes)

        return _Collective(n, gather, jnp.stack,
                           lambda parts: jnp.concatenate(parts, axis=0), jax.lax.stop_gradient)
    if jax.process_count() > 1:
        import keras

        if keras.distribution.distribution() is None:
            raise RuntimeError(
                f"{layer}: synchronized=True on JAX with {jax.process_count()} processes needs the batch as one "
                "global array: set keras.distribution.set_distribution(keras.distribution.DataParallel(...)) "
                "(or call the layer inside shard_map/pmap); without it each process would normalize with its own "
                "batch's statistics")
    return None


def _pack(xp: Any, local: normkit.Moments, stack: Callable[[list], Any]) -> Any:
    """``[count; mean; m2]`` of shape (3, C), the count repeated per feature in the mean's dtype."""
    mean = local.mean
    count = local.count
    if isinstance(count, int):
        count = xp.asarray(float(count), dtype=mean.dtype)
    count = xp.broadcast_to(xp.astype(count, mean.dtype), tuple(mean.shape))
    return stack([count, mean, local.m2])


def merge_rows(xp: Any, rows: Any, collective: _Collective) -> normkit.Moments:
    """Merge ``(replicas, 3, C)`` packed rows with ``Moments.merge``, a pairwise tree vectorized over rows."""
    n = collective.replicas
    parts = normkit.Moments(count=collective.stop_gradient(rows[:, 0, :]), mean=rows[:, 1, :], m2=rows[:, 2, :])
    while n > 1:
        if n % 2:  # a row of count 0: the identity of the merge
            pad = xp.zeros_like(parts.mean[:1, :])
            parts = normkit.Moments(*(collective.concat([t, pad]) for t in (parts.count, parts.mean, parts.m2)))
            n += 1
        n //= 2
        top = normkit.Moments(count=parts.count[:n, :], mean=parts.mean[:n, :], m2=parts.m2[:n, :])
        low = normkit.Moments(count=parts.count[n:, :], mean=parts.mean[n:, :], m2=parts.m2[n:, :])
        parts = top.merge(low)
    return normkit.Moments(count=parts.count[0, :], mean=parts.mean[0, :], m2=parts.m2[0, :])


def global_moments(x: Any, *, axis: int, mask: Any, xp: Any, layer: str) -> Optional[normkit.Moments]:
    """The batch statistics of every replica's ``x`` together (differentiable on TensorFlow and JAX), or None where
    this layer sees the whole batch (one replica, a global array, no process group). ``layer`` names it in errors."""
    backend = backend_name()
    if backend == "torch":
        from normkit_keras import _synchronized_torch

        if _synchronized_torch.world_size() == 1:
            return None
        return _synchronized_torch.global_moments(x, axis=axis, mask=mask, layer=layer)
    if backend == "tensorflow":
        collective = _tensorflow_collective()
    elif backend == "jax":
        collective = _jax_collective(x, layer)
    else:
        collective = None
    if collective is None:
        return None
    local = normkit.batch_moments(x, axis=axis, mask=mask, xp=xp)
    return merge_rows(xp, collective.gather(_pack(xp, local, collective.stack)), collective)


def normalize(x: Any, total: normkit.Moments, weight: Any, bias: Any, *, eps: float, axis: int, mask: Any,
              xp: Any) -> Any:
    """``normkit.normalize`` with ``global_moments``' statistics; on torch with gradients as one process would have."""
    if backend_name() == "torch":
        from normkit_keras import _synchronized_torch

        return _synchronized_torch.normalize(x, total, weight, bias, eps=eps, axis=axis, mask=mask)
    return normkit.normalize(x, total.mean, total.var, weight, bias, eps=eps, axis=axis, xp=xp)


def batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, training: bool, momentum: Any,
               eps: float, axis: int, mask: Any, correction: float, allow_single_value: bool, xp: Any,
               layer: str = "BatchNormalization") -> Any:
    """``normkit.batch_norm``'s signature and result, with the statistics of every replica's batch in training."""
    total = global_moments(x, axis=axis, mask=mask, xp=xp, layer=layer) if training else None
    if total is None:
        return normkit.batch_norm(x, running_mean, running_var, weight, bias, training=training, momentum=momentum,
                                  eps=eps, axis=axis, mask=mask, correction=correction,
                                  allow_single_value=allow_single_value, xp=xp)
    y = normalize(x, total, weight, bias, eps=eps, axis=axis, mask=mask, xp=xp)
    new_mean, new_var = normkit.update_running_stats(running_mean, running_var, total, momentum=momentum,
                                                     correction=correction, xp=xp)
    return normkit.BatchNormResult(y, new_mean, new_var)
