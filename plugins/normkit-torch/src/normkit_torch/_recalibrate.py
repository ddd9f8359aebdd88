"""Recalibration ("precise BN"): every batch norm's running statistics become its inputs' population statistics.

Batch norms are recalibrated one at a time, in the order the forward pass first calls them (a
topological order). For each, the model runs in eval mode over every batch, the batch norm's input
is captured by a forward pre-hook (the pass stops there), each batch gives ``normkit.batch_moments``
of the input widened to float64 and the batches are merged with Chan's formula (``Moments.merge``,
float64, also for float32/float16 models), then across processes
(``normkit_torch.distributed.all_gather_moments``) where torch.distributed runs. So each batch norm
sees exactly the activations of the model whose earlier batch norms are already recalibrated. A
batch norm called k times per forward pass gets the merge of the inputs of all k calls (its later
calls' inputs computed with its statistics from before this recalibration, as the one pass runs):

    running_mean = mean,   running_var = m2 / (count - 1)   (BatchRenorm*d: m2 / count, running_std = sqrt(var + eps))

One pass per batch norm (each cut at that batch norm) costs more than ``swa_utils.update_bn``'s
single training-mode pass, whose statistics are those of batch-normalized (not eval-mode) inputs.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from array_api_compat import torch as xp
from torch import Tensor, nn

import normkit
from normkit import Moments
from normkit_torch._frozen import is_batch_norm

__all__ = ["recalibrate"]

AUTO_PROGRESS_BATCHES = 200  # progress=None shows a bar (on a terminal) from this many batch forwards


class _Stop(BaseException):
    """Raised by the capture hook to cut a forward pass short (BaseException: no ``except Exception`` eats it)."""


def _input_of(batch: Any) -> Any:
    """The model input of a batch: the batch, or its first element for a tuple/list (a DataLoader's (x, y))."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _materialize(batches: Iterable, num_batches: Optional[int]) -> list:
    """The model inputs of the first ``num_batches`` batches (all of them when None), read once."""
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(batches, Tensor):
        raise TypeError("recalibrate expects an iterable of batches (a list, a DataLoader), got a single Tensor; "
                        "wrap it: [x] or x.split(batch_size)")
    if not hasattr(batches, "__iter__"):
        raise TypeError(f"recalibrate: batches must be an iterable of model inputs (a list, a DataLoader), "
                        f"got {type(batches).__name__}")
    inputs = []
    for batch in batches:
        if num_batches is not None and len(inputs) >= num_batches:
            break
        inputs.append(_input_of(batch))
    return inputs


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to(x: Any, device: Optional[torch.device]) -> Any:
    return x.to(device) if isinstance(x, Tensor) and device is not None and x.device != device else x


def _wide(x: Tensor) -> Tensor:
    """``x`` in float64 (float32 where the device has none): each batch's moments and their merge over
    many batches exact whatever the model's dtype."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _call_order(model: nn.Module, bns: list[nn.Module], first: Any, device: Any) -> tuple[list[nn.Module], dict]:
    """Batch norms in the order the forward pass first calls them, and how often each is called per pass."""
    order: list[nn.Module] = []
    calls: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        if id(module) not in calls:
            order.append(module)
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model(_to(first, device))
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _population(model: nn.Module, bn: nn.Module, inputs: list, device: Any, calls: int, tick: Callable) -> Moments:
    """Merged ``Moments`` of ``bn``'s inputs over every batch (each forward stops after ``bn``'s last call)."""
    total: list[Optional[Moments]] = [None]
    seen = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        part = normkit.batch_moments(_wide(args[0].detach()), axis=1, xp=xp)
        total[0] = part if total[0] is None else total[0].merge(part)
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    handle = bn.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            seen[0] = 0
            try:
                model(_to(x, device))
            except _Stop:
                pass
            tick()
    finally:
        handle.remove()
    assert total[0] is not None  # the call-order pass saw bn called
    return total[0]


def _distributed_merge(moments: Moments) -> Moments:
    """The merge over every rank where torch.distributed is initialized with more than one rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return moments
    from normkit_torch.distributed import all_gather_moments  # lazily: only where processes exchange

    return all_gather_moments(moments, process_group=None)


