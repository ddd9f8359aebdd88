"""Time ratio normkit_torch.BatchNorm2d / torch.nn.BatchNorm2d (training mode), one thread, interleaved pairs.

    python plugins/normkit-torch/scripts/ratio_bn2d.py [--repeats 15] [--autograd]

Prints the median of the paired ratios for the forward pass and for forward + backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normkit_torch as nkt


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shape", type=int, nargs=4, default=(32, 64, 56, 56))
    parser.add_argument("--autograd", action="store_true",
                        help="train through normkit_torch._autograd.batch_norm_train instead of the core")
    args = parser.parse_args()
    if args.autograd:
        from normkit_torch import _autograd, _functional

        _functional.batch_norm_train = _autograd.batch_norm_train
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(*args.shape)
    g = torch.randn(*args.shape)
    ours, theirs = nkt.BatchNorm2d(args.shape[1]), nn.BatchNorm2d(args.shape[1])
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def step():
            xg.grad = None
            m.zero_grad(set_to_none=True)
            m(xg).backward(g)
        return step

    for label, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        for m in (ours, theirs):  # warm up
            make(m)()
        ratios, t_ours, t_theirs = [], [], []
        for i in range(args.repeats):
            pair = [(ours, t_ours), (theirs, t_theirs)]
            if i % 2:
                pair.reverse()  # alternate the order inside each pair
            times = {}
            for m, bucket in pair:
                times[id(m)] = _time(make(m))
                bucket.append(times[id(m)])
            ratios.append(times[id(ours)] / times[id(theirs)])
        print(f"{label:17s} ratio median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); normkit {statistics.median(t_ours) * 1e3:.1f} ms, "
              f"torch {statistics.median(t_theirs) * 1e3:.1f} ms; {args.repeats} pairs, 1 thread")


if __name__ == "__main__":
    main()
