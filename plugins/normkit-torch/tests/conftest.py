"""Shared helpers: every normkit module beside its torch.nn twin, with an input it takes; the kernel policies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit_torch as nkt

F64 = torch.float64
POLICIES = ("auto", "core")

# (normkit class, torch class, positional args, keyword args, input shape)
PAIRS = [
    (nkt.BatchNorm1d, nn.BatchNorm1d, (3,), {}, (4, 3)),
    (nkt.BatchNorm1d, nn.BatchNorm1d, (3,), {"momentum": None}, (4, 3, 5)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {}, (4, 3, 5, 6)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {"affine": False}, (4, 3, 5, 6)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {"bias": False}, (4, 3, 5, 6)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {"track_running_stats": False}, (4, 3, 5, 6)),
    (nkt.BatchNorm3d, nn.BatchNorm3d, (3,), {"eps": 1e-3, "momentum": 0.5}, (2, 3, 4, 3, 5)),
    (nkt.InstanceNorm1d, nn.InstanceNorm1d, (3,), {}, (4, 3, 7)),
    (nkt.InstanceNorm2d, nn.InstanceNorm2d, (3,), {"affine": True, "track_running_stats": True}, (2, 3, 5, 6)),
    (nkt.InstanceNorm3d, nn.InstanceNorm3d, (3,), {"track_running_stats": True}, (2, 3, 4, 3, 5)),
    (nkt.LayerNorm, nn.LayerNorm, ((5, 6),), {}, (4, 5, 6)),
    (nkt.LayerNorm, nn.LayerNorm, (6,), {"bias": False}, (4, 5, 6)),
    (nkt.GroupNorm, nn.GroupNorm, (3, 6), {}, (4, 6, 5)),
    (nkt.GroupNorm, nn.GroupNorm, (2, 6), {"affine": False}, (2, 6, 4, 5)),
    (nkt.RMSNorm, nn.RMSNorm, (6,), {}, (4, 5, 6)),
    (nkt.RMSNorm, nn.RMSNorm, ((5, 6),), {"eps": 1e-6, "elementwise_affine": False}, (4, 5, 6)),
]


def pair_id(p) -> str:
    ours, _, args, kwargs, _ = p
    return f"{ours.__name__}-{args}-{kwargs}"


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and running statistics (running_var positive), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif name.endswith("weight"):
                t.copy_(1.0 + 0.5 * noise)
            else:
                t.copy_(0.5 * noise)
    return module


def make_pair(p, dtype=F64, seed=0):
    """(normkit module, torch module) with the same randomized state."""
    ours_cls, torch_cls, args, kwargs, shape = p
    theirs = randomize(torch_cls(*args, **kwargs, dtype=dtype), seed)
    ours = ours_cls(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def data(shape, dtype=F64, seed=0, offset=0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=F64) * 2.0 + 0.5 + offset).to(dtype)


def assert_state_equal(a: nn.Module, b: nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], msg=k, **tol)


@pytest.fixture(params=PAIRS, ids=[pair_id(p) for p in PAIRS])
def pair(request):
    return request.param


@pytest.fixture(params=POLICIES)
def policy(request):
    """Each kernel policy in turn: "auto" (torch's kernels, the default) and "core" (normkit's math)."""
    previous = nkt.set_kernel_policy(request.param)
    try:
        yield request.param
    finally:
        nkt.set_kernel_policy(previous)