def _check_every_rank_has_batches(count: int) -> None:
    """Every rank must join each collective: refuse on all ranks together when one has no batch."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    least = torch.tensor([count], device=device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    if int(least) < 1:
        raise ValueError("recalibrate: a process has no batch; every rank needs at least one")


@torch.no_grad()
def _assign(bn: nn.Module, total: Moments, num_batches: int, name: str) -> None:
    from normkit_torch._renorm import _BatchRenorm

    renorm = isinstance(bn, _BatchRenorm)
    count = total.count if isinstance(total.count, int) else int(torch.min(torch.as_tensor(total.count)))
    if count < 2:
        raise ValueError(f"recalibrate: {name} saw {count} value(s) per feature; the variance needs at least 2")
    finite = torch.isfinite(total.mean) & torch.isfinite(total.m2)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"recalibrate: the inputs of {name} hold NaN or inf in feature(s) {bad[:8]}: expected "
                         "finite activations (check the batches); no running statistics were changed")
    var = total.var if renorm else total.unbiased_var(1)
    bn.running_mean.copy_(total.mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))
    if renorm:
        bn.running_std.copy_(torch.sqrt(var + bn.eps).to(bn.running_std.dtype))
    tracked = getattr(bn, "num_batches_tracked", None)
    if tracked is not None:
        tracked.fill_(num_batches)


_STATE = ("running_mean", "running_var", "running_std", "num_batches_tracked")


def _snapshot(bns: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    return [(t, t.clone()) for bn in bns for t in (getattr(bn, k, None) for k in _STATE) if isinstance(t, Tensor)]


@torch.no_grad()
def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for t, old in saved:
        t.copy_(old)


def _progress(progress: Optional[bool], total: int) -> Any:
    show = progress if progress is not None else (total >= AUTO_PROGRESS_BATCHES and sys.stderr.isatty())
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("recalibrate(progress=True) needs tqdm: pip install tqdm") from None
        return None
    return tqdm(total=total, desc="recalibrate", unit="batch")


def recalibrate(
    model: nn.Module, batches: Iterable, num_batches: Optional[int] = None, *, progress: Optional[bool] = None
) -> nn.Module:
    """Set every batch norm's running statistics of ``model`` (in place) to the exact statistics of its inputs.

    ``batches``: an iterable of model inputs, or of tuples/lists whose first element is the input
    (a DataLoader's ``(x, y)``); the first ``num_batches`` (all when None) are read once and kept
    for the passes (one per batch norm, each stopping at it; inputs move to the model's device).
    Batch norms (torch.nn's, normkit's, SyncBatchNorm, BatchRenorm*d, FrozenBatchNorm*) get
    ``running_mean`` and the unbiased ``running_var`` (BatchRenorm*d: biased, and ``running_std``);
    ``num_batches_tracked`` becomes the number of local batches (not added to the old count). A batch
    norm called several times per forward gets the merge of all its calls' inputs. Each batch's
    moments and their merge are computed in float64 whatever the model's dtype. No batch, NaN/inf
    activations or a failing forward raise, with every batch norm left as it was. Batches may differ in size. The
    model runs in eval mode without gradient; every module's train/eval mode is restored. Under
    torch.distributed, the statistics are merged over every rank (each needs at least one batch).
    ``progress``: a tqdm bar (True), none (False), or one on a terminal from 200 batch forwards (None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate expects a torch.nn.Module, got {type(model).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"recalibrate: progress must be True, False or None, got {progress!r}")
    names = {id(m): n or "model" for n, m in model.named_modules()}
    bns = [m for m in model.modules() if is_batch_norm(m) and getattr(m, "running_mean", None) is not None]
    inputs = _materialize(batches, num_batches)
    _check_every_rank_has_batches(len(inputs))
    if not inputs:
        raise ValueError("recalibrate got no batch: batches must yield at least one model input "
                         f"(got an empty {type(batches).__name__}); no running statistics were changed")
    device = _device_of(model)
    modes = [(m, m.training) for m in model.modules()]
    saved = _snapshot(bns)
    model.eval()
    try:
        with torch.no_grad():
            order, calls = _call_order(model, bns, inputs[0], device)
            missed = [names[id(m)] for m in bns if id(m) not in calls]
            if missed:
                warnings.warn(f"recalibrate: the forward pass never calls {', '.join(missed)}; "
                              "their statistics are unchanged", stacklevel=2)
            bar = _progress(progress, len(order) * len(inputs))
            tick = bar.update if bar is not None else (lambda n=1: None)
            try:
                for bn in order:
                    total = _population(model, bn, inputs, device, calls[id(bn)], tick)
                    _assign(bn, _distributed_merge(total), len(inputs), names[id(bn)])
            finally:
                if bar is not None:
                    bar.close()
    except BaseException:
        _restore(saved)  # an error part-way (NaN, a failing batch): every batch norm as it was
        raise
    finally:
        for m, training in modes:
            m.training = training
    return model
