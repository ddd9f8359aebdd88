"""One rank of the two-process gloo tests: runs every case in sequence, saves what it saw to ``OUTDIR/rank{R}.pt``.

    python sync_worker.py RANK WORLD PORT OUTDIR

The case definitions and data builders live here so that test_sync.py builds the one-process
reference on exactly the same global batches; each rank takes its slice of them.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any

import torch
from torch import nn

F64 = torch.float64
C = 3
STEPS = 2

# name -> per-rank batch sizes, spatial shape (input (N, C, *spatial)), module kwargs
LAYER_CASES: dict[str, dict[str, Any]] = {
    "even": {"sizes": (4, 4), "spatial": (5, 6), "kwargs": {}},
    "uneven": {"sizes": (3, 5), "spatial": (7,), "kwargs": {"momentum": None}},
    "empty": {"sizes": (0, 8), "spatial": (5, 6), "kwargs": {"eps": 1e-3, "momentum": 0.3}},
}
HALF_CASE = {"sizes": (3, 5), "spatial": (4, 4), "dtype": torch.float16}
SHIFTED_CASE = {"sizes": (4, 4), "spatial": (16, 16), "offset": 1e4, "kwargs": {"momentum": 1.0}}
DDP_SIZES, DDP_STEPS, DDP_LR = (4, 4), 3, 0.1
GATHER = "all_gather_single" if hasattr(torch.distributed, "all_gather_single") else "all_gather_into_tensor"


def offsets(sizes: tuple[int, ...]) -> list[int]:
    out, start = [], 0
    for s in sizes:
        out.append(start)
        start += s
    return out


def batch(sizes: tuple[int, ...], spatial: tuple[int, ...], seed: int, channels: int = C,
          offset: float = 0.0) -> torch.Tensor:
    """The global float64 batch (channels with different means and scales)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels) + tuple(spatial)
    loc = torch.linspace(-2.0, 3.0, channels, dtype=F64).reshape((1, channels) + (1,) * len(spatial))
    scale = torch.linspace(0.5, 2.0, channels, dtype=F64).reshape(loc.shape)
    return offset + loc + scale * torch.randn(shape, generator=gen, dtype=F64)


def init_layer(module: nn.Module, seed: int = 7) -> nn.Module:
    """Non-trivial weight, bias and running statistics, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=gen, dtype=F64))
            module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen, dtype=F64))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, dtype=F64))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen, dtype=F64))
    return module


def make_net(bn: type) -> nn.Module:
    """A small conv net in float64 with the same initial parameters for every ``bn`` class."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), bn(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    ).to(F64)


def ddp_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch(DDP_SIZES, (6, 6), seed=100 + step)
    y = torch.randn(sum(DDP_SIZES), 2, generator=torch.Generator().manual_seed(200 + step), dtype=F64)
    return x, y


