"""normkit_torch.SyncBatchNorm: two gloo processes against ONE process on the concatenated batch; conversions.

The two-process cases all run in one pair of workers (sync_worker.py, started once for the module,
killed at a deadline): each rank runs every case and saves what it saw; the tests here build the
one-process reference (torch.nn's batch norm and the float64 NumPy reference) on the same global
batches and compare.

Tolerances. float64: at most 8 * 30 = 240 values per channel of size O(1..10); each sum errs by at
most n * eps = 240 * 1.1e-16 < 3e-14 relative, and normalization multiplies it by |x - mean| / std
< 10: under 3e-13, so rtol 1e-10 / atol 1e-12 leaves a 300x margin. Other dtypes: at the case.
"""

from __future__ import annotations

import datetime
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import normkit_torch as nkt
import sync_worker as sw
from normkit.testing import reference
from normkit_torch.testing import CountCollectives, run_gloo_workers

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

TIGHT = dict(rtol=1e-10, atol=1e-12)
F64 = torch.float64
DEADLINE_S = 90.0  # seconds for both workers to run every case; about 5 s idle, 20 s on a loaded 2-core machine
WORKER = Path(__file__).with_name("sync_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """What each of the two ranks saved; the workers run once for the whole module."""
    return run_gloo_workers(WORKER, tmp_path_factory.mktemp("sync"), deadline_s=DEADLINE_S)


def _cat(ranks: list[dict], *path: Any) -> torch.Tensor:
    parts = []
    for res in ranks:
        for key in path:
            res = res[key]
        parts.append(res)
    return torch.cat(parts)


def _reference_layer(case: dict[str, Any], seed: int, dtype: torch.dtype = F64) -> nn.Module:
    cls = nn.BatchNorm2d if len(case["spatial"]) == 2 else nn.BatchNorm1d
    ref = sw.init_layer(cls(sw.C, dtype=F64, **case.get("kwargs", {})))
    if dtype != F64:  # the workers' module is float32: the same rounded parameters, computed in float64
        with torch.no_grad():
            for t in list(ref.parameters()) + [ref.running_mean, ref.running_var]:
                t.copy_(t.float().double())
    return ref


def _check_layer_case(ranks: list[dict], name: str, case: dict, seed: int, dtype: torch.dtype, tol: dict,
                      mean_tol: dict, var_tol: dict, grads: bool = True) -> None:
    """Every step of ``case`` against torch.nn on the concatenated batch, and against the NumPy reference."""
    stat_tol = {"running_mean": mean_tol, "running_var": var_tol}
    ref = _reference_layer(case, seed, dtype)
    sizes, spatial = case["sizes"], case["spatial"]
    momentum = case.get("kwargs", {}).get("momentum", 0.1)
    eps = case.get("kwargs", {}).get("eps", 1e-5)
    np_mean, np_var = ref.running_mean.numpy().copy(), ref.running_var.numpy().copy()
    weight = ref.weight.detach().numpy().copy()
    for step in range(sw.STEPS):
        x = sw.batch(sizes, spatial, seed + step, offset=case.get("offset", 0.0)).to(dtype).double().requires_grad_()
        g = sw.batch(sizes, spatial, seed + 50 + step).to(dtype).double()
        y = ref(x)
        (y * g).sum().backward()
        got = lambda key: _cat(ranks, name, "steps", step, key).double()  # noqa: E731
        # against torch.nn on one process
        torch.testing.assert_close(got("y"), y.detach(), **tol)
        for key, want in (("grad_weight", ref.weight.grad), ("grad_bias", ref.bias.grad)) if grads else ():
            local = [res[name]["steps"][step][key].double() for res in ranks]  # local sums; DDP averages them
            torch.testing.assert_close(local[0] + local[1], want, **tol)
        if grads:
            torch.testing.assert_close(got("grad_input"), x.grad, **tol)
        for key in ("running_mean", "running_var"):
            a, b = (res[name]["steps"][step][key] for res in ranks)
            assert torch.equal(a, b), f"{name} step {step}: {key} differs between ranks"
            if stat_tol[key] is not None:
                torch.testing.assert_close(a.double(), getattr(ref, key), **stat_tol[key])
        assert [res[name]["steps"][step]["num_batches_tracked"] for res in ranks] == [step + 1] * 2
        # against the float64 NumPy reference (the definition)
        m = 1.0 / (step + 1) if momentum is None else momentum
        xn, gn = x.detach().numpy(), g.numpy()
        y_np, np_mean, np_var = reference.batch_norm(xn, np_mean, np_var, weight, ref.bias.detach().numpy(),
                                                     training=True, momentum=m, eps=eps)
        dx_np, dw_np, _ = reference.batch_norm_grad(xn, gn, weight, eps=eps)
        np.testing.assert_allclose(got("y").numpy(), y_np, **tol)
        if grads:
            np.testing.assert_allclose(got("grad_input").numpy(), dx_np, **tol)
        for key, want in (("running_mean", np_mean), ("running_var", np_var)) if stat_tol[key] is not None else ():
            np.testing.assert_allclose(ranks[0][name]["steps"][step][key].double().numpy(), want, **stat_tol[key])
        ref.zero_grad()
    ref.eval()
    x_eval = sw.batch(sizes, spatial, seed + 99).to(dtype).double()
    torch.testing.assert_close(_cat(ranks, name, "eval").double(), ref(x_eval), **tol)


@pytest.mark.parametrize("name", list(sw.LAYER_CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks, name):
    """even (4+4), uneven (3+5, cumulative momentum, 3-D input), empty rank (0+8): two steps, then eval."""
    seed = 10 * list(sw.LAYER_CASES).index(name)
    _check_layer_case(ranks, name, sw.LAYER_CASES[name], seed, F64, TIGHT, TIGHT, TIGHT)


def test_one_collective_per_forward_and_per_backward_none_in_eval(ranks):
    """A module's first forward also gathers the ranks' signatures alone (fixed size: it cannot fail on differing
    feature counts); every later forward checks them inside the statistics' one all_gather."""
    gather = sw.GATHER
    for res in ranks:
        for name in sw.LAYER_CASES:
            first, second = (step["collectives"] for step in res[name]["steps"])
            assert first == ([gather, gather], ["all_reduce"]), name
            assert second == ([gather], ["all_reduce"]), name
            assert res[name]["eval_collectives"] == [], name


def test_half_input_is_reduced_in_float32(ranks):
    """float16 input, float32 module, ranks 3 + 5. The output and input gradient are rounded to float16 once
    (relative error <= 2**-11; rtol 2**-10 leaves room for the float32 arithmetic, about 1e-6 absolute, atol
    1e-5); the float32 running statistics err by the float32 sums over 128 values: rtol 1e-5."""
    case = sw.HALF_CASE
    stats = dict(rtol=1e-5, atol=1e-6)
    _check_layer_case(ranks, "half", case, 40, case["dtype"], dict(rtol=2**-10, atol=1e-5), stats, stats)


def test_float32_data_far_from_zero_keeps_its_variance(ranks):
    """Mean 1e4, std 0.5..2 in float32 (where E[x^2] - E[x]^2 loses every digit: 1e8 * 6e-8 = 6 > var).
    momentum 1: the running statistics ARE the global batch statistics of the step.

    Mean: each rank's float32 mean and the merged one are rounded once each, half an ulp of [8192, 16384)
    = 2**-11 apiece: atol 2**-10. Output: that over std >= 0.5, atol 2e-3 (rtol 1e-5: float32 arithmetic).
    Variance: the float32 two-pass of each rank errs by < 1e-6 relative (x - mean is exact by Sterbenz);
    the merge adds d**2 * n_a * n_b / n with d, the difference of the two ranks' means, off by up to 2**-10,
    so the bound per channel is 1e-6 + (2 |d| 2**-10 + 2**-20) * n_a n_b / n**2 / var, from the data.
    Gradients are not compared: any float32 mean near 1e4 is 4.9e-4 off, a bias of sum(dy) * 4.9e-4 / std
    in grad_weight that no float32 layer (torch's included) avoids."""
    case = sw.SHIFTED_CASE
    _check_layer_case(ranks, "shifted", case, 60, torch.float32, dict(rtol=1e-5, atol=2e-3),
                      dict(rtol=0, atol=2.0**-10), None, grads=False)
    sizes, spatial = case["sizes"], case["spatial"]
    for step in range(sw.STEPS):
        x = sw.batch(sizes, spatial, 60 + step, offset=case["offset"]).float().double()
        a, b = x[:sizes[0]], x[sizes[0]:]
        n_a, n_b = a.numel() // sw.C, b.numel() // sw.C
        n = n_a + n_b
        d = (a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs()
        var = x.var((0, 2, 3), unbiased=True)
        bound = 1e-6 + (2 * d * 2.0**-10 + 2.0**-20) * n_a * n_b / n**2 / x.var((0, 2, 3), unbiased=False)
        got = ranks[0]["shifted"]["steps"][step]["running_var"].double()
        assert torch.all((got - var).abs() <= bound * var), ((got - var).abs() / var, bound)
        assert torch.all(bound < 1e-4)  # the bound itself is small: the data do not make the check vacuous


def test_ddp_training_equals_one_process_on_the_global_batch(ranks):
    """torch model -> nn.SyncBatchNorm.convert_sync_batchnorm -> normkit_torch.convert -> DDP (gloo, CPU),
    SGD with momentum for 3 steps on 4 + 4 samples: parameters and running statistics equal one process
    on the 8 samples (the mean loss over the global batch is the average of the two ranks' mean losses)."""
    assert all(res["ddp"]["kinds"] == ["SyncBatchNorm"] for res in ranks)
    net = sw.make_net(nn.BatchNorm2d)
    opt = torch.optim.SGD(net.parameters(), lr=sw.DDP_LR, momentum=0.9)
    for step in range(sw.DDP_STEPS):
        x, target = sw.ddp_data(step)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), target).backward()
        opt.step()
    want = net.state_dict()
    for r, res in enumerate(ranks):
        got = res["ddp"]["state"]
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TIGHT, msg=lambda m: f"rank {r} {key}: {m}")
    # the parameters moved: the comparison is not between two untouched initializations
    assert not torch.allclose(want["0.weight"], sw.make_net(nn.BatchNorm2d).state_dict()["0.weight"])


