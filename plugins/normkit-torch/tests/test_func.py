"""Every normkit torch module under torch.func (functional_call, grad, jacrev, jvp, vmap, functionalize), both
policies, both modes.

Each transform runs on the normkit module and on its torch.nn twin (same float64 state and input) in
the test itself: wherever torch.nn's works, normkit's must work and give the same values (outputs,
the buffers functional_call updates, gradients, Jacobians, tangents, vmapped outputs), and equal
normkit's own eager autograd. Where torch.nn's raises (batch norm training under vmap), normkit's may
do either; the test asserts torch.nn still raises there, so the set of such cases is pinned.

SyncBatchNorm is not here: without a process group it is the distributed tests' (normkit_torch._sync).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, functionalize, grad, jacrev, jvp, vmap

import normkit_torch as nkt
from conftest import F64, data, make_pair, pair_id

TIGHT = dict(rtol=1e-10, atol=1e-12)
TRANSFORMS = ("functional_call", "grad", "jacrev", "jvp", "vmap", "functionalize")

# (normkit class, torch.nn twin, args, kwargs, input shape): every configuration kind of conftest.PAIRS on
# inputs small enough for Jacobians, the Lazy variants (materialized by a first call), BatchNorm of any rank
LAZY_PAIRS = [
    (nkt.LazyBatchNorm2d, nn.LazyBatchNorm2d, (), {}, (2, 3, 2, 3)),
    (nkt.LazyInstanceNorm1d, nn.LazyInstanceNorm1d, (), {"affine": False}, (2, 3, 4)),
]
ALL = [
    (nkt.BatchNorm1d, nn.BatchNorm1d, (3,), {}, (4, 3)),
    (nkt.BatchNorm1d, nn.BatchNorm1d, (3,), {"momentum": None}, (3, 3, 2)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {"affine": False}, (2, 3, 2, 3)),
    (nkt.BatchNorm2d, nn.BatchNorm2d, (3,), {"track_running_stats": False}, (2, 3, 2, 3)),
    (nkt.BatchNorm3d, nn.BatchNorm3d, (3,), {"eps": 1e-3, "momentum": 0.5}, (2, 3, 2, 2, 2)),
    (nkt.InstanceNorm1d, nn.InstanceNorm1d, (3,), {}, (2, 3, 4)),
    (nkt.InstanceNorm2d, nn.InstanceNorm2d, (3,), {"affine": True, "track_running_stats": True}, (2, 3, 2, 3)),
    (nkt.InstanceNorm3d, nn.InstanceNorm3d, (3,), {"track_running_stats": True}, (2, 3, 2, 2, 2)),
    (nkt.LayerNorm, nn.LayerNorm, ((2, 3),), {}, (2, 2, 3)),
    (nkt.LayerNorm, nn.LayerNorm, (3,), {"bias": False}, (2, 2, 3)),
    (nkt.GroupNorm, nn.GroupNorm, (3, 6), {}, (2, 6, 2)),
    (nkt.GroupNorm, nn.GroupNorm, (2, 6), {"affine": False}, (2, 6, 2, 2)),
    (nkt.RMSNorm, nn.RMSNorm, (3,), {}, (2, 2, 3)),
    (nkt.RMSNorm, nn.RMSNorm, ((2, 3),), {"eps": 1e-6, "elementwise_affine": False}, (2, 2, 3)),
    *LAZY_PAIRS,
    (nkt.BatchNorm, nn.BatchNorm1d, (3,), {}, (2, 3, 2)),
]


def torch_raises(module: nn.Module, training: bool, transform: str) -> bool:
    """Where torch.nn's module fails under the transform (so normkit's may do either), all in training with
    running statistics: batch norm increments num_batches_tracked in place on a buffer the transform captured
    (grad, jacrev, jvp; functionalize takes it), and vmap cannot batch the in-place running update of batch or
    instance norm."""
    if not training or not getattr(module, "track_running_stats", False):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return transform not in ("functional_call", "functionalize")
    return transform == "vmap"


def _build(p: tuple, training: bool) -> tuple[nn.Module, nn.Module]:
    if p in LAZY_PAIRS:
        ours_cls, torch_cls, args, kwargs, shape = p
        ours, theirs = ours_cls(*args, **kwargs, dtype=F64), torch_cls(*args, **kwargs, dtype=F64)
        for m in (ours, theirs):  # materialize, then give both the same state
            m(data(shape))
        ours.load_state_dict(theirs.state_dict())
    else:
        ours, theirs = make_pair(p)
    return ours.train(training), theirs.train(training)


def _apply(module: nn.Module, transform: str, x: torch.Tensor) -> Any:
    """``transform`` of the module's forward (its parameters and a copy of its buffers passed explicitly)."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    g = data(x.shape, seed=3)

    def out(p: dict, inp: torch.Tensor) -> torch.Tensor:
        return functional_call(module, (p, buffers), (inp,))

    def loss(p: dict, inp: torch.Tensor) -> torch.Tensor:
        return (out(p, inp) * g).sum()

    if transform == "functional_call":
        return out(params, x), buffers
    if transform == "grad":
        return grad(loss, argnums=(0, 1))(params, x), buffers
    if transform == "jacrev":
        return jacrev(lambda inp: out(params, inp))(x), buffers
    if transform == "jvp":
        return jvp(lambda inp: out(params, inp), (x,), (data(x.shape, seed=4),)), buffers
    if transform == "functionalize":  # the buffers functional_call updates, written back through the transform
        return functionalize(lambda inp: out(params, inp))(x), buffers
    assert transform == "vmap"
    xs = torch.stack([x, data(x.shape, seed=5), data(x.shape, seed=6)])
    return vmap(lambda inp: out(params, inp))(xs), buffers


