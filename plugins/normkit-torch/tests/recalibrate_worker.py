"""One rank of the two-process recalibration test: ``python recalibrate_worker.py RANK WORLD PORT OUTDIR``.

Each rank builds the same model (``build_model``) and recalibrates it on its own batches
(``rank_batches``: uneven counts and sizes) under a gloo process group, then saves its state_dict
to ``OUTDIR/rank{R}.pt``. The test builds the one-process reference from the same functions.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
from torch import nn

F64 = torch.float64
SIZES = {0: (5, 3), 1: (4, 7, 2)}  # batch sizes per rank: 2 and 3 batches, all different


def build_model() -> nn.Module:
    import normkit_torch as nkt

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nkt.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3),
    ).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    return model.eval()


def rank_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 2, 7, 7, generator=gen, dtype=F64) * (1 + rank) + rank for n in SIZES[rank]]


def main(rank: int, world: int, port: int, outdir: str) -> int:
    import torch.distributed as dist

    import normkit_torch as nkt
    from normkit_torch.testing import end_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 90 s: under the test's deadline; only a failing run waits it (a loaded machine took 20 s to connect)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        model = nkt.recalibrate(build_model(), rank_batches(rank))
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