def test_all_gather_moments_merges_mask_counts_and_int_counts(ranks):
    """Rank 0 passes per-feature counts (a mask), rank 1 an int count: the merge is the masked data's statistics."""
    x = sw.batch((5, 6), (), seed=300).numpy()
    mask = (np.arange(11).reshape(11, 1) % np.array([1, 2, 3])) == 0
    mask[5:] = True
    for res in ranks:
        got = res["collectives"]
        for f in range(sw.C):
            values = x[mask[:, f], f]
            assert got["count"][f].item() == values.size
            np.testing.assert_allclose(got["mean"][f].item(), values.mean(), **TIGHT)
            np.testing.assert_allclose(got["m2"][f].item(), ((values - values.mean()) ** 2).sum(), **TIGHT)


# --- one process ----------------------------------------------------------------------------------


def _pair(**kwargs: Any) -> tuple[nn.Module, nn.Module]:
    ours = sw.init_layer(nkt.SyncBatchNorm(sw.C, dtype=F64, **kwargs))
    theirs = nn.BatchNorm2d(sw.C, dtype=F64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _steps_equal(ours: nn.Module, theirs: nn.Module) -> None:
    for step in range(2):
        x = sw.batch((3, 4), (5, 6), seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, **TIGHT)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TIGHT)
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, **TIGHT, msg=name)
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(a, b, **TIGHT, msg=name)
    ours.eval(), theirs.eval()
    x = sw.batch((2, 2), (5, 6), seed=9)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=str)
