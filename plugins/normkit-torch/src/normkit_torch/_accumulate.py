"""When a batch-norm forward updates its running statistics: once per step, not per micro-batch or recomputation.

``accumulate_statistics(model)``: inside, every normkit batch-norm module normalizes each call with its batch's
statistics as usual but records that batch's ``Moments`` instead of updating; on exit each folds the exact merge
(Chan) of what it recorded into its running statistics once:

    running <- (1 - m) * running + m * merged     (one momentum step; num_batches_tracked += 1; m = 1/n if None)

equal to one update with the concatenated micro-batches. A SyncBatchNorm records the statistics its forward
already merged across ranks, so the fold is the global one and needs no collective of its own.

Under ``torch.utils.checkpoint`` (either ``use_reentrant``) the forward runs again inside backward to recompute
activations; that run (a forward while the autograd engine executes a backward: ``_current_graph_task_id``)
normalizes identically and leaves the running statistics alone, so they move once per forward of the user's step.
The forwards ask ``normkit_torch._recording`` whether to update; this module only opens and folds the records.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit import Moments
from normkit_torch._batchnorm import _NormkitBatchNorm
from normkit_torch._recording import LOCK as _LOCK, RECORDS as _RECORDS
from normkit_torch._sync import SyncBatchNorm

__all__ = ["accumulate_statistics"]


def _supported(module: _BatchNorm) -> bool:
    return isinstance(module, (_NormkitBatchNorm, SyncBatchNorm))


def _fold(module: _BatchNorm, records: list[Moments]) -> None:
    """One running update of ``module`` with the merge of ``records`` (torch's convention: unbiased, new weight m)."""
    merged = records[0]
    for part in records[1:]:
        merged = merged.merge(part)
    tracked = module.num_batches_tracked
    with torch.no_grad():
        if tracked is not None:
            tracked.add_(1)
        new_mean, new_var = normkit.update_running_stats(
            module.running_mean, module.running_var, merged, momentum=module.momentum, correction=1,
            num_batches=tracked,
        )
        module.running_mean.copy_(new_mean)
        module.running_var.copy_(new_var)


@contextlib.contextmanager
def accumulate_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Gradient accumulation for batch norm: inside, batch statistics normalize as usual but are only recorded; on
    exit each module takes one running update with the exact merge of its micro-batches (as one forward of the
    concatenated batch). An exception inside discards what was recorded (the statistics stay as they were).

    Every batch-norm module with running statistics must be normkit's (``normkit_torch.convert(model)`` first):
    a torch.nn one, or a BatchRenorm (its own running state), is refused by name, as is nesting on one module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate_statistics expects a torch.nn.Module, got {type(model).__name__}")
    modules = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    foreign = [f"{name or '(root)'} ({type(m).__name__})" for name, m in model.named_modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats and not _supported(m)]
    if foreign:
        raise TypeError(
            "accumulate_statistics needs normkit batch-norm modules (normkit_torch.convert(model) first; "
            f"BatchRenorm is not supported); got {', '.join(foreign)}"
        )
    with _LOCK:
        busy = [type(m).__name__ for m in modules if m in _RECORDS]
        if busy:
            raise RuntimeError(f"accumulate_statistics is already active on {', '.join(busy)}: it does not nest")
        for m in modules:
            _RECORDS[m] = []
    try:
        yield model
    except BaseException:
        with _LOCK:
            for m in modules:
                _RECORDS.pop(m, None)
        raise
    with _LOCK:
        recorded = [(m, _RECORDS.pop(m)) for m in modules]
    for m, records in recorded:
        if records and m.running_mean is not None and m.running_var is not None:
            _fold(m, records)
