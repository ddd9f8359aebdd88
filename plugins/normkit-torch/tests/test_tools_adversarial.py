"""The batch-norm tools and the scalers against a hostile user (issue 20): shared modules, axes that
differ, transposed convolutions, batch norms called twice, float32 merges, NaN/inf, empty and wrong inputs.

Each test pins a behaviour that was wrong or unseen before: freeze/unfreeze of a module registered at
two places, freeze keeping a non-default eps, fold refusing Linear + BatchNorm1d on 3-D input and
folding ConvTranspose along its own channel axis, recalibrate merging every call of a shared batch
norm in float64 and resetting num_batches_tracked, the scalers' all-NaN features (scikit-learn's NaN).
Tolerances: float64 folds 1e-10 relative (see test_tools.py); float32 recalibration to the float32
rounding of the float64 answer (1 ulp of the mean, 1e-6 relative variance).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit_torch as nkt
from normkit_torch import UnfoldedBatchNormWarning

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + offset).to(dtype)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if nkt._frozen.is_batch_norm(m) and m.running_var is not None:
                for name in ("running_mean", "weight", "bias"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype))
                m.running_var.copy_((0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=F64)).to(m.running_var.dtype))
    return model


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def unfolded_of(model, **kwargs):
    with pytest.warns(UnfoldedBatchNormWarning) as record:
        out = nkt.fold_batch_norm(model, **kwargs)
    (w,) = [r.message for r in record if isinstance(r.message, UnfoldedBatchNormWarning)]
    return out, dict(w.unfolded)


def fold_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfoldedBatchNormWarning)
        return nkt.fold_batch_norm(model, **kwargs)


# ------------------------------------------------------------------------------------------------- freeze


class Shared(nn.Module):
    """One batch norm under two names of one parent and in a second parent; one frozen module twice too."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.alias = self.bn  # the same module under a second name: named_children() yields it once
        self.block = nn.Sequential(self.bn)  # and in another parent


def test_freeze_and_unfreeze_convert_every_place_of_a_shared_module():
    model = randomize(Shared()).to(F64)
    nkt.freeze(model)
    frozen = model.bn
    assert isinstance(frozen, nkt.FrozenBatchNorm2d)
    assert model.alias is frozen and model.block[0] is frozen  # every occurrence, one module
    assert [n for n, _ in model.named_modules()] == ["", "bn", "block"]
    nkt.unfreeze(model)
    assert type(model.bn) is nkt.BatchNorm2d and model.alias is model.bn and model.block[0] is model.bn


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nkt.BatchNorm2d, nn.SyncBatchNorm, nkt.BatchRenorm2d])
def test_freeze_keeps_a_non_default_eps_and_unfreeze_too(cls):
    bn = randomize(nn.Sequential(cls(3, eps=0.25)))[0].to(F64).eval()
    x = randn(4, 3) if cls is nn.BatchNorm1d else randn(2, 3, 3, 3)
    expected = bn(x)
    frozen = nkt.freeze(nn.Sequential(bn))[0]
    assert frozen.eps == 0.25
    torch.testing.assert_close(frozen(x), expected, rtol=1e-13, atol=1e-13)  # eps 1e-5 would differ by ~0.1
    back = nkt.unfreeze(nn.Sequential(frozen))[0].eval()
    assert back.eps == 0.25
    torch.testing.assert_close(back(x), expected, rtol=1e-13, atol=1e-13)


def test_freeze_and_frozen_refuse_wrong_types_by_name():
    with pytest.raises(TypeError, match="freeze: model must be a torch.nn.Module, got dict"):
        nkt.freeze({})
    with pytest.raises(TypeError, match="unfreeze: model must be a torch.nn.Module, got list"):
        nkt.unfreeze([])
    with pytest.raises(ValueError, match="eps must be a non-negative number, got '1e-5'"):
        nkt.FrozenBatchNorm2d(3, eps="1e-5")
    with pytest.raises(ValueError, match="eps must be a non-negative number, got nan"):
        nkt.FrozenBatchNorm2d(3, eps=float("nan"))


# --------------------------------------------------------------------------------------------------- fold