def test_single_process_equals_batchnorm2d(kwargs):
    assert not dist.is_initialized()
    _steps_equal(*_pair(**kwargs))


def test_world_of_one_is_plain_batch_norm(tmp_path):
    """An initialized group of one rank (a DDP script run alone): no collective, torch.nn's batch norm."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        with CountCollectives() as counted:
            _steps_equal(*_pair())
        assert counted.calls == []
    finally:
        dist.destroy_process_group()


def test_class_surface_is_torchs():
    ours, theirs = nkt.SyncBatchNorm(4, momentum=0.2, bias=False), nn.SyncBatchNorm(4, momentum=0.2, bias=False)
    # a _BatchNorm (swa_utils, FSDP and weight-decay filters see it), not an nn.SyncBatchNorm: DDP refuses those on CPU
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    assert inspect.signature(nkt.SyncBatchNorm) == inspect.signature(nn.SyncBatchNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for bad in (torch.randn(3), torch.randn(4, 0)):
        with pytest.raises(ValueError) as a:
            ours(bad)
        with pytest.raises(ValueError) as b:
            theirs(bad)
        assert str(a.value) == str(b.value)
    with pytest.raises(ValueError) as a:  # one value per channel in training, one process
        nkt.SyncBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError) as b:
        nn.SyncBatchNorm(3)(torch.randn(1, 3))
    assert str(a.value) == str(b.value)


def test_convert_and_to_torch_map_sync_batch_norm_both_ways():
    group = object()  # stands for a process group: carried over, never used in one process
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3, momentum=0.3, process_group=group)).to(F64)
    bn = net[1]
    sw.init_layer(bn)
    net.eval()
    ours = nkt.convert(net)[1]
    assert type(ours) is nkt.SyncBatchNorm and ours.process_group is group and not ours.training
    assert ours.weight is bn.weight and ours.running_var is bn.running_var and ours.momentum == 0.3
    back = nkt.to_torch(nn.Sequential(ours))[0]
    assert type(back) is nn.SyncBatchNorm and back.process_group is group and back.weight is bn.weight


def test_convert_sync_batchnorm_from_torch_and_normkit_modules():
    net = nn.Sequential(nn.BatchNorm2d(3, bias=False), nkt.BatchNorm1d(3, track_running_stats=False),
                        nn.Sequential(nn.SyncBatchNorm(3, affine=False)), nn.Conv2d(3, 3, 1)).to(F64)
    net[0].eval()
    before = [(id(m.weight), id(m.running_mean), id(m.num_batches_tracked), m.training)
              for m in (net[0], net[1], net[2][0])]
    out = nkt.SyncBatchNorm.convert_sync_batchnorm(net, process_group="pg")
    assert out is net and type(net[3]) is nn.Conv2d
    mods = (net[0], net[1], net[2][0])
    assert all(type(m) is nkt.SyncBatchNorm and m.process_group == "pg" for m in mods)
    assert [(id(m.weight), id(m.running_mean), id(m.num_batches_tracked), m.training) for m in mods] == before
    assert net[0].bias is None and net[1].running_mean is None and net[2][0].weight is None
    torch_version = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, bias=False)).to(F64))[0]
    assert list(net[0].state_dict()) == list(torch_version.state_dict())
    root = nkt.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))  # a root is returned, not swapped
    assert type(root) is nkt.SyncBatchNorm


def test_merge_rows_of_any_world_size_equals_the_whole_data():
    """The pairwise tree over 1, 2, 3 and 5 ranks (odd counts pad with the merge's identity), empty ranks
    included, equals the statistics of the concatenated data; uninitialized, all_gather_moments is that
    merge of one row (per-feature count)."""
    from normkit_torch.distributed import _pack, all_gather_moments, local_moments, merge_rows

    x = sw.batch((4, 0, 7, 1, 3), (), seed=400)  # (15, C)
    splits = torch.split(x, [4, 0, 7, 1, 3])
    for world in (1, 2, 3, 5):
        parts = list(splits[:world - 1]) + [torch.cat(splits[world - 1:])]
        merged = merge_rows(torch.stack([_pack(local_moments(p)) for p in parts]))
        assert merged.count.tolist() == [15.0] * sw.C
        torch.testing.assert_close(merged.mean, x.mean(0), **TIGHT)
        torch.testing.assert_close(merged.m2, x.var(0, unbiased=False) * 15, **TIGHT)
    alone = all_gather_moments(local_moments(x))
    assert alone.count.tolist() == [15.0] * sw.C and alone.mean.dtype == F64
    torch.testing.assert_close(alone.mean, x.mean(0), **TIGHT)


# --- second derivatives, agreement, divergence (the same two workers) --------------------------------------


def test_gradient_penalty_across_two_ranks_equals_one_process(ranks):
    """Second derivatives: d/d(x, w, b) of sum((dL/dx)**2) + sum(y**2), L = sum(y * v), on 3 + 5 samples across
    two ranks, equal torch.nn.BatchNorm1d's on the 8 samples in one process (the weight and bias gradients are
    local sums whose total is the one-process gradient; float64, TIGHT)."""
    sizes, spatial = sw.PENALTY_CASE["sizes"], sw.PENALTY_CASE["spatial"]
    ref = _reference_layer({"spatial": spatial}, 0)
    x = sw.batch(sizes, spatial, seed=500).requires_grad_()
    y = ref(x)
    (g,) = torch.autograd.grad((y * sw.batch(sizes, spatial, seed=501)).sum(), x, create_graph=True)
    (g.square().sum() + y.square().sum()).backward()
    torch.testing.assert_close(_cat(ranks, "penalty", "first"), g.detach(), **TIGHT)
    torch.testing.assert_close(_cat(ranks, "penalty", "grad_input"), x.grad, **TIGHT)
    for key, want in (("grad_weight", ref.weight.grad), ("grad_bias", ref.bias.grad)):
        torch.testing.assert_close(ranks[0]["penalty"][key] + ranks[1]["penalty"][key], want, **TIGHT)


def _raised(ranks: list[dict], key: str, kind: str, *needles: str) -> None:
    """Every rank raised ``kind`` within 10 s (no process-group timeout) and its text names each needle."""
    for r, res in enumerate(ranks):
        got = res["agreement"][key]
        assert got["type"] == kind, (r, key, got)
        for needle in needles:
            assert needle in got["text"], (r, key, needle, got["text"])
        assert got["seconds"] < 10.0, (r, key, got["seconds"])


def test_ranks_with_different_feature_counts_or_dtypes_both_raise_naming_them(ranks):
    """SyncBatchNorm(3) on one rank, SyncBatchNorm(4) on the other (gloo used to abort with an enforce failure and
    'connection reset'); float32 on one, float64 on the other: a SyncMismatchError on both ranks naming the field
    and each rank's value; later on an agreed module, a dtype or width change on one rank only is caught too."""
    _raised(ranks, "features", "SyncMismatchError", "features (rank 0: 3, rank 1: 4)")
    _raised(ranks, "dtype", "SyncMismatchError", "dtype (rank 0: float32, rank 1: float64)")
    _raised(ranks, "dtype_later", "SyncMismatchError", "dtype (rank 0: float64, rank 1: float32)")
    _raised(ranks, "features_later", "SyncMismatchError", "features (rank 0: 3, rank 1: 4)")


