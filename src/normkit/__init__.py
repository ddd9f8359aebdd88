"""normkit: normalization written once against the Python Array API, for every array library.

The public functional API and ``hookimpl``; layers live in the plugins (normkit-torch, normkit-keras).
Batch norm is three public steps: ``batch_moments`` (a batch's mergeable ``Moments``),
``update_running_stats`` (the running update) and ``normalize`` (the application).
"""

from normkit._backward import BatchNormGrads, batch_norm_backward
from normkit._batch_norm import BatchNormResult, batch_norm, normalize
from normkit._family import group_norm, instance_norm, layer_norm, rms_norm
from normkit._ghost import check_virtual_batch_size
from normkit._moments import Moments, MomentsResult, batch_moments, moments
from normkit._namespace import array_namespace, warm_up as _warm_up
from normkit._preprocessing import min_max_scale, standardize
from normkit._running import update_running_stats
from normkit._state import NormState, StateCopyReport, norm_states
from normkit.plugin.spec import hookimpl

_warm_up()
__version__ = "0.3.0"

__all__ = [
    "batch_norm",
    "check_virtual_batch_size",
    "BatchNormResult",
    "batch_moments",
    "update_running_stats",
    "normalize",
    "batch_norm_backward", "BatchNormGrads",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "moments",
    "MomentsResult",
    "Moments",
    "standardize",
    "min_max_scale",
    "array_namespace",
    "hookimpl",
    "NormState",
    "StateCopyReport",
    "norm_states",
]
