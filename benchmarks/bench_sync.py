"""Synchronized batch norm with two gloo processes on the CPU: normkit_torch.SyncBatchNorm against what users write today.

    python benchmarks/bench_sync.py            # full run: Markdown tables on stdout
    python benchmarks/bench_sync.py --quick    # fewer rounds
    python benchmarks/bench_sync.py --json out.json

"naive" is a hand-written synchronized batch norm in detectron2's NaiveSyncBatchNorm style: each
rank's mean(x) and mean(x*x) in one all_reduce divided by the world size (every worker weighted
equally, whatever its batch size), var = E[x^2] - E[x]^2, a differentiable all_reduce in backward.
"local" is torch.nn.BatchNorm2d without any synchronization (the floor). torch.nn.SyncBatchNorm is
absent: it refuses CPU tensors. Both ranks run the same interleaved schedule (one thread each);
each figure is the median over rounds of rank 0's time per training step (forward + backward).
Accuracy: float32 data at offset 1e4 (std 1) and uneven float64 batches against one float64 process
on the concatenated batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = [  # per-rank batch (N, C, H, W)
    ("conv 16x64x28x28", (16, 64, 28, 28)),
    ("conv 32x256x7x7", (32, 256, 7, 7)),
    ("small 8x32x8x8", (8, 32, 8, 8)),
]


# ---------------------------------------------------------------- the hand-written baseline


def naive_sync_batch_norm_class() -> type:
    """detectron2's NaiveSyncBatchNorm, written out (mean and mean of squares, all-reduced, equal weights)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    class _AllReduce(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, vec: torch.Tensor) -> torch.Tensor:
            vec = vec.clone()
            dist.all_reduce(vec)
            return vec

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    class NaiveSyncBatchNorm(nn.BatchNorm2d):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if not self.training or dist.get_world_size() == 1:
                return super().forward(input)
            c = input.shape[1]
            mean = torch.mean(input, dim=[0, 2, 3])
            meansqr = torch.mean(input * input, dim=[0, 2, 3])
            vec = _AllReduce.apply(torch.cat([mean, meansqr])) * (1.0 / dist.get_world_size())
            mean, meansqr = torch.split(vec, c)
            var = meansqr - mean * mean
            with torch.no_grad():
                self.running_mean += self.momentum * (mean.detach() - self.running_mean)
                self.running_var += self.momentum * (var.detach() - self.running_var)
            scale = self.weight * torch.rsqrt(var + self.eps)
            shift = self.bias - mean * scale
            return input * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    return NaiveSyncBatchNorm


# ---------------------------------------------------------------- one rank


def _modules(c: int, dtype: Any) -> dict[str, Any]:
    import torch
    from torch import nn

    import normkit_torch as nkt

    torch.manual_seed(0)
    return {
        "local": nn.BatchNorm2d(c, dtype=dtype),
        "naive": naive_sync_batch_norm_class()(c, dtype=dtype),
        "normkit": nkt.SyncBatchNorm(c, dtype=dtype),
    }


def _timing(rank: int, rounds: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from normkit_torch import testing

    out: dict[str, Any] = {}
    for label, shape in SHAPES:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=gen).requires_grad_()
        g = torch.randn(shape, generator=gen)
        mods = _modules(shape[1], torch.float32)

        def step(m: Any) -> None:
            x.grad = None
            (m(x) * g).sum().backward()

        calls = {}
        for name, m in mods.items():
            with testing.CountCollectives() as fwd:
                y = m(x)
            with testing.CountCollectives() as bwd:
                (y * g).sum().backward()
            calls[name] = (fwd.calls, bwd.calls)
        per_round: dict[str, list[float]] = {name: [] for name in mods}
        for _ in range(rounds):
            for name, m in mods.items():
                step(m)  # untimed
                dist.barrier()
                t0 = time.perf_counter()
                k = 5
                for _ in range(k):
                    step(m)
                per_round[name].append((time.perf_counter() - t0) / k)
        out[label] = {"calls": calls, "seconds": {n: statistics.median(v) for n, v in per_round.items()},
                      "ratios": {n: statistics.median(a / b for a, b in zip(per_round["normkit"], v))
                                 for n, v in per_round.items()}}
    return out


