"""normkit_torch.SyncBatchNorm under torch.func without a process group, against torch.nn.BatchNorm2d.

Wherever torch.nn's batch norm works under a transform, ours does and gives the same numbers (float64,
both kernel policies): in training without running statistics (grad, vjp, jacrev, jvp, vmap,
functional_call), in eval with running statistics, and functional_call in training with them (the
buffers passed in are updated as torch.nn updates them). With running statistics in training torch.nn
itself refuses grad/vmap (an in-place update of a captured buffer), so that case is not promised.
Before: every transform failed ("autograd.Function ... must override the setup_context staticmethod").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import normkit_torch as nkt
import sync_worker as sw

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _pair(training: bool, **kwargs) -> tuple[nn.Module, nn.Module]:
    ours = sw.init_layer(nkt.SyncBatchNorm(sw.C, dtype=F64, **kwargs)).train(training)
    theirs = nn.BatchNorm2d(sw.C, dtype=F64, **kwargs).train(training)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _transforms(x: torch.Tensor, v: torch.Tensor) -> dict:
    """name -> function of a module giving what the transform returns (the same inputs for both modules)."""
    def loss(m):
        return lambda x: (m(x) * v).sum()

    def param_loss(m):
        buffers = dict(m.named_buffers())
        return lambda p: (functional_call(m, {**p, **buffers}, (x,)) * v).sum()

    params = lambda m: {k: p.detach() for k, p in m.named_parameters()}  # noqa: E731
    return {
        "grad_x": lambda m: grad(loss(m))(x),
        "grad_params": lambda m: grad(param_loss(m))(params(m)),
        "vjp": lambda m: vjp(m, x)[1](v),
        "jacrev": lambda m: jacrev(m)(x),
        "jvp": lambda m: jvp(m, (x,), (v,)),
        "vmap": lambda m: vmap(m)(torch.stack([x, 2 * x + 1])),
        "vmap_grad": lambda m: vmap(grad(loss(m)))(torch.stack([x, x.flip(0)])),
    }


@pytest.mark.parametrize("mode", ["train_batch_stats", "eval_running_stats"])
def test_transforms_equal_torch_nn(policy, mode):
    training = mode == "train_batch_stats"
    kwargs = {} if not training else {"track_running_stats": False}
    x, v = sw.batch((3,), (2, 2), seed=11), sw.batch((3,), (2, 2), seed=12)
    ours, theirs = _pair(training, **kwargs)
    for name, run in _transforms(x, v).items():
        torch.testing.assert_close(run(ours), run(theirs), **TIGHT, msg=lambda m: f"{mode} {name}: {m}")


def test_functional_call_in_training_updates_the_buffers_passed_in(policy):
    x = sw.batch((4,), (2, 3), seed=13)
    ours, theirs = _pair(True, momentum=None)
    results = []
    for m in (ours, theirs):
        state = {k: t.clone() for k, t in m.state_dict().items()}
        y = functional_call(m, state, (x,))
        results.append((y, state))
    (ya, sa), (yb, sb) = results
    torch.testing.assert_close(ya, yb, **TIGHT)
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], **TIGHT, msg=k)
    assert int(sa["num_batches_tracked"]) == 1 and not torch.equal(sa["running_mean"], ours.running_mean)