def test_fold_refuses_linear_and_batchnorm1d_on_3d_input():
    """Linear maps the last axis of (N, C, L), BatchNorm1d normalizes axis 1: folding them is wrong."""
    model = randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).to(F64).eval()
    x3 = randn(5, 4, 4)
    expected = model(x3)
    wrong = torch.nn.utils.fusion.fuse_linear_bn_eval(model[0], model[1])  # what a blind fold computes
    assert rel_err(wrong(x3), expected) > 1e-2
    folded, unfolded = unfolded_of(model, example_inputs=x3)
    assert "Linear (0) acts on the last axis of its 3-D input, BatchNorm1d on axis 1: different axes" in unfolded["1"]
    torch.testing.assert_close(folded(x3), expected, rtol=0, atol=0)
    folded, unfolded = unfolded_of(model)  # no example: fold cannot know, so it does not fold
    assert "cannot tell whether Linear (0)'s input is 2-D" in unfolded["1"] and "example_inputs=" in unfolded["1"]
    x2 = randn(6, 4)
    folded = fold_quietly(model, example_inputs=x2)
    assert isinstance(folded[1], nn.Identity) and rel_err(folded(x2), model(x2)) < 1e-10


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, nkt.FrozenBatchNorm2d, nkt.BatchRenorm3d])
def test_fold_refuses_linear_before_a_2d_or_3d_batch_norm(bn):
    model = randomize(nn.Sequential(nn.Linear(4, 4), bn(4))).to(F64).eval()
    _, unfolded = unfolded_of(model)
    assert "acts on the last axis" in unfolded["1"] and "different axes" in unfolded["1"]


class FlatHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lin, self.bn = nn.Conv2d(2, 3, 3), nn.Linear(12, 5), nkt.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.lin(torch.flatten(F.relu(self.conv(x)), 1)))


def test_fold_knows_2d_after_flatten_without_example():
    seq = randomize(nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(),
                                  nn.Linear(6, 3), nkt.BatchNorm1d(3))).to(F64).eval()
    x = randn(4, 3, 2, 2)
    folded = fold_quietly(seq)
    assert isinstance(folded[2], nn.Identity) and isinstance(folded[6], nn.Identity)
    assert rel_err(folded(x), seq(x)) < 1e-10
    traced = randomize(FlatHead()).to(F64).eval()  # torch.fx: torch.flatten(x, 1) before the Linear
    x = randn(4, 2, 4, 4)
    folded = fold_quietly(traced)
    assert isinstance(folded.bn, nn.Identity) and rel_err(folded(x), traced(x)) < 1e-10


@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_fold_conv_transpose_along_its_own_channel_axis(dims, groups):
    """ConvTranspose's weight is (in, out/groups, *k): the output channel is axis 1 within each group."""
    conv = getattr(nn, f"ConvTranspose{dims}d")(4, 6, 3, stride=2, groups=groups, bias=groups == 1)
    bn = getattr(nn, f"BatchNorm{dims}d")(6)
    model = randomize(nn.Sequential(conv, bn)).to(F64).eval()
    x = randn(2, 4, *(3,) * dims)
    expected = model(x)
    folded = fold_quietly(model)
    assert isinstance(folded[1], nn.Identity) and type(folded[0]) is type(conv)
    assert rel_err(folded(x), expected) < 1e-10
    if groups == 1:  # and torch's own fuser for transposed convolutions agrees
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1], transpose=True)
        torch.testing.assert_close(folded[0].weight, fused.weight, rtol=1e-14, atol=0)


def test_fold_refuses_a_conv_on_unbatched_input_when_it_can_see_it():
    """Conv1d on unbatched (C, L) gives (C_out, L): a batch norm then normalizes L, not the channels."""
    model = randomize(nn.Sequential(nn.Conv1d(3, 5, 1), nkt.BatchNorm(5))).to(F64).eval()
    x = randn(3, 5)
    expected = model(x)
    folded, unfolded = unfolded_of(model, example_inputs=x)
    assert "unbatched input" in unfolded["1"]
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)


def test_fold_example_pass_changes_nothing_and_bad_arguments_are_named():
    model = randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))).to(F64)
    model.train()
    model[1].eval()  # one foldable; one in training mode, whose statistics the example pass must not update
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, unfolded = unfolded_of(model, inplace=True, example_inputs=randn(3, 4))
    assert isinstance(folded[1], nn.Identity) and "training mode" in unfolded["3"]
    assert torch.equal(folded[3].running_mean, before["3.running_mean"]) and int(folded[3].num_batches_tracked) == 0
    assert folded.training and folded[3].training  # modes restored
    with pytest.raises(ValueError, match="fold_batch_norm: the model failed on example_inputs"):
        nkt.fold_batch_norm(model, example_inputs=randn(3, 7))
    with pytest.raises(TypeError, match="inplace must be a bool, got 'yes'"):
        nkt.fold_batch_norm(model, inplace="yes")


# -------------------------------------------------------------------------------------------- recalibrate


