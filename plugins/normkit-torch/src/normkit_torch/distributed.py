"""Statistics across processes with torch.distributed: each rank's ``Moments``, one collective, an exact merge.

A rank packs its per-feature ``(count, mean, m2)`` into one tensor ``[count | mean | m2]`` of
shape ``(3 * C,)``; one ``all_gather`` brings every rank's row; ``normkit.Moments.merge`` (Chan's
formula) combines the rows as a vectorized pairwise tree (``ceil(log2(world))`` merges):

    n = n_a + n_b;  mean = mean_a + d * n_b / n;  m2 = m2_a + m2_b + d**2 * n_a * n_b / n   (d = mean_b - mean_a)

Rows are packed in float64 (counts stay exact past 2**24 and the merge adds no float32 round-off;
float32 on a device without float64). A rank with count 0 (an empty batch) is the merge's identity,
but it must still call the collective, as every rank must, in the same order.
"""

from __future__ import annotations

from typing import Any, Optional

import normkit
import torch
import torch.distributed as dist
from normkit import Moments
from torch import Tensor

__all__ = ["is_synchronized", "local_moments", "all_gather_moments", "all_reduce_sums", "merge_rows"]

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
    c = x.shape[axis]
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    zeros = torch.zeros(c, dtype=dtype, device=x.device)
    return Moments(count=0, mean=zeros, m2=zeros)


def _wire_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def _pack(moments: Moments) -> Tensor:
    """``[count | mean | m2]`` (3C,) in the wire dtype; the count repeated per feature (a mask's counts differ)."""
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
    return torch.cat([count, mean.detach().to(dtype), moments.m2.detach().to(dtype)])


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