def _slice(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = offsets(sizes)[rank]
    return t[start:start + sizes[rank]]


from normkit_torch.testing import CountCollectives, end_process_group  # noqa: E402


def run_layer_case(case: dict[str, Any], rank: int, seed: int, dtype: torch.dtype = F64) -> dict[str, Any]:
    """Two training steps (forward, backward of sum(y * g)) then an eval forward on this rank's slices."""
    import normkit_torch as nkt

    module = init_layer(nkt.SyncBatchNorm(C, dtype=F64, **case.get("kwargs", {}))).to(
        torch.float32 if dtype != F64 else F64)
    sizes, spatial = case["sizes"], case["spatial"]
    out: dict[str, Any] = {"steps": []}
    for step in range(STEPS):
        x_global = batch(sizes, spatial, seed + step, offset=case.get("offset", 0.0))
        g_global = batch(sizes, spatial, seed + 50 + step)
        x = _slice(x_global, sizes, rank).to(dtype).requires_grad_()
        with CountCollectives() as forward:
            y = module(x)
        with CountCollectives() as backward:
            (y * _slice(g_global, sizes, rank).to(dtype)).sum().backward()
        out["steps"].append({
            "collectives": (forward.calls, backward.calls),
            "y": y.detach().clone(), "grad_input": x.grad.clone(),
            "grad_weight": module.weight.grad.clone(), "grad_bias": module.bias.grad.clone(),
            "running_mean": module.running_mean.clone(), "running_var": module.running_var.clone(),
            "num_batches_tracked": int(module.num_batches_tracked),
        })
        module.zero_grad()
    module.eval()
    x_eval = _slice(batch(sizes, spatial, seed + 99), sizes, rank).to(dtype)
    with CountCollectives() as evaluation:
        out["eval"] = module(x_eval).detach().clone()
    out["eval_collectives"] = evaluation.calls
    return out


def run_ddp(rank: int) -> dict[str, Any]:
    """The user's path: a torch model, torch's convert_sync_batchnorm, normkit_torch.convert, DDP, SGD."""
    from torch.nn.parallel import DistributedDataParallel

    import normkit_torch as nkt

    net = nkt.convert(nn.SyncBatchNorm.convert_sync_batchnorm(make_net(nn.BatchNorm2d)))
    kinds = sorted({type(m).__name__ for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    for step in range(DDP_STEPS):
        x, target = ddp_data(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_slice(x, DDP_SIZES, rank)), _slice(target, DDP_SIZES, rank))
        loss.backward()
        opt.step()
    return {"kinds": kinds, "state": {k: v.clone() for k, v in net.state_dict().items()}}


def run_collectives(rank: int) -> dict[str, Any]:
    """all_gather_moments with a per-feature count (a mask) on one rank and an int count on the other."""
    import normkit
    from normkit_torch.distributed import all_gather_moments, local_moments

    x = batch((5, 6), (), seed=300)
    mask = torch.arange(11).reshape(11, 1) % torch.tensor([1, 2, 3]) == 0  # per-feature counts 11, 6, 4
    if rank == 0:
        part = normkit.batch_moments(x[:5], axis=1, mask=mask[:5])
    else:
        part = local_moments(x[5:], axis=1)
    merged = all_gather_moments(part)
    return {"count": merged.count, "mean": merged.mean, "m2": merged.m2}


PENALTY_CASE = {"sizes": (3, 5), "spatial": (4,)}
TIMEOUT_S = 3.0  # the process-group timeout of the divergence check's subgroup


def run_penalty(rank: int) -> dict[str, Any]:
    """A gradient penalty (second derivatives): sum(dL/dx ** 2) + sum(y ** 2) with L = sum(y * v), then backward."""
    import normkit_torch as nkt

    module = init_layer(nkt.SyncBatchNorm(C, dtype=F64))
    sizes, spatial = PENALTY_CASE["sizes"], PENALTY_CASE["spatial"]
    x = _slice(batch(sizes, spatial, seed=500), sizes, rank).requires_grad_()
    v = _slice(batch(sizes, spatial, seed=501), sizes, rank)
    y = module(x)
    (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
    (g.square().sum() + y.square().sum()).backward()
    return {"grad_input": x.grad.clone(), "grad_weight": module.weight.grad.clone(),
            "grad_bias": module.bias.grad.clone(), "first": g.detach().clone()}


def _mismatch(fn: Any) -> dict[str, Any]:
    """Run ``fn``; what it raised (type, text) and how long it took."""
    import time

    start = time.monotonic()
    try:
        fn()
    except Exception as error:  # noqa: BLE001 (the test checks the type)
        return {"type": type(error).__name__, "text": str(error), "seconds": time.monotonic() - start}
    return {"type": None, "text": "", "seconds": time.monotonic() - start}


def run_agreement(rank: int) -> dict[str, Any]:
    """Ranks that call the same SyncBatchNorm differently: every rank raises (in lockstep: the group stays usable)."""
    import normkit_torch as nkt

    out: dict[str, Any] = {}
    x = lambda n, c=C, dtype=F64: batch((n,), (2,), seed=600 + n, channels=c).to(dtype)  # noqa: E731
    # a different feature count on the first call (the fixed-size signature gather)
    out["features"] = _mismatch(lambda: nkt.SyncBatchNorm(3 + rank, dtype=F64)(x(4, 3 + rank)))
    # a different dtype on the first call
    dtype = (torch.float32, F64)[rank]
    out["dtype"] = _mismatch(lambda: nkt.SyncBatchNorm(C, dtype=dtype)(x(4, dtype=dtype)))
    # an agreed module: then one rank's input needs no gradient (a backward would follow on one rank only)
    module = nkt.SyncBatchNorm(C, dtype=F64)
    module(x(4).requires_grad_()).sum().backward()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    out["grad"] = _mismatch(lambda: module(x(4).requires_grad_(rank == 0)))
    out["grad_state_kept"] = all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    # one rank's input switches dtype after agreement; then both agree again: the group is still usable
    out["dtype_later"] = _mismatch(lambda: module(x(4, dtype=(F64, torch.float32)[rank])))
    out["after"] = module(x(3 + rank)).detach().clone()
    # a module without parameters or running statistics takes any width: one rank changes it, then both do
    free = nkt.SyncBatchNorm(C, affine=False, track_running_stats=False, dtype=F64)
    free(x(4))
    out["features_later"] = _mismatch(lambda: free(x(4, 3 + rank)))
    out["wider"] = free(x(2 + rank, 5)).detach().clone()
    # one value per channel over all ranks (1 + 0 samples): torch's error on every rank, nothing updated
    single = nkt.SyncBatchNorm(C, dtype=F64)
    out["one_value"] = _mismatch(lambda: single(batch((1 - rank,), (), seed=601)))  # (1, C) and (0, C)
    out["one_value_tracked"] = int(single.num_batches_tracked)
    out["one_value_running_var"] = single.running_var.clone()
    return out


def _short_timeout_group() -> Any:
    """A new gloo group of both ranks, connected under a long timeout (a loaded machine connects slowly), then
    given TIMEOUT_S for its collectives."""
    import torch.distributed as dist

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=60), backend="gloo")
    dist.barrier(group=group)
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=TIMEOUT_S), group)
    return group