class Twice(nn.Module):
    """One batch norm applied twice in one forward pass, around a linear map."""

    def __init__(self):
        super().__init__()
        self.bn, self.lin = nkt.BatchNorm1d(3), nn.Linear(3, 3)

    def forward(self, x):
        return self.bn(self.lin(self.bn(x)) * 3.0 + 2.0)


def call_inputs(model, bn, xs):
    seen = []
    h = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x in xs:
            model.eval()(x)
    h.remove()
    return seen


def test_recalibrate_merges_every_call_of_a_batch_norm_called_twice(policy):
    torch.manual_seed(0)
    model = randomize(Twice()).to(F64)
    xs = [randn(n, 3, seed=i, scale=2.0, offset=-1.0) for i, n in enumerate((4, 7, 5))]
    seen = torch.cat(call_inputs(model, model.bn, xs)).numpy()  # both calls, statistics as before
    nkt.recalibrate(model, xs)
    np.testing.assert_allclose(model.bn.running_mean.numpy(), seen.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.bn.running_var.numpy(), seen.var(0, ddof=1), rtol=1e-12)


def test_recalibrate_resets_num_batches_tracked(policy):
    model = nn.Sequential(nn.Linear(3, 3), nkt.BatchNorm1d(3), nn.BatchNorm1d(3)).to(F64)
    model[1].num_batches_tracked.fill_(7)
    model[2].num_batches_tracked.fill_(100)
    nkt.recalibrate(model, [randn(4, 3, seed=i) for i in range(3)])
    assert int(model[1].num_batches_tracked) == 3 and int(model[2].num_batches_tracked) == 3


def test_recalibrate_float32_model_merges_in_float64(policy):
    """200 float32 batches at mean 1e4: a float32 merge drifts by many ulps; float64 gives the rounding."""
    model = nn.Sequential(nkt.BatchNorm1d(2))
    xs = [randn(3, 2, seed=i, scale=0.5, offset=1e4, dtype=torch.float32) for i in range(200)]
    nkt.recalibrate(model, xs)
    a = torch.cat(xs).double().numpy()
    mean, var = a.mean(0), a.var(0, ddof=1)
    assert model[0].running_mean.dtype == torch.float32
    assert np.all(np.abs(model[0].running_mean.double().numpy() - mean) <= np.spacing(np.float32(1e4)))
    np.testing.assert_allclose(model[0].running_var.double().numpy(), var, rtol=1e-6)


