"""Statistics across processes with torch.distributed: each rank's ``Moments``, one collective, an exact merge.

A rank packs its per-feature ``(count, mean, m2)`` into one tensor ``[count | mean | m2]`` of
shape ``(3 * C,)``; one ``all_gather`` brings every rank's row; ``normkit.Moments.merge`` (Chan's
formula) combines the rows as a vectorized pairwise tree (``ceil(log2(world))`` merges):

    n = n_a + n_b;  mean = mean_a + d * n_b / n;  m2 = m2_a + m2_b + d**2 * n_a * n_b / n   (d = mean_b - mean_a)

Rows are packed in float64 (counts stay exact past 2**24 and the merge adds no float32 round-off;
float32 on a device without float64). A rank with count 0 (an empty batch) is the merge's identity,
but it must still call the collective, as every rank must, in the same order.

Agreement (``agreed_moments``, what the synchronized layers call): each rank's row starts with a
fixed-size signature (feature count, dtype, whether a backward follows, ...), so ONE ``all_gather``
both exchanges the statistics and checks that every rank calls the layer the same way; a mismatch
raises ``SyncMismatchError`` on every rank (they all saw the same rows, so the process group stays
usable). The first call of a layer (and one whose row size would change) first gathers the
signature alone, a fixed-size exchange that cannot fail on differing feature counts. That
exchange is differentiable (``all_gather`` forward, ``all_reduce`` backward, itself differentiable),
so autograd gives first and second derivatives as one process on the concatenated batch.
What no collective can see (a rank that stops calling, e.g. one in eval mode while another trains,
an extra step, a skipped backward) waits for the process group's timeout
(``init_process_group(timeout=...)``) and then raises ``SyncTimeoutError`` naming the layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import normkit
from normkit import Moments

__all__ = ["is_synchronized", "local_moments", "all_gather_moments", "all_reduce_sums", "merge_rows", "agreed_moments",
           "SyncMismatchError", "SyncTimeoutError", "SIGNATURE_FIELDS"]

_NO_FLOAT64 = frozenset({"mps"})


def is_synchronized(process_group: Any = None) -> bool:
    """True where torch.distributed is initialized and ``process_group`` (None: the world) has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


def local_moments(x: Tensor, *, axis: int = 1, mask: Optional[Tensor] = None) -> Moments:
    """``normkit.batch_moments`` of this rank's batch; an empty batch gives count 0, mean 0, m2 0 (no NaN)."""
    if x.numel() > 0:
        return normkit.batch_moments(x, axis=axis, mask=mask)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    axes = [d for d in range(x.ndim) if d != axis % x.ndim]
    zeros = x.sum(dim=axes, dtype=dtype)  # zeros of shape (C,) that keep x's autograd graph: a backward reaches here
    return Moments(count=0, mean=zeros, m2=zeros)


def _wire_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def _pack(moments: Moments, differentiable: bool = False) -> Tensor:
    """``[count | mean | m2]`` (3C,) in the wire dtype; the count repeated per feature (a mask's counts differ).
    ``differentiable``: mean and m2 keep their autograd graph."""
    mean = moments.mean
    if mean.ndim != 1:
        raise ValueError(
            f"all_gather_moments expects per-feature Moments of shape (C,), got mean of shape {tuple(mean.shape)}")
    dtype = _wire_dtype(mean.device)
    count = moments.count
    if isinstance(count, Tensor):
        count = count.detach().to(dtype).reshape(-1).expand(mean.shape[0])
    else:
        count = torch.full(mean.shape, float(count), dtype=dtype, device=mean.device)
    keep = (lambda t: t) if differentiable else (lambda t: t.detach())
    return torch.cat([count, keep(mean).to(dtype), keep(moments.m2).to(dtype)])


