"""The forward's side of ``accumulate_statistics`` and of checkpointing: may this call update the running statistics?

A batch-norm forward that would update asks ``skip_running_update``: not during a recomputation by
``torch.utils.checkpoint`` (a forward while the autograd engine runs a backward: ``recomputing``), and not inside
``accumulate_statistics`` (``normkit_torch._accumulate``), which records the batch's ``Moments`` here and folds them
on exit. The modules import this; ``_accumulate`` imports the modules, never the reverse.
"""

from __future__ import annotations

import threading
from typing import Optional, Union

import torch
from torch import Tensor, nn

import normkit
from normkit import Moments

__all__ = ["skip_running_update", "scratch_copies", "recomputing", "RECORDS", "LOCK"]

LOCK = threading.Lock()
RECORDS: dict[nn.Module, list[Moments]] = {}  # module -> the Moments of each call inside accumulate_statistics


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: torch.utils.checkpoint recomputing activations."""
    return torch._C._current_graph_task_id() != -1


def skip_running_update(module: nn.Module, batch: Union[Tensor, Moments]) -> bool:
    """Called by a batch-norm forward that would update its running statistics with ``batch`` (its input, channels
    on axis 1, or its merged ``Moments``): True when it must not (a recomputation, or recorded for the fold)."""
    if torch.compiler.is_compiling():
        return False
    if recomputing():
        return True
    records = RECORDS.get(module)
    if records is None:
        return False
    if isinstance(batch, Tensor):
        batch = normkit.batch_moments(batch.detach(), axis=1)
    else:
        count = batch.count.detach() if isinstance(batch.count, Tensor) else batch.count
        batch = Moments(count=count, mean=batch.mean.detach(), m2=batch.m2.detach())
    records.append(batch)
    return True


def scratch_copies(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Copies of the running statistics for a forward that must not update them (its kernel writes the copies)."""
    return tuple(None if t is None else t.detach().clone() for t in (running_mean, running_var))
