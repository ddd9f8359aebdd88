"""torch.utils.checkpoint: the recomputation in backward leaves normkit's running statistics alone, so one training
step updates them once (torch.nn's own modules update twice: num_batches_tracked 2); output and gradients stay
torch.nn's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import normkit_torch as nkt
from conftest import F64, data, randomize


def _net(sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5))
    return randomize(net.to(F64))


def _step(model: nn.Module, x: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = run(model, x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape))
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


RUNS = {
    "reentrant": lambda m, x: checkpoint(m, x, use_reentrant=True),
    "non-reentrant": lambda m, x: checkpoint(m, x, use_reentrant=False),
    "sequential": lambda m, x: checkpoint_sequential(m, 2, x, use_reentrant=False),
}


@pytest.mark.parametrize("sync", [False, True], ids=["BatchNorm", "SyncBatchNorm"])
@pytest.mark.parametrize("mode", sorted(RUNS))
def test_checkpointed_step_updates_running_statistics_once(mode, sync, policy):
    """One checkpointed forward + backward: num_batches_tracked == 1 and running statistics equal to one torch.nn
    step without checkpoint (momentum 0.1 and the cumulative average); output, input and parameter gradients too."""
    theirs = _net()
    ours = nkt.convert(copy.deepcopy(theirs))
    if sync:  # normkit's SyncBatchNorm in one process (no process group): local statistics, the same hook
        ours = nkt.SyncBatchNorm.convert_sync_batchnorm(ours)
        assert type(ours[1]) is nkt.SyncBatchNorm
    for _ in range(2):
        ours.zero_grad(), theirs.zero_grad()
        x = data((6, 3, 6, 6), seed=_)
        y, gx, gp = _step(ours, x, RUNS[mode])
        y0, gx0, gp0 = _step(theirs, x, lambda m, x: m(x))
        torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, gx0, rtol=1e-10, atol=1e-12)
        for n in gp0:
            torch.testing.assert_close(gp[n], gp0[n], rtol=1e-10, atol=1e-12, msg=n)
        for i in (1, 4, 7):
            assert int(ours[i].num_batches_tracked) == _ + 1
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_torch_nn_updates_twice_under_checkpoint():
    """The problem itself, as torch.nn has it (so the test above could fail): its recomputation updates again."""
    theirs = _net()
    _step(theirs, data((6, 3, 6, 6)), RUNS["non-reentrant"])
    assert int(theirs[1].num_batches_tracked) == 2


def test_checkpoint_inside_accumulate_statistics():
    """Both together: the recomputation records nothing either; the fold is one update with the whole batch."""
    theirs = nn.BatchNorm2d(3).to(F64)
    ours = nkt.convert(nn.Sequential(copy.deepcopy(theirs)))
    micro = [data((n, 3, 4, 4), seed=n) for n in (2, 5)]
    with nkt.accumulate_statistics(ours):
        for x in micro:
            _step(ours, x, RUNS["non-reentrant"])
    theirs(torch.cat(micro))
    assert int(ours[0].num_batches_tracked) == 1
    torch.testing.assert_close(ours[0].running_var, theirs.running_var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[0].running_mean, theirs.running_mean, rtol=1e-10, atol=1e-12)