def merge_rows(rows: Tensor) -> Moments:
    """Merge a ``(world, 3C)`` stack of packed rows with ``Moments.merge`` (a pairwise tree, vectorized over rows)."""
    if rows.ndim != 2 or rows.shape[1] % 3:
        raise ValueError(f"merge_rows expects packed rows of shape (world, 3 * C), got shape {tuple(rows.shape)}")
    count, mean, m2 = rows.chunk(3, dim=1)
    parts = Moments(count=count, mean=mean, m2=m2)
    while parts.mean.shape[0] > 1:
        if parts.mean.shape[0] % 2:  # an empty row: the identity of the merge
            pad = torch.zeros_like(parts.mean[:1])
            parts = Moments(*(torch.cat([t, pad]) for t in (parts.count, parts.mean, parts.m2)))
        half = parts.mean.shape[0] // 2
        top = Moments(count=parts.count[:half], mean=parts.mean[:half], m2=parts.m2[:half])
        low = Moments(count=parts.count[half:], mean=parts.mean[half:], m2=parts.m2[half:])
        parts = top.merge(low)
    return Moments(count=parts.count[0], mean=parts.mean[0], m2=parts.m2[0])


def _all_gather_flat(row: Tensor, process_group: Any, world: int) -> Tensor:
    out = torch.empty((world * row.numel(),), dtype=row.dtype, device=row.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, row, group=process_group)
    return out.reshape(world, row.numel())


def all_gather_moments(moments: Moments, process_group: Any = None) -> Moments:
    """The statistics of every rank's data together: one ``all_gather`` of packed rows, merged exactly.

    Every rank of ``process_group`` (None: the world) must call it, an empty rank with count 0
    (``local_moments`` of an empty batch). Returns ``Moments`` with a per-feature ``count`` tensor and
    ``mean``/``m2`` in ``moments.mean``'s dtype; without autograd history. Uninitialized or a single
    rank: the merge of ``moments`` alone (same layout, no collective).
    """
    row = _pack(moments)
    world = dist.get_world_size(process_group) if is_synchronized(process_group) else 1
    rows = _all_gather_flat(row, process_group, world) if world > 1 else row.reshape(1, -1)
    merged = merge_rows(rows)
    dtype = moments.mean.dtype
    return Moments(count=merged.count.to(dtype), mean=merged.mean.to(dtype), m2=merged.m2.to(dtype))


def all_reduce_sums(*tensors: Tensor, process_group: Any = None) -> tuple[Tensor, ...]:
    """Sums over ranks of same-dtype tensors, packed into ONE ``all_reduce``; inputs are not modified.

    Every rank must call it with the same shapes (an empty rank passes zeros). Single rank: copies.
    """
    if not tensors:
        return ()
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if is_synchronized(process_group):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    return tuple(part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))


# --- agreement: one signature per rank, checked in the statistics' own collective ----------------------------

SIGNATURE_FIELDS = ("features", "dtype", "backward follows", "weight", "bias", "running statistics", "eps",
                    "momentum")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SyncMismatchError(RuntimeError):
    """The ranks called a synchronized layer differently (feature count, dtype, ...); raised on every rank."""


class SyncTimeoutError(RuntimeError):
    """A synchronized layer's collective failed or timed out: the ranks stopped calling the same collectives."""


def signature(x: Tensor, *, axis: int = 1, weight: bool, bias: bool, running_stats: bool, eps: float,
              momentum: Optional[float]) -> tuple[float, ...]:
    """The values every rank must share to synchronize ``x``'s statistics along ``axis`` (``SIGNATURE_FIELDS``).

    "backward follows" is ``x.requires_grad`` under grad mode: it decides whether the backward's
    all_reduce runs, so ranks that differ would leave one waiting in it."""
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    follows = torch.is_grad_enabled() and x.requires_grad
    return (float(x.shape[axis] if x.ndim > axis else 0), float(code), float(follows), float(weight), float(bias),
            float(running_stats), float(eps), -1.0 if momentum is None else float(momentum))


def _show(field: str, value: float) -> str:
    if field == "dtype":
        return str(_DTYPES[int(value)]).replace("torch.", "") if value >= 0 else "other"
    if field in ("backward follows", "weight", "bias", "running statistics"):
        return str(bool(value))
    if field == "momentum" and value == -1.0:
        return "None"
    return f"{int(value)}" if field == "features" else f"{value:g}"


