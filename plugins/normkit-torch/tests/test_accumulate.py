"""accumulate_statistics: k micro-batches normalize with their own statistics, and the running statistics take
one update with the concatenated batch (torch.nn's one forward on torch.cat, float64 to 1e-10), not k."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, data, randomize

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

SIZES = (4, 6, 2)  # uneven micro-batches: an equal-weight average of their statistics would be wrong

# (normkit module, torch.nn reference, input shape without the batch)
CASES = {
    "BatchNorm1d": (lambda: nkt.BatchNorm1d(3), lambda: nn.BatchNorm1d(3), (3,)),
    "BatchNorm1d-cumulative": (lambda: nkt.BatchNorm1d(3, momentum=None), lambda: nn.BatchNorm1d(3, momentum=None),
                               (3, 5)),
    "BatchNorm2d": (lambda: nkt.BatchNorm2d(3, momentum=0.3), lambda: nn.BatchNorm2d(3, momentum=0.3), (3, 4, 5)),
    "BatchNorm3d": (lambda: nkt.BatchNorm3d(3), lambda: nn.BatchNorm3d(3), (3, 2, 3, 4)),
    "ghost": (lambda: nkt.BatchNorm2d(3, virtual_batch_size=2), lambda: nn.BatchNorm2d(3), (3, 4, 5)),
    "BatchNorm-any-rank": (lambda: nkt.BatchNorm(3), lambda: nn.BatchNorm1d(3), (3, 7)),
    "SyncBatchNorm-one-process": (lambda: nkt.SyncBatchNorm(3), lambda: nn.BatchNorm2d(3), (3, 4, 5)),
}


def _pair(case: str):
    ours_fn, theirs_fn, _ = CASES[case]
    theirs = randomize(theirs_fn().to(F64))
    theirs.num_batches_tracked.fill_(5)  # the cumulative average weighs the new batch 1/6
    ours = ours_fn().to(F64)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_running_statistics_of_the_concatenated_batch(case, policy):
    """Inside, each call's output and input gradient are the module's usual ones (its own batch's statistics)
    and the running statistics do not move; on exit they equal one torch.nn update with torch.cat of the
    micro-batches: num_batches_tracked + 1, the momentum (or 1/n) step, unbiased variance of the whole."""
    ours, theirs = _pair(case)
    plain = copy.deepcopy(ours)
    shape = CASES[case][2]
    micro = [data((n, *shape), seed=i, offset=3.0 * i) for i, n in enumerate(SIZES)]
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with nkt.accumulate_statistics(ours) as model:
        assert model is ours
        for x in micro:
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            a, b = ours(xa), plain(xb)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            g = torch.linspace(-1, 1, a.numel(), dtype=F64).reshape(a.shape)
            a.backward(g), b.backward(g)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
            for k, v in ours.state_dict().items():
                assert torch.equal(v, before[k]), f"{k} moved inside accumulate_statistics"
    theirs(torch.cat(micro))
    assert int(ours.num_batches_tracked) == 6 == int(theirs.num_batches_tracked)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-10, atol=1e-10)
    assert int(plain.num_batches_tracked) == 8  # without it: k = 3 updates of small batches


def test_model_eval_calls_exceptions_and_refusals():
    """A whole model: every batch norm folds once; calls in eval mode record nothing; an exception inside discards
    what was recorded; a torch.nn batch norm (not converted), a BatchRenorm and nesting are refused by name."""
    torch.manual_seed(0)
    theirs = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 3 * 3, 5), nn.BatchNorm1d(5)).to(F64))
    ours = nkt.convert(copy.deepcopy(theirs))
    micro = [data((n, 3, 5, 5), seed=n) for n in SIZES]
    seen = []  # what the second batch norm saw: the first normalized each micro-batch with its own statistics
    hook = ours[5].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with nkt.accumulate_statistics(ours):
        for x in micro:
            ours(x)
        ours.eval()
        ours(micro[0])  # inference: running statistics used, nothing recorded
        ours.train()
    hook.remove()
    theirs[1](theirs[0](torch.cat(micro)))
    theirs[5](torch.cat(seen[: len(SIZES)]))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-10, atol=1e-10, msg=k)

    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ZeroDivisionError):
        with nkt.accumulate_statistics(ours):
            ours(micro[0])
            1 / 0
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    with nkt.accumulate_statistics(ours):  # usable again after the exception
        ours(micro[1])
    assert int(ours[1].num_batches_tracked) == 2

    with pytest.raises(TypeError, match=r"convert\(model\) first.*1 \(BatchNorm2d\)"):
        with nkt.accumulate_statistics(theirs):
            pass
    with pytest.raises(TypeError, match=r"0 \(BatchRenorm2d\)"):
        with nkt.accumulate_statistics(nn.Sequential(nkt.BatchRenorm2d(3))):
            pass
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got list"):
        with nkt.accumulate_statistics([ours]):
            pass
    with nkt.accumulate_statistics(ours):
        with pytest.raises(RuntimeError, match="already active on BatchNorm2d, BatchNorm1d: it does not nest"):
            with nkt.accumulate_statistics(ours[1:]):
                pass


def test_lazy_batch_norm_materialized_inside():
    """A Lazy batch norm whose first call is inside the context takes its shape there and folds once."""
    ours, theirs = nkt.LazyBatchNorm2d().to(F64), nn.BatchNorm2d(3).to(F64)
    micro = [data((n, 3, 4, 4), seed=n) for n in SIZES]
    with nkt.accumulate_statistics(ours):
        for x in micro:
            ours(x)
    theirs(torch.cat(micro))
    assert type(ours) is nkt.BatchNorm2d and int(ours.num_batches_tracked) == 1
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-10, atol=1e-10)


def test_sync_batch_norm_under_ddp_across_two_gloo_processes(tmp_path):
    """Two ranks, DDP, normkit's SyncBatchNorm, two uneven micro-batches each: on exit every rank holds the running
    statistics of one torch.nn update with all four micro-batches of both ranks (num_batches_tracked 1)."""
    from pathlib import Path

    import accumulate_worker as aw
    from normkit_torch.testing import run_gloo_workers

    states = run_gloo_workers(Path(__file__).with_name("accumulate_worker.py"), tmp_path, deadline_s=120)
    # micro-step i normalizes with the merge of both ranks' i-th micro-batches: the fold merges them all
    reference = aw.build_model()[0]
    reference(torch.cat(aw.rank_batches(0) + aw.rank_batches(1)))
    for r, state in enumerate(states):
        assert int(state["0.num_batches_tracked"]) == 1
        for k in ("running_mean", "running_var"):
            torch.testing.assert_close(state[f"0.{k}"], getattr(reference, k), rtol=1e-10, atol=1e-12,
                                       msg=f"rank {r} {k}")
