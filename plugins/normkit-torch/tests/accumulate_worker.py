"""One rank of the two-process accumulate_statistics test: ``python accumulate_worker.py RANK WORLD PORT OUTDIR``.

Each rank trains the same DDP model (normkit's SyncBatchNorm) on its own micro-batches (``rank_batches``: uneven
sizes) inside ``accumulate_statistics``, with one optimizer step, then saves its state_dict to ``OUTDIR/rank{R}.pt``.
The test builds the one-process reference (one torch.nn forward on every micro-batch of both ranks) from the same
functions.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback

import torch
from torch import nn

F64 = torch.float64
SIZES = {0: (3, 5), 1: (4, 2)}  # micro-batch sizes per rank, all different


def build_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Conv2d(3, 2, 1)).to(F64)
    with torch.no_grad():
        for t in list(model.parameters()) + [model[0].running_mean]:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=F64))
    return model


def rank_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 3, 4, 4, generator=gen, dtype=F64) * (1 + rank) + 2 * rank for n in SIZES[rank]]


def main(rank: int, world: int, port: int, outdir: str) -> int:
    import torch.distributed as dist

    import normkit_torch as nkt
    from normkit_torch.testing import end_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        model = nkt.SyncBatchNorm.convert_sync_batchnorm(build_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        batches = rank_batches(rank)
        with nkt.accumulate_statistics(model):
            for i, x in enumerate(batches):
                sync = contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync()
                with sync:
                    ddp(x).square().mean().backward()
        opt.step()
        torch.save(model.state_dict(), os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    end_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