def _check_signatures(rows: Tensor, layer: str) -> None:
    """Raise ``SyncMismatchError`` (the same text on every rank: they all hold ``rows``) where the ranks differ."""
    k = len(SIGNATURE_FIELDS)
    heads = rows[:, :k].tolist()
    differ = [i for i in range(k) if any(h[i] != heads[0][i] for h in heads)]
    if not differ:
        return
    parts = []
    for i in differ:
        field = SIGNATURE_FIELDS[i]
        values = ", ".join(f"rank {r}: {_show(field, h[i])}" for r, h in enumerate(heads))
        parts.append(f"{field} ({values})")
    raise SyncMismatchError(
        f"{layer}: the {len(heads)} ranks of the process group called it differently: {'; '.join(parts)}. "
        "Synchronized statistics need the same feature count, dtype, parameters and grad mode on every rank "
        "(a backward follows where the input requires grad under grad mode); nothing was synchronized or updated")


def _collective(layer: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its failure (a timeout, a peer gone, a size mismatch) as ``SyncTimeoutError``."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise SyncTimeoutError(
            f"{layer}: rank {rank}'s collective ({getattr(fn, '__name__', fn)}) failed: the ranks stopped calling "
            "the same collectives in the same order (one rank in eval mode while another trains, an extra step or "
            "a skipped backward on one rank, a rank that stopped), or a peer failed. A rank waits at most the "
            "process group's timeout (init_process_group(timeout=...)). Cause: " + str(error)) from error


class _AllGather(torch.autograd.Function):
    """``(world, L)``: every rank's ``row``; backward: the sum over ranks of each rank's gradient for this row."""

    @staticmethod
    def forward(row: Tensor, group: Any, world: int, layer: str) -> Tensor:
        return _collective(layer, _all_gather_flat, row.contiguous(), group, world)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group, ctx.layer = inputs[1], inputs[3]
        ctx.rank = dist.get_rank(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return _AllReduce.apply(grad, ctx.group, ctx.layer)[ctx.rank], None, None, None


class _AllReduce(torch.autograd.Function):
    """The sum over ranks; its own adjoint (differentiable any number of times)."""

    @staticmethod
    def forward(t: Tensor, group: Any, layer: str) -> Tensor:
        out = t.contiguous().clone()
        _collective(layer, dist.all_reduce, out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group, ctx.layer = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return _AllReduce.apply(grad, ctx.group, ctx.layer), None, None


def _group_key(process_group: Any) -> tuple:
    group = process_group if process_group is not None else dist.group.WORLD
    return id(group), dist.get_world_size(process_group), dist.get_rank(process_group)


def agreed_moments(local: Moments, sig: tuple[float, ...], *, process_group: Any = None, state: dict,
                   layer: str) -> Moments:
    """Every rank's ``local`` merged, after checking that every rank sent the same ``sig`` (``signature``).

    ONE ``all_gather`` of ``[sig | count | mean | m2]``; where ``state`` (the layer's cache, a dict)
    holds no agreed feature count for this group yet, a fixed-size ``all_gather`` of ``sig`` alone
    comes first. A rank whose feature count changed sends zeros of the agreed size, so the ranks still
    gather equal sizes and all see the mismatch. Differentiable: autograd through the merge and the
    collectives (``all_reduce`` in backward) gives every derivative as one process on the whole batch.
    Returns per-feature ``count``, ``mean``, ``m2`` in ``local.mean``'s dtype.
    """
    world = dist.get_world_size(process_group)
    key = _group_key(process_group)
    head = torch.tensor(sig, dtype=_wire_dtype(local.mean.device), device=local.mean.device)
    features = int(sig[0])
    if state.get("key") != key:
        _check_signatures(_all_gather_flat_checked(head, process_group, world, layer), layer)
        state.clear()
        state.update(key=key, features=features)
    agreed = state["features"]
    body = _pack(local, differentiable=True) if features == agreed else head.new_zeros(3 * agreed)
    rows = _AllGather.apply(torch.cat([head, body]), process_group, world, layer)
    _check_signatures(rows, layer)
    if features != agreed:  # every rank changed to the same new feature count: gather at the new size
        state["features"] = features
        rows = _AllGather.apply(torch.cat([head, _pack(local, differentiable=True)]), process_group, world, layer)
    merged = merge_rows(rows[:, len(SIGNATURE_FIELDS):])
    dtype = local.mean.dtype
    return Moments(count=merged.count.detach().to(dtype), mean=merged.mean.to(dtype), m2=merged.m2.to(dtype))


def _all_gather_flat_checked(row: Tensor, process_group: Any, world: int, layer: str) -> Tensor:
    return _collective(layer, _all_gather_flat, row, process_group, world)
