"""normkit_torch.SyncBatchNorm's second derivatives in one process (no process group, a world of one), float64.

The two-process gradient penalty is in test_sync.py (the same workers as the other gloo checks).
gradcheck/gradgradcheck compare autograd's first and second derivatives with finite differences of
the module in training; the gradient penalty is compared with torch.nn.BatchNorm2d's.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normkit_torch as nkt
import sync_worker as sw
from normkit_torch.testing import CountCollectives

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _functional(module: nn.Module):
    """(x, weight, bias) -> module output with those parameters, in training (running statistics updated too)."""
    def f(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,), strict=False)
    return f


@pytest.mark.parametrize("kwargs", [{}, {"track_running_stats": False}], ids=str)
def test_gradcheck_and_gradgradcheck_in_training(kwargs):
    """Float64 (3, 2, 3) input (18 values, 9 per channel) with weight and bias: first and second derivatives
    against finite differences (torch.autograd.gradgradcheck, default tolerances); failed before (the backward
    treated the batch mean and variance as constants)."""
    module = sw.init_layer(nkt.SyncBatchNorm(2, dtype=F64, **kwargs))
    x = sw.batch((3,), (3,), seed=1, channels=2).requires_grad_()
    w = module.weight.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    f = _functional(module)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _penalty(module: nn.Module, x: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = module(x)
    (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
    (g.square().sum() + y.square().sum()).backward()
    return {"x": x.grad, "weight": module.weight.grad, "bias": module.bias.grad}


def test_gradient_penalty_equals_torch_nn():
    """A gradient penalty's gradients (WGAN-GP style) equal torch.nn.BatchNorm2d's, one process and a world of one
    (an initialized gloo group of size 1: no collective). Before: 3573 where torch.nn gives 4419 (the issue's)."""
    x, v = sw.batch((4,), (3, 2), seed=2), sw.batch((4,), (3, 2), seed=3)
    want = _penalty(sw.init_layer(nn.BatchNorm2d(sw.C, dtype=F64)), x, v)
    got = _penalty(sw.init_layer(nkt.SyncBatchNorm(sw.C, dtype=F64)), x, v)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TIGHT, msg=key)


def test_world_of_one_gradgradcheck(tmp_path):
    """An initialized group of one rank: the same derivatives (no collective runs)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        module = sw.init_layer(nkt.SyncBatchNorm(2, dtype=F64))
        x = sw.batch((3,), (3,), seed=4, channels=2).requires_grad_()
        w, b = (p.detach().clone().requires_grad_() for p in (module.weight, module.bias))
        with CountCollectives() as counted:
            assert torch.autograd.gradgradcheck(_functional(module), (x, w, b))
        assert counted.calls == []
    finally:
        dist.destroy_process_group()