def test_a_rank_whose_input_needs_no_gradient_makes_both_raise_before_any_update(ranks):
    """One rank's input requires grad, the other's not (one backward would wait in the all_reduce forever):
    both ranks raise at the forward, the module's state untouched."""
    _raised(ranks, "grad", "SyncMismatchError", "backward follows (rank 0: True, rank 1: False)")
    assert all(res["agreement"]["grad_state_kept"] for res in ranks)


def test_after_a_mismatch_the_group_still_works(ranks):
    """The same rows on every rank: all raise at the same collective and the next call synchronizes normally
    (3 + 4 samples; the statistics of the 7); a parameter-free module both ranks widen to 5 features too."""
    x = lambda n, c=sw.C: sw.batch((n,), (2,), seed=600 + n, channels=c)  # noqa: E731
    for key, parts, c in (("after", (x(3), x(4)), sw.C), ("wider", (x(2, 5), x(3, 5)), 5)):
        whole = torch.cat(parts)
        ref = nn.BatchNorm1d(c, affine=False, track_running_stats=False, dtype=F64)
        torch.testing.assert_close(_cat(ranks, "agreement", key), ref(whole), **TIGHT)


def test_one_value_per_channel_over_all_ranks_raises_torchs_error_on_every_rank(ranks):
    """1 sample on rank 0 and 0 on rank 1 (the result was the bias): torch's ValueError on both ranks, nothing
    updated (num_batches_tracked 0, running_var still ones)."""
    _raised(ranks, "one_value", "ValueError", "Expected more than 1 value per channel when training")
    for res in ranks:
        assert res["agreement"]["one_value_tracked"] == 0
        assert torch.equal(res["agreement"]["one_value_running_var"], torch.ones(sw.C, dtype=F64))


@pytest.mark.parametrize("case", ["eval", "backward"])
def test_a_rank_that_stops_calling_ends_at_the_group_timeout_with_a_clear_error(ranks, case):
    """No collective can see a rank that does not call (one in eval while the other trains; one that skips the
    backward): the waiting rank raises SyncTimeoutError saying why after the process group's timeout (3 s here),
    in the forward or in loss.backward(); the other rank (no collective, as torch's) returns."""
    got, other = ranks[0]["divergence"][case], ranks[1]["divergence"][case]
    assert got["type"] == "SyncTimeoutError", got
    assert "eval mode" in got["text"] and "init_process_group(timeout=" in got["text"], got["text"]
    assert sw.TIMEOUT_S - 0.5 <= got["seconds"] < sw.TIMEOUT_S + 15.0, got["seconds"]
    assert other["type"] is None, other