def _eager(module: nn.Module, transform: str, x: torch.Tensor) -> Any:
    """The same quantity by plain autograd on a fresh copy of the module (the transform must equal it)."""
    m = module
    g = data(x.shape, seed=3)
    saved = {k: v.clone() for k, v in m.named_buffers()}
    try:
        if transform in ("functional_call", "functionalize"):
            with torch.no_grad():
                y = m(x)
            return y, {k: v.clone() for k, v in m.named_buffers()}
        if transform == "grad":
            params = list(m.parameters())
            xi = x.clone().requires_grad_()
            y = m(xi)
            grads = torch.autograd.grad((y * g).sum(), params + [xi])
            names = [k for k, _ in m.named_parameters()]
            return (dict(zip(names, grads[:-1])), grads[-1]), {k: v.clone() for k, v in m.named_buffers()}
        if transform == "jacrev":
            return torch.autograd.functional.jacobian(m, x), None
        if transform == "jvp":
            return torch.autograd.functional.jvp(m, x, data(x.shape, seed=4)), None
        xs = [x, data(x.shape, seed=5), data(x.shape, seed=6)]
        return torch.stack([m(xi) for xi in xs]), None
    finally:
        with torch.no_grad():  # the eager calls above updated the module's own buffers: put them back
            for k, v in m.named_buffers():
                v.copy_(saved[k])


def _attempt(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - torch.nn's outcome decides what is expected
        return error


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", ALL, ids=[pair_id(p) for p in ALL])
def test_transform_matches_torch_nn(p, training, transform, policy):
    ours, theirs = _build(p, training)
    x = data(p[4], seed=1)
    expected = _attempt(lambda: _apply(theirs, transform, x))
    if torch_raises(theirs, training, transform):
        assert isinstance(expected, RuntimeError), "torch.nn's works here now: test normkit's"
        return  # torch.nn's does not work here: normkit's may do either
    assert not isinstance(expected, Exception), f"torch.nn raised {expected!r}"
    got = _apply(ours, transform, x)
    torch.testing.assert_close(got, expected, **TIGHT)
    if transform != "jacrev":  # jacrev's Jacobian is torch.nn's above; jvp checks the same linearization eagerly
        value, _ = got
        eager, _ = _eager(ours, transform, x)
        torch.testing.assert_close(value, eager, **TIGHT)


def test_instance_norm_running_stats_under_grad_in_training(policy):
    """The reported case: InstanceNorm with running statistics under torch.func.grad/jacrev in training
    (the core path copied a value carrying the transform's gradient into a captured buffer: RuntimeError)."""
    ours = nkt.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=F64)
    theirs = nn.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=F64)
    x = data((2, 3, 4, 5))
    for transform in ("grad", "jacrev", "jvp"):
        (got, got_buffers), (want, want_buffers) = _apply(ours, transform, x), _apply(theirs, transform, x)
        torch.testing.assert_close(got, want, **TIGHT)
        torch.testing.assert_close(got_buffers, want_buffers, **TIGHT)
        assert not got_buffers["running_mean"].requires_grad