def test_recalibrate_refusals_change_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3)).to(F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan = randn(4, 3, seed=1)
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the inputs of 0 hold NaN or inf in feature\(s\) \[1\]"):
        nkt.recalibrate(model, [randn(4, 3), nan])
    with pytest.raises(ValueError, match="got no batch.*empty DataLoader"):
        nkt.recalibrate(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3))))
    with pytest.raises(TypeError, match="batches must be an iterable of model inputs.*got int"):
        nkt.recalibrate(model, 3)
    with pytest.raises(TypeError, match="progress must be True, False or None, got 'yes'"):
        nkt.recalibrate(model, [randn(4, 3)], progress="yes")
    with pytest.raises(RuntimeError):  # a batch the model cannot take: torch's error, nothing changed
        nkt.recalibrate(model, [randn(4, 3), randn(4, 3, 2)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


# ---------------------------------------------------------------------------------------------- renorm


def test_batch_renorm_refuses_clipping_that_excludes_r1_d0_or_is_not_a_number():
    for kwargs, match in [(dict(rmax=0.9), "rmax must be None .* >= 1 .*got 0.9"),
                          (dict(rmin=1.5), r"rmin must be None .* in \[0, 1\].*got 1.5"),
                          (dict(rmin=-0.1), r"rmin .*got -0.1"), (dict(rmax=float("nan")), "rmax .*got nan"),
                          (dict(dmax=float("nan")), "dmax .*got nan"), (dict(dmax="1"), "dmax .*got '1'"),
                          (dict(rmax=torch.tensor(2.0)), r"rmax .*got tensor\(2.\)"), (dict(rmax=True), "rmax .*got True"),
                          (dict(renorm_momentum=True), "renorm_momentum must be a number in"),
                          (dict(warmup_steps=2.0), "warmup_steps must be a non-negative int, got 2.0")]:
        with pytest.raises(ValueError, match=match):
            nkt.BatchRenorm2d(3, **kwargs)
    m = nkt.BatchRenorm1d(2, rmax=float("inf"), rmin=0.0, dmax=0.0)  # the edges themselves are valid
    m(randn(4, 2))
    assert bool(torch.isfinite(m.running_std).all())


def test_batch_renorm_keeps_torch_checks_messages_and_empty_batch(policy):
    m, ref = nkt.BatchRenorm1d(3), nn.BatchNorm1d(3)
    for x in (torch.zeros(1, 3), torch.zeros(1, 3, 1)):
        with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
            ref(x)
        with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
            m(x)
    with pytest.raises(RuntimeError, match="running_mean should contain 2 elements not 3"):
        ref(torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="running_mean should contain 2 elements not 3"):
        m(torch.zeros(4, 2))
    m, ref = nkt.BatchRenorm1d(3), nn.BatchNorm1d(3)
    x = torch.zeros(0, 3, requires_grad=True)
    y, y_ref = m(x), ref(x)  # torch.nn: an empty batch gives an empty output, statistics kept
    assert y.shape == y_ref.shape == (0, 3) and y.requires_grad
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert torch.equal(m.running_mean, ref.running_mean) and torch.equal(m.running_std, torch.ones(3))


# ---------------------------------------------------------------------------------------------- scalers


def test_scalers_all_nan_feature_give_nan_like_scikit_learn():
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x = randn(8, 3).numpy()
    x[:, 1] = np.nan
    x[3, 2] = np.nan
    new = randn(4, 3, seed=1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sk_std, sk_mm = StandardScaler().fit(x).transform(new), MinMaxScaler().fit(x).transform(new)
    for cls, expected in ((nkt.Standardize, sk_std), (nkt.MinMaxScale, sk_mm)):
        with pytest.warns(RuntimeWarning, match=r"feature\(s\) \[1\] hold no value \(all NaN\)"):
            scaler = cls(3, dtype=F64).fit(torch.from_numpy(x))
        got = scaler(torch.from_numpy(new)).numpy()
        assert np.isnan(got[:, 1]).all()  # never passed through unscaled
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        with pytest.warns(RuntimeWarning, match="all NaN"):  # a DataLoader's batches: the same
            again = cls(3, dtype=F64).fit(torch.from_numpy(x).split(3))
        torch.testing.assert_close(again(torch.from_numpy(new)), torch.from_numpy(got), equal_nan=True)


def test_scalers_float32_batches_merge_in_float64():
    """300 float32 batches at offset 1e4: each batch widened before the merge, so the fit is the rounding."""
    xs = [randn(2, 2, seed=i, scale=0.01, offset=1e4, dtype=torch.float32) for i in range(300)]
    scaler = nkt.Standardize(2).fit(xs)
    a = torch.cat(xs).double()
    torch.testing.assert_close(scaler.mean, a.mean(0).float(), rtol=0, atol=float(np.spacing(np.float32(1e4))))
    torch.testing.assert_close(scaler.std.double(), a.std(0, unbiased=False), rtol=1e-5, atol=0)


def test_scalers_refuse_hostile_input_by_name():
    x = randn(6, 3)
    inf = x.clone()
    inf[1, 2] = float("inf")
    for cls in (nkt.Standardize, nkt.MinMaxScale):
        with pytest.raises(ValueError, match=r"feature\(s\) \[2\] of data hold inf"):
            cls(3, dtype=F64).fit(inf)
        with pytest.raises(TypeError, match=f"{cls.__name__}.fit: data must be a tensor.*got NoneType"):
            cls(3).fit(None)
        with pytest.raises(TypeError, match="batch 0 of data is a list whose first element is a float"):
            cls(3).fit([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        with pytest.raises(ValueError, match="data yielded no batch"):
            cls(3).fit([])
        with pytest.raises(TypeError, match=f"{cls.__name__} expects input to be a torch.Tensor, got ndarray"):
            cls(3).fit(x)(x.numpy())
    with pytest.raises(ValueError, match=r"fitted mean \(1(\.\d+)?e\+05\) overflows the buffers' dtype torch.float16"):
        nkt.Standardize(3, dtype=torch.float16).fit(randn(6, 3, offset=1e5))
    for bad in ("ab", (0, 1, 2), (0, float("nan")), (0, float("inf")), (1, 0)):
        with pytest.raises(ValueError, match=r"feature_range must be \(min, max\), two finite numbers"):
            nkt.MinMaxScale(3, feature_range=bad)


def test_dask_unknown_chunks_fit_or_refuse_by_name():
    import dask
    import dask.array as da

    x = randn(40, 3).numpy()
    d = da.from_array(x, chunks=(10, 3))
    unknown = d[d[:, 0] > -100]  # every row kept, but dask does not know the chunk sizes
    assert any(np.isnan(c) for c in unknown.chunks[0])
    with dask.config.set(scheduler="synchronous"):
        scaler = nkt.Standardize(3, dtype=F64).fit(unknown)
    np.testing.assert_allclose(scaler.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scaler.std.numpy(), x.std(0), rtol=1e-12)
