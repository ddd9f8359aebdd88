"""Drop-ins for ``flax.nnx``'s normalization layers: the twin's constructor, Variables and modes; normkit's statistics.

Each class subclasses its ``flax.nnx`` twin, so ``__init__`` (signature, defaults, ``scale``/``bias``
as ``nnx.Param``, ``mean``/``var`` as ``nnx.BatchStat``), ``.train()``/``.eval()``, ``nnx.view``,
``nnx.state``/Orbax checkpoints and ``nnx.Optimizer(wrt=nnx.Param)`` are Flax's. Only ``__call__``
differs:

- ``use_fast_variance=True`` (Flax's default) under kernel policy ``"auto"`` and without ``axis_name``
  runs the twin's own code: Flax's numbers, ``E[x**2] - E[x]**2`` clamped at 0 included;
- ``use_fast_variance=False``, policy ``"core"``, or any ``axis_name``: normkit's exact statistics
  (``_stats``: corrected two-pass, masks as weights, the shards merged by count in one collective).

Running statistics follow Flax: ``new = momentum * old + (1 - momentum) * batch`` with the biased
batch variance (``normkit.update_running_stats`` with the weight of the new batch ``1 - momentum``
and ``correction=0``). A kept entry (feature) with nothing counted under a mask keeps its running
statistics and normalizes with mean and variance 0 (Flax's are NaN there).
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import nnx

import normkit
from normkit_flax import _stats
from normkit_flax._policy import POLICY

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]


def _native(layer: Any) -> bool:
    """Whether ``layer`` computes with its Flax twin's own code (fast variance, policy auto, no axis_name)."""
    return bool(layer.use_fast_variance) and layer.axis_name is None and POLICY.enabled()


def _value(variable: Any) -> Any:
    return None if variable is None else variable[...]


def _weight_of_new(momentum: Any) -> Any:
    """Flax's momentum (weight of the old value) as normkit's (weight of the new batch), exactly in decimal."""
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        return normkit.NormState.complement(float(momentum))
    return 1.0 - momentum