def _accuracy(rank: int) -> dict[str, Any]:
    """Batch variance and output error against one float64 process on the concatenated batch (momentum 1)."""
    import torch
    from torch import nn

    results = {}
    cases = {
        "float32, offset 1e4, 8+8 x 16x16x16": (torch.float32, 1e4, (8, 8)),
        "float64, offset 0, uneven 2+14 x 16x16x16": (torch.float64, 0.0, (2, 14)),
    }
    for label, (dtype, offset, sizes) in cases.items():
        gen = torch.Generator().manual_seed(5)
        spread = torch.linspace(0.5, 2.0, 16, dtype=torch.float64).reshape(1, 16, 1, 1)
        shift = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(1, 16, 1, 1) * 3
        x_all = (offset + shift + spread * torch.randn((sum(sizes), 16, 16, 16), generator=gen, dtype=torch.float64))
        x_all = x_all.to(dtype)
        start = sum(sizes[:rank])
        x = x_all[start:start + sizes[rank]]
        ref = nn.BatchNorm2d(16, momentum=1.0, dtype=torch.float64)
        y_ref = ref(x_all.double())[start:start + sizes[rank]].detach()
        n = x_all.numel() // 16
        var_ref = ref.running_var * (n - 1) / n  # biased
        row = {}
        for name, m in _modules(16, dtype).items():
            if name == "local":
                continue
            m.momentum = 1.0
            y = m(x).detach().double()
            var = m.running_var.double() * ((n - 1) / n if name == "normkit" else 1.0)  # naive keeps it biased
            row[name] = {
                "var_rel_error": float(((var - var_ref).abs() / var_ref).max()),
                "mean_abs_error": float((m.running_mean.double() - ref.running_mean).abs().max()),
                "y_max_abs_error": float((y - y_ref).abs().nan_to_num(float("inf")).max()),
                "nan_outputs": int(torch.isnan(y).sum()),
            }
        results[label] = row
    return results


def worker(rank: int, port: int, out: str, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from normkit_torch import testing

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:  # one CPU per rank, even under taskset -c 0
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    result = {"timing": _timing(rank, rounds), "accuracy": _accuracy(rank)}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    testing.end_process_group()


# ---------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rounds: int, timeout: float = 900.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(port), out, str(rounds)], env=env)
                 for r in range(2)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1.0))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(p.returncode != 0 for p in procs):
            raise SystemExit(f"bench_sync workers failed: exit codes {[p.returncode for p in procs]}")
        return json.loads(Path(out).read_text())


def report(result: dict[str, Any], rounds: int) -> str:
    lines = [f"### Synchronized batch norm, 2 gloo processes on 127.0.0.1, one thread each ({rounds} rounds)", "",
             "| per-rank batch | collectives per step (fwd; bwd), normkit | naive | normkit ms/step | naive ms/step "
             "| local ms/step | normkit / naive | normkit / local |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in result["timing"].items():
        calls = row["calls"]
        fmt = lambda c: f"{'+'.join(c[0]) or '-'}; {'+'.join(c[1]) or '-'}"  # noqa: E731
        s, r = row["seconds"], row["ratios"]
        lines.append(f"| {label} | {fmt(calls['normkit'])} | {fmt(calls['naive'])} | {s['normkit'] * 1e3:.2f} | "
                     f"{s['naive'] * 1e3:.2f} | {s['local'] * 1e3:.2f} | {r['naive']:.2f}x | {r['local']:.2f}x |")
    lines += ["", "### Accuracy against one float64 process on the concatenated batch (momentum 1)", "",
              "| data | layer | batch variance, max relative error | running mean, max abs error "
              "| output, max abs error | NaN outputs (rank 0) |", "|---|---|---|---|---|---|"]
    for label, row in result["accuracy"].items():
        for name, e in row.items():
            lines.append(f"| {label} | {name} | {e['var_rel_error']:.2e} | {e['mean_abs_error']:.2e} | "
                         f"{e['y_max_abs_error']:.2e} | {e['nan_outputs']} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    rounds = 3 if args.quick else 15
    result = run(rounds)
    print(report(result, rounds))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