def run_divergence(rank: int) -> dict[str, Any]:
    """What no collective can see: rank 0 trains while rank 1 is in eval; rank 1 skips a backward. Rank 0 waits the
    group's timeout, then a clear error."""

    import normkit_torch as nkt

    group = _short_timeout_group()
    module = nkt.SyncBatchNorm(C, dtype=F64, process_group=group).train(rank == 0)
    out = {"eval": _mismatch(lambda: module(batch((4,), (2,), seed=700)))}
    # both forwards agree (a backward follows on both), then rank 1 skips it: rank 0 waits in the all_reduce
    group = _short_timeout_group()  # a fresh group: the first is left broken
    module = nkt.SyncBatchNorm(C, dtype=F64, process_group=group)
    y = module(batch((4,), (2,), seed=701).requires_grad_())
    out["backward"] = _mismatch(lambda: y.sum().backward() if rank == 0 else None)
    return out


def main() -> None:
    rank, world, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for i, (name, case) in enumerate(LAYER_CASES.items()):
            results[name] = run_layer_case(case, rank, seed=10 * i)
        results["half"] = run_layer_case(HALF_CASE, rank, seed=40, dtype=HALF_CASE["dtype"])
        results["shifted"] = run_layer_case(SHIFTED_CASE, rank, seed=60, dtype=torch.float32)
        results["ddp"] = run_ddp(rank)
        results["collectives"] = run_collectives(rank)
        results["penalty"] = run_penalty(rank)
        results["agreement"] = run_agreement(rank)
        results["divergence"] = run_divergence(rank)  # last: its subgroup is left broken
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    end_process_group()


if __name__ == "__main__":
    main()