_NO_MODE = (
    "No `use_running_average` argument was provided to BatchNorm. Pass `use_running_average` to the BatchNorm "
    "constructor or to its __call__, or use `nnx.view(model, use_running_average=True/False)`"
)


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with normkit's exact statistics (``use_fast_variance=False`` or ``axis_name``).

    training: ``y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias`` (biased ``var_B``);
    ``mean <- momentum * mean + (1 - momentum) * mean_B``, ``var`` likewise with the biased ``var_B``.
    """

    def __call__(self, x: Any, use_running_average: Optional[bool] = None, *, mask: Any = None) -> Any:
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE)
        if _native(self):
            return super().__call__(x, use_running_average, mask=mask)
        feature_axes = _stats.canonical_axes(x.ndim, self.axis)
        view = _stats.View(tuple(x.shape), tuple(i for i in range(x.ndim) if i not in feature_axes))
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)), dtype=self.dtype)
        def flat(a):
            return None if a is None else jnp.reshape(a, (-1,))

        x2, mean, var, scale, bias = view.flat(x), flat(mean), flat(var), flat(scale), flat(bias)
        if use_running_average:
            return view.unflat(normkit.normalize(x2, mean, var, scale, bias, eps=self.epsilon, axis=view.feature))
        momentum = _weight_of_new(self.momentum)
        wide = jnp.promote_types(self.mean.dtype, _compute(x).dtype)  # Flax: stored stats with the batch's
        old_mean, old_var = flat(self.mean[...]).astype(wide), flat(self.var[...]).astype(wide)
        if self.axis_name is None:  # one call of the core: exact to round-off, centred before scaling
            m2d = None if mask is None else view.flat(jnp.broadcast_to(jnp.asarray(mask, bool), tuple(x.shape)))
            y2, new_mean, new_var = normkit.batch_norm(
                x2, old_mean, old_var, scale, bias, training=True, momentum=momentum, eps=self.epsilon,
                axis=view.feature, mask=m2d, correction=0, allow_single_value=True)
        else:
            stats = _stats.exact_moments(_compute(x), view, mask=mask, axis_name=self.axis_name,
                                         axis_index_groups=self.axis_index_groups)
            y2 = normkit.normalize(stats.centered, stats.offset, stats.total.var, scale, bias, eps=self.epsilon,
                                   axis=view.feature).astype(x.dtype)
            new_mean, new_var = normkit.update_running_stats(old_mean, old_var, stats.total, momentum=momentum,
                                                             correction=0)
        self.mean[...] = jnp.reshape(new_mean, self.mean.shape).astype(self.mean.dtype)
        self.var[...] = jnp.reshape(new_var, self.var.shape).astype(self.var.dtype)
        return view.unflat(y2)


def _compute(x: Any) -> Any:
    """``x`` in its compute dtype: float32 for half precision (Flax's statistics are at least float32)."""
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


def _standardize(layer: Any, x: Any, reduced: tuple[int, ...], feature_axes: tuple[int, ...], mask: Any,
                 scale: Any, bias: Any, *, centred: bool = True) -> Any:
    """A per-sample family member: statistics over ``reduced`` (merged under ``axis_name``), then the affine.

    Without mask and ``axis_name``: ``normkit.layer_norm`` (``rms_norm``) on the 2-D view; else ``exact_moments``.
    """
    view = _stats.View(tuple(x.shape), reduced)
    side = 1 - view.feature  # the reduced side of the view
    if mask is None and layer.axis_name is None:
        if centred:
            y2 = normkit.layer_norm(view.flat(x), axis=side, eps=layer.epsilon)
        else:
            y2 = normkit.rms_norm(view.flat(x), axis=side, eps=layer.epsilon)
        return _stats.affine(view.unflat(y2), scale, bias, feature_axes)
    stats = _stats.exact_moments(_compute(x), view, mask=mask, axis_name=layer.axis_name,
                                 axis_index_groups=layer.axis_index_groups)
    if centred:
        y2 = normkit.normalize(stats.centered, stats.offset, stats.total.var, eps=layer.epsilon, axis=view.feature)
    else:  # RMS: no centring, the mean square in place of the variance
        ms = _stats.mean_square(stats.total)
        y2 = normkit.normalize(_compute(view.flat(x)), jnp.zeros_like(ms), ms, eps=layer.epsilon, axis=view.feature)
    return _stats.affine(view.unflat(y2.astype(x.dtype)), scale, bias, feature_axes)


class LayerNorm(nnx.LayerNorm):
    """``flax.nnx.LayerNorm``: ``(x - mean) / sqrt(var + epsilon) * scale + bias`` over ``reduction_axes`` of each sample."""

    def __call__(self, x: Any, *, mask: Any = None) -> Any:
        if _native(self):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        reduced = _stats.canonical_axes(x.ndim, self.reduction_axes)
        return _standardize(self, x, reduced, _stats.canonical_axes(x.ndim, self.feature_axes), mask, scale, bias)


class RMSNorm(nnx.RMSNorm):
    """``flax.nnx.RMSNorm``: ``x / sqrt(mean(x**2) + epsilon) * scale`` over ``reduction_axes`` of each sample."""

    def __call__(self, x: Any, mask: Any = None) -> Any:
        if _native(self):
            return super().__call__(x, mask=mask)
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        reduced = _stats.canonical_axes(x.ndim, self.reduction_axes)
        return _standardize(self, x, reduced, _stats.canonical_axes(x.ndim, self.feature_axes), mask, scale, None,
                            centred=False)


class GroupNorm(nnx.GroupNorm):
    """``flax.nnx.GroupNorm``: channels (the last axis) in ``num_groups`` groups; statistics per sample and group."""

    def __call__(self, x: Any, *, mask: Any = None) -> Any:
        if _native(self):
            return super().__call__(x, mask=mask)
        axes = self.reduction_axes if self.reduction_axes is not None else list(range(1, x.ndim - 1)) + [-1]
        axes = _stats.canonical_axes(x.ndim, axes)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        shape = tuple(x.shape)
        grouped = jnp.reshape(x, shape[:-1] + (self.num_groups, self.group_size))
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask, bool), shape)
            mask = jnp.reshape(mask, grouped.shape)
        reduced = tuple(axes[:-1]) + (grouped.ndim - 1,)
        y = _standardize(self, grouped, reduced, (), mask, None, None)
        y = jnp.reshape(y, shape)
        feature = (1,) * (len(shape) - 1) + (shape[-1],)
        if scale is not None:
            y = y * jnp.reshape(scale, feature)
        if bias is not None:
            y = y + jnp.reshape(bias, feature)
        return y


class InstanceNorm(nnx.InstanceNorm):
    """``flax.nnx.InstanceNorm``: statistics per sample and channel over the other non-batch axes."""

    def __call__(self, x: Any, *, mask: Any = None) -> Any:
        if _native(self):
            return super().__call__(x, mask=mask)
        feature_axes = _stats.canonical_axes(x.ndim, self.feature_axes)
        if 0 in feature_axes:
            raise ValueError("The channel axes cannot include the leading dimension as this is assumed to be the "
                             "batch axis.")
        reduced = tuple(i for i in range(1, x.ndim) if i not in feature_axes)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return _standardize(self, x, reduced, feature_axes, mask, scale, bias)
