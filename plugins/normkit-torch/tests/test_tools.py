"""The batch-norm tools: fold_batch_norm, FrozenBatchNorm* / freeze / unfreeze, BatchRenorm*, recalibrate.

Tolerances. float64: a folded conv output differs from conv-then-BN by a few roundings of sums of
at most 3*3*3*8 = 216 products, relative to the sum of their magnitudes: < 1e-13; the spec's 1e-10
relative leaves a 1000x margin. float32 folding: each weight is rounded once more (w * scale),
so the output may move by ~k * eps32 * sum|w' x| per element; the bound used is
8 * eps32 * (|w'| conv |x| + |b'|), computed in float64. Recalibrated statistics: Chan's merge and
two-pass moments in float64 over at most a few thousand values: rtol 1e-12.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit_torch as nkt
from normkit.testing import reference
from normkit_torch import UnfoldedBatchNormWarning

F64 = torch.float64
EPS32 = float(np.finfo(np.float32).eps)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine in every batch norm of ``model`` (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if nkt._frozen.is_batch_norm(m) and m.running_var is not None:
                for name in ("running_mean", "weight", "bias"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype))
                m.running_var.copy_((0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=F64)).to(m.running_var.dtype))
                if hasattr(m, "running_std"):
                    m.running_std.copy_(torch.sqrt(m.running_var + m.eps))
    return model


def randn(*shape, seed=0, dtype=F64, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=F64) * scale + offset).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def fold_quietly(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfoldedBatchNormWarning)  # every batch norm here must fold
        return nkt.fold_batch_norm(model, **kwargs)


def unfolded_of(model: nn.Module, **kwargs) -> tuple[nn.Module, dict[str, str]]:
    with pytest.warns(UnfoldedBatchNormWarning) as record:
        out = nkt.fold_batch_norm(model, **kwargs)
    (w,) = [r.message for r in record if isinstance(r.message, UnfoldedBatchNormWarning)]
    return out, dict(w.unfolded)


def numpy_fold(w: np.ndarray, b, rm, rv, gamma, beta, eps):
    """The float64 NumPy reference of the folded weights: w * g / sqrt(rv + eps), (b - rm) * scale + beta."""
    scale = gamma / np.sqrt(rv + eps)
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), (b - rm) * scale + beta


# ----------------------------------------------------------------------------------------------------- fold

BN2D_KINDS = {
    "torch": lambda c: nn.BatchNorm2d(c),
    "normkit": lambda c: nkt.BatchNorm2d(c),
    "sync": lambda c: nn.SyncBatchNorm(c),
    "frozen": lambda c: nkt.FrozenBatchNorm2d(c),
    "renorm": lambda c: nkt.BatchRenorm2d(c, rmax=2.0, rmin=0.5, dmax=1.0),
    "no-affine": lambda c: nn.BatchNorm2d(c, affine=False),
    "no-bias": lambda c: nkt.BatchNorm2d(c, bias=False, eps=1e-3),
}

CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "no-bias-pad-stride": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, stride=2, bias=False),
    "groups-dilation": dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, dilation=2, padding=1),
    "depthwise-reflect": dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1, padding_mode="reflect"),
}


# every batch-norm kind once, every conv configuration at least once (cycled)
KIND_CONV = [(kind, sorted(CONVS)[i % len(CONVS)]) for i, kind in enumerate(sorted(BN2D_KINDS))]


@pytest.mark.parametrize("kind,conv", KIND_CONV)
def test_fold_conv2d_every_kind_float64(kind, conv):
    """Conv2d -> batch norm folds for every batch-norm class and conv configuration: the BN becomes
    Identity, the conv gains the bias, the output matches to 1e-10 and the weights match NumPy's formula."""
    c = nn.Conv2d(**CONVS[conv]).to(F64)
    bn = BN2D_KINDS[kind](c.out_channels).to(F64)
    model = randomize_bn(nn.Sequential(c, bn, nn.ReLU())).eval()
    x = randn(3, 4, 9, 9)
    expected = model(x)
    folded = fold_quietly(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[0], nn.Conv2d)
    assert rel_err(folded(x), expected) < 1e-10
    # the original is untouched (inplace=False)
    assert model[1] is bn and torch.equal(model(x), expected)
    gamma = bn.weight.detach().numpy() if bn.weight is not None else np.ones(c.out_channels)
    beta = bn.bias.detach().numpy() if bn.bias is not None else np.zeros(c.out_channels)
    b0 = c.bias.detach().numpy() if c.bias is not None else np.zeros(c.out_channels)
    w_ref, b_ref = numpy_fold(c.weight.detach().numpy(), b0, bn.running_mean.numpy(), bn.running_var.numpy(),
                              gamma, beta, bn.eps)
    np.testing.assert_allclose(folded[0].weight.detach().numpy(), w_ref, rtol=1e-14, atol=0)
    np.testing.assert_allclose(folded[0].bias.detach().numpy(), b_ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dims", [1, 3])
def test_fold_conv1d_conv3d_and_linear(dims):
    conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(3, 5, 3, padding=1, bias=False)
    bn = (nkt.BatchNorm1d if dims == 1 else nn.BatchNorm3d)(5)
    model = randomize_bn(nn.Sequential(conv, bn, nn.Flatten(), nn.Linear(5 * 4 ** dims, 6), nkt.BatchNorm1d(6))).to(F64).eval()
    x = randn(2, 3, *(4,) * dims)
    expected = model(x)
    folded = fold_quietly(model)
    assert [type(m) for m in folded] == [type(conv), nn.Identity, nn.Flatten, nn.Linear, nn.Identity]
    assert rel_err(folded(x), expected) < 1e-10


def test_fold_equals_torch_fuser():
    """Independent check: the same weights as torch.nn.utils.fusion.fuse_conv_bn_eval (torch's own fuser)."""
    conv = nn.Conv2d(3, 4, 3, groups=1).to(F64)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4).to(F64)))[0].eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn)
    ours = fold_quietly(nn.Sequential(conv, bn))[0]
    torch.testing.assert_close(ours.weight, fused.weight, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours.bias, fused.bias, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_float32_within_roundoff(seed):
    """The folded float32 conv is off the exact (float64, unfolded) answer by no more than float32 round-off: the
    folded weight and bias are rounded once from float64 (u = eps/2 each) and each output sums K = 8*3*3 products
    and the bias (Higham's bound gamma_{K+1} = (K+1)u/(1-(K+1)u)), all relative to sum |x||w| + |b|."""
    torch.manual_seed(seed)  # the conv's initial weights: the same whatever ran before on this worker
    conv = nn.Conv2d(8, 16, 3, padding=1)
    model = randomize_bn(nn.Sequential(conv, nkt.BatchNorm2d(16)), seed=seed).eval()
    x = randn(4, 8, 12, 12, seed=seed, dtype=torch.float32)
    with torch.no_grad():
        expected64 = model.to(F64)(x.double())  # the exact answer
        folded = fold_quietly(model.float())
        assert folded[0].weight.dtype == torch.float32 and folded[0].bias.dtype == torch.float32
        w, b = folded[0].weight.double(), folded[0].bias.double()
        u, k = EPS32 / 2, 8 * 3 * 3
        gamma = (k + 1) * u / (1 - (k + 1) * u)
        bound = (gamma + u) * (F.conv2d(x.double().abs(), w.abs(), padding=1) + b.abs().reshape(1, -1, 1, 1))
        ratio = (folded(x).double() - expected64).abs() / bound
    assert float(ratio.max()) <= 1.0
    assert float(ratio.median()) < 0.1  # typical outputs far inside the bound (0.009 here): no precision lost


class Branchy(nn.Module):
    """Folding through torch.fx: a residual block, a conv feeding two consumers, a BN after ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nkt.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn4 = nkt.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3), nkt.BatchNorm1d(3))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = h + self.bn2(self.conv2(h))  # residual: folds
        c = self.conv3(h)
        h = self.bn3(c) + c  # conv3's output has two users: stays
        h = self.bn4(F.relu(h))  # no conv before it: stays
        return self.head(h)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: fx fails here, its children are traced instead."""

    def __init__(self):
        super().__init__()
        self.block = Branchy()

    def forward(self, x):
        if float(x.sum()) > 1e9:  # a Proxy cannot be converted to float
            return x
        return self.block(x)


@pytest.mark.parametrize("wrap", [False, True], ids=["traceable", "untraceable-root"])
def test_fold_general_model_via_fx(wrap):
    model = randomize_bn(Untraceable() if wrap else Branchy()).to(F64).eval()
    x = randn(2, 3, 5, 5)
    expected = model(x)
    folded, unfolded = unfolded_of(model)
    root = folded.block if wrap else folded
    assert isinstance(root.bn1, nn.Identity) and isinstance(root.bn2, nn.Identity)
    assert isinstance(root.head[2], nn.Identity)
    assert isinstance(root.bn3, nn.BatchNorm2d) and isinstance(root.bn4, nkt.BatchNorm2d)
    p = "block." if wrap else ""
    assert set(unfolded) == {p + "bn3", p + "bn4"}
    if wrap:
        assert "torch.fx could not trace the model" in unfolded["block.bn4"]
    assert rel_err(folded(x), expected) < 1e-10


def test_fold_reports_training_mode_shared_and_untracked():
    shared = nn.Conv2d(3, 3, 1)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),  # training mode: stays
        shared, nn.BatchNorm2d(3), shared,  # shared conv: stays
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False),  # batch statistics: stays
    ).to(F64))
    model[3].eval()
    model[6].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, unfolded = unfolded_of(model)
    assert "training mode" in unfolded["1"]
    assert "shared" in unfolded["3"]
    assert "track_running_stats=False" in unfolded["6"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())


def test_fold_inplace_returns_the_same_model():
    model = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).to(F64).eval()
    x = randn(5, 4)
    expected = model(x)
    out = fold_quietly(model, inplace=True, example_inputs=x)  # 2-D input: the Linear's axis is the features
    assert out is model and isinstance(model[1], nn.Identity)
    assert rel_err(model(x), expected) < 1e-10


def test_fold_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nkt.fold_batch_norm(lambda x: x)


# --------------------------------------------------------------------------------------------------- frozen

FROZEN = [(nkt.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 3)), (nkt.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
          (nkt.FrozenBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)), (nkt.FrozenBatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 3, 5))]


@pytest.mark.parametrize("frozen_cls,bn_cls,shape", FROZEN, ids=lambda v: getattr(v, "__name__", str(v)))
def test_frozen_loads_batchnorm_state_and_matches_reference(frozen_cls, bn_cls, shape):
    bn = randomize_bn(nn.Sequential(bn_cls(3, dtype=F64)))[0].eval()
    bn.num_batches_tracked.fill_(7)
    frozen = frozen_cls(3, dtype=F64)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked accepted and dropped
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert list(frozen.parameters()) == [] and frozen.eps == 1e-5
    x = randn(*shape)
    expected = reference.batch_norm(x.numpy(), bn.running_mean.numpy(), bn.running_var.numpy(),
                                    bn.weight.detach().numpy(), bn.bias.detach().numpy(), training=False, axis=1, eps=1e-5)
    expected = expected[0] if isinstance(expected, tuple) else expected
    np.testing.assert_allclose(frozen(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    frozen.train()  # no mode: the same output in training mode
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)
    # and back: a frozen state_dict loads into BatchNorm*d (num_batches_tracked defaults to 0)
    again = bn_cls(3, dtype=F64)
    again.load_state_dict(frozen.state_dict(), strict=True)
    assert int(again.num_batches_tracked) == 0
    torch.testing.assert_close(again.running_var, bn.running_var, rtol=0, atol=0)


def test_frozen_input_rank_errors():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        nkt.FrozenBatchNorm2d(3)(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        nkt.FrozenBatchNorm1d(3)(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="num_features"):
        nkt.FrozenBatchNorm2d(0)


def test_frozen_centred_first_is_exact_at_offset_1e4():
    """float32 data at mean 1e4, std 0.01: centring first keeps the output within a few float32 roundings
    of the float64 answer; torchvision's x * scale + (bias - mean * scale) misses that bound by far."""
    frozen = nkt.FrozenBatchNorm2d(4)
    with torch.no_grad():
        frozen.running_mean.fill_(1e4)
        frozen.running_var.fill_(1e-4)
        frozen.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        frozen.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = randn(8, 4, 6, 6, dtype=torch.float32, scale=0.01, offset=1e4)
    exact = nkt.FrozenBatchNorm2d(4).to(F64)
    exact.load_state_dict(frozen.state_dict())
    y64 = exact(x.double())
    bound = 4 * EPS32 * (y64.abs() + 1.0)  # x - mean is exact (Sterbenz); then one multiply and one add
    assert bool(((frozen(x).double() - y64).abs() <= bound).all())
    scale = frozen.weight * torch.rsqrt(frozen.running_var + frozen.eps)
    naive = x * scale.reshape(1, -1, 1, 1) + (frozen.bias - frozen.running_mean * scale).reshape(1, -1, 1, 1)
    assert not bool(((naive.double() - y64).abs() <= bound).all())


def test_frozen_gradient_reaches_input_only():
    frozen = randomize_bn(nn.Sequential(nkt.FrozenBatchNorm2d(3, dtype=F64)))[0]
    x = randn(2, 3, 4, 4).requires_grad_()
    frozen(x).sum().backward()
    scale = frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)
    torch.testing.assert_close(x.grad, scale.reshape(1, -1, 1, 1).expand_as(x), rtol=1e-14, atol=0)
    assert all(b.grad is None for b in frozen.buffers())


class ManyNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = nkt.BatchNorm2d(3, affine=False)
        self.c = nn.BatchNorm3d(3, bias=False)
        self.d = nn.SyncBatchNorm(3)
        self.e = nkt.BatchRenorm2d(3)
        self.shared = nn.Sequential(nn.BatchNorm2d(3))
        self.again = self.shared  # the same module at two places
        self.other = nn.LayerNorm(3)


def test_freeze_replaces_every_batch_norm_with_values_kept():
    model = randomize_bn(ManyNorms()).to(F64)
    model.train()
    x2, x4, x5 = randn(4, 3), randn(2, 3, 4, 4), randn(2, 3, 2, 3, 4)
    ref = {k: getattr(model, k).eval() for k in ("a", "b", "c", "d", "e", "shared")}
    expected = {"a": ref["a"](x2), "b": ref["b"](x4), "c": ref["c"](x5), "d": ref["d"](x4), "e": ref["e"](x4),
                "shared": model.shared(x4)}
    frozen = nkt.freeze(model)
    assert frozen is model
    kinds = {k: type(getattr(model, k)) for k in "abcde"}
    assert kinds == {"a": nkt.FrozenBatchNorm1d, "b": nkt.FrozenBatchNorm2d, "c": nkt.FrozenBatchNorm3d,
                     "d": nkt.FrozenBatchNorm, "e": nkt.FrozenBatchNorm2d}
    assert isinstance(model.shared[0], nkt.FrozenBatchNorm2d) and model.again[0] is model.shared[0]
    assert isinstance(model.other, nn.LayerNorm)
    model.train()
    for k, x in {"a": x2, "b": x4, "c": x5, "d": x4, "e": x4}.items():
        torch.testing.assert_close(getattr(model, k)(x), expected[k], rtol=1e-12, atol=1e-12)
        assert getattr(model, k).running_mean.dtype == F64
    torch.testing.assert_close(model.shared(x4), expected["shared"], rtol=1e-12, atol=1e-12)
    assert [n for n, _ in model.named_parameters()] == ["other.weight", "other.bias"]


def test_freeze_root_and_errors():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(3)))[0]
    frozen = nkt.freeze(bn)
    assert isinstance(frozen, nkt.FrozenBatchNorm2d)
    torch.testing.assert_close(frozen.running_mean, bn.running_mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"norm.*track_running_stats=False"):
        nkt.freeze(nn.ModuleDict({"norm": nn.BatchNorm2d(3, track_running_stats=False)}))
    with pytest.raises(ValueError, match="lazy"):
        nkt.freeze(nn.Sequential(nn.LazyBatchNorm2d()))


def test_unfreeze_gives_trainable_normkit_batch_norm():
    model = nkt.freeze(randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.SyncBatchNorm(3))).to(F64))
    x = randn(2, 3, 4, 4)
    model.eval()
    expected = model(x)
    out = nkt.unfreeze(model)
    assert out is model and type(model[1]) is nkt.BatchNorm2d and type(model[2]) is nkt.BatchNorm
    assert all(p.requires_grad for p in model[1].parameters()) and model[1].momentum == 0.1
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    model.train()
    model(x).sum().backward()
    assert model[1].weight.grad is not None and int(model[1].num_batches_tracked) == 1


# -------------------------------------------------------------------------------------------------- renorm


def numpy_renorm_step(x, state, *, eps, momentum, renorm_momentum, rmin=None, rmax=None, dmax=None, gamma, beta):
    """Batch renormalization, one training step, in float64 NumPy (channels on axis 1); updates ``state``."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = -1
    mean, var = x.mean(axes), x.var(axes)
    std = np.sqrt(var + eps)
    s = np.maximum(state["renorm_std"], np.sqrt(eps))
    r, d = std / s, (mean - state["renorm_mean"]) / s
    r = np.clip(r, -np.inf if rmin is None else rmin, np.inf if rmax is None else rmax)
    d = d if dmax is None else np.clip(d, -dmax, dmax)
    y = (x - mean.reshape(shape)) / std.reshape(shape) * (r * gamma).reshape(shape) + (d * gamma + beta).reshape(shape)
    state["renorm_mean"] = state["renorm_mean"] * (1 - renorm_momentum) + mean * renorm_momentum
    state["renorm_std"] = state["renorm_std"] * (1 - renorm_momentum) + std * renorm_momentum
    state["running_mean"] = state["running_mean"] * (1 - momentum) + mean * momentum
    state["running_std"] = state["running_std"] * (1 - momentum) + std * momentum
    state["running_var"] = np.maximum(state["running_std"] ** 2 - eps, 0)
    return y, r, d


def test_batch_renorm_matches_numpy_reference_over_steps():
    kw = dict(eps=1e-3, momentum=0.2, renorm_momentum=0.3, rmin=0.8, rmax=1.25, dmax=0.5)
    m = nkt.BatchRenorm2d(3, dtype=F64, **kw)
    gamma, beta = np.array([1.0, -0.5, 2.0]), np.array([0.1, 0.2, -0.3])
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    state = {k: getattr(m, k).numpy().copy() for k in ("renorm_mean", "renorm_std", "running_mean", "running_std", "running_var")}
    clipped_r = clipped_d = False
    for step in range(4):
        x = randn(5, 3, 4, 4, seed=step, scale=1 + step, offset=2.0 * step)
        y_ref, r, d = numpy_renorm_step(x.numpy(), state, gamma=gamma, beta=beta, **kw)
        clipped_r |= bool(np.any(np.isin(r, [0.8, 1.25])))
        clipped_d |= bool(np.any(np.abs(d) == 0.5))
        np.testing.assert_allclose(m(x).detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
        for k, v in state.items():
            np.testing.assert_allclose(getattr(m, k).numpy(), v, rtol=1e-12, atol=1e-14, err_msg=k)
    assert clipped_r and clipped_d  # the data exercises both clippings
    assert int(m.num_batches_tracked) == 4
    m.eval()
    x = randn(2, 3, 4, 4, seed=9)
    y = (x.numpy() - state["running_mean"].reshape(1, -1, 1, 1)) / np.sqrt(state["running_var"] + 1e-3).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(m(x).detach().numpy(), y * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1), rtol=1e-12, atol=1e-12)


def test_batch_renorm_at_r1_d0_is_batch_norm_and_warmup_starts_there():
    """Clipped to r = 1, d = 0 (or at the first warm-up step) the output and gradients are batch norm's."""
    x = randn(6, 3, 4, 4, scale=3.0, offset=1.0)
    up = randn(6, 3, 4, 4, seed=1)
    bn = nn.BatchNorm2d(3, dtype=F64)
    for m in (nkt.BatchRenorm2d(3, dtype=F64, rmin=1.0, rmax=1.0, dmax=0.0),
              nkt.BatchRenorm2d(3, dtype=F64, rmin=0.2, rmax=5.0, dmax=5.0, warmup_steps=4)):
        with torch.no_grad():
            m.renorm_mean.fill_(3.0)  # far from the batch: unclipped, r and d would not be 1 and 0
            m.renorm_std.fill_(0.1)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (m(xa) * up).sum().backward()
        (bn(xb) * up).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.weight.grad, bn.weight.grad, rtol=1e-12, atol=1e-12)
        bn.zero_grad()


def test_batch_renorm_warmup_bounds():
    m = nkt.BatchRenorm1d(2, rmin=0.5, rmax=3.0, dmax=4.0, warmup_steps=10)
    like = torch.zeros(2)
    for done, expected in [(0, (1.0, 1.0, 0.0)), (5, (0.75, 2.0, 2.0)), (10, (0.5, 3.0, 4.0)), (25, (0.5, 3.0, 4.0))]:
        got = m._bounds(torch.tensor(done), like)
        assert [float(v) for v in got] == pytest.approx(expected)


def test_batch_renorm_cumulative_momentum_and_checkpoint_of_batch_norm():
    m = nkt.BatchRenorm1d(2, momentum=None, dtype=F64)
    xs = [randn(4, 2, seed=i, offset=i) for i in range(3)]
    for x in xs:
        m(x)
    stds = [np.sqrt(x.numpy().var(0) + m.eps) for x in xs]
    np.testing.assert_allclose(m.running_std.numpy(), np.mean(stds, 0), rtol=1e-13)
    np.testing.assert_allclose(m.running_mean.numpy(), np.mean([x.numpy().mean(0) for x in xs], 0), rtol=1e-13)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm1d(2, dtype=F64)))[0]
    r = nkt.BatchRenorm1d(2, dtype=F64)
    r.load_state_dict(bn.state_dict(), strict=True)  # no renorm buffers in it: derived from running_var
    np.testing.assert_allclose(r.running_std.numpy(), np.sqrt(bn.running_var.numpy() + r.eps), rtol=1e-15)
    torch.testing.assert_close(r.renorm_mean, bn.running_mean, rtol=0, atol=0)
    assert isinstance(r, nn.modules.batchnorm._BatchNorm)


def test_batch_renorm_errors():
    with pytest.raises(ValueError, match=r"rmax must be None \(no clipping\) or a number >= 1 .*got 0.5"):
        nkt.BatchRenorm2d(3, rmax=0.5, rmin=2.0)
    with pytest.raises(ValueError, match=r"dmax must be None \(no clipping\) or a number >= 0 .*got -1.0"):
        nkt.BatchRenorm2d(3, dmax=-1.0)
    with pytest.raises(ValueError, match="give all three"):
        nkt.BatchRenorm2d(3, rmax=3.0, warmup_steps=5)
    with pytest.raises(ValueError, match="track_running_stats"):
        nkt.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        nkt.BatchRenorm2d(3)(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nkt.BatchRenorm1d(3)(torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------- recalibrate


class Net(nn.Module):
    """Every kind of batch norm, a dropout (off in eval), uneven use of the features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(4, 4, 3), nkt.BatchNorm2d(4, momentum=None), nn.ReLU(),
            nn.Conv2d(4, 3, 1), nkt.BatchRenorm2d(3), nn.Conv2d(3, 3, 1), nkt.FrozenBatchNorm2d(3),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 9, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.head(self.features(x))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net().to(F64), seed=3)


def bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each batch norm's input in one eval pass: the activations of the (recalibrated) model."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if nkt._frozen.is_batch_norm(m):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].numpy())))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def assert_population_stats(model: nn.Module, x: torch.Tensor) -> None:
    inputs = bn_inputs(model, x)
    mods = dict(model.named_modules())
    assert len(inputs) == 5
    for name, a in inputs.items():
        m = mods[name]
        axes = tuple(i for i in range(a.ndim) if i != 1)
        renorm = isinstance(m, nkt.BatchRenorm2d)
        var = a.var(axes, ddof=0 if renorm else 1)
        np.testing.assert_allclose(m.running_mean.numpy(), a.mean(axes), rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(m.running_var.numpy(), var, rtol=1e-12, err_msg=name)
        if renorm:
            np.testing.assert_allclose(m.running_std.numpy(), np.sqrt(var + m.eps), rtol=1e-12)


def test_recalibrate_gives_float64_numpy_population_statistics():
    model = make_net()
    model.train()
    model.head.eval()  # mixed modes, restored afterwards
    xs = [randn(n, 2, 7, 7, seed=i, scale=2.0, offset=1.0) for i, n in enumerate((5, 9, 2, 6))]
    batches = [(x, torch.zeros(len(x))) for x in xs]  # (x, y) like a DataLoader
    modes = {n: m.training for n, m in model.named_modules()}
    out = nkt.recalibrate(model, batches, num_batches=3, progress=False)
    assert out is model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.features[5].momentum is None and model.features[1].momentum == 0.1
    assert int(model.features[1].num_batches_tracked) == 3
    assert_population_stats(model, torch.cat(xs[:3]))


def test_recalibrate_one_pass_would_not_be_exact():
    """The reference can fail: statistics from one training-mode pass (swa_utils.update_bn's way) differ."""
    model = make_net()
    xs = [randn(n, 2, 7, 7, seed=i, scale=2.0, offset=1.0) for i, n in enumerate((5, 9, 2))]
    torch.optim.swa_utils.update_bn(xs, model)
    with pytest.raises(AssertionError):
        assert_population_stats(model, torch.cat(xs))


def test_recalibrate_generator_and_native_dataloader():
    model = make_net()
    data = torch.utils.data.TensorDataset(randn(23, 2, 7, 7, seed=5, scale=3.0))
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    nkt.recalibrate(model, loader)
    assert_population_stats(model, data.tensors[0])
    model = make_net()
    nkt.recalibrate(model, (x for x in data.tensors[0].split(4)), num_batches=2)
    assert_population_stats(model, data.tensors[0][:8])


def test_recalibrate_progress_and_errors(capsys):
    model = make_net()
    x = randn(4, 2, 7, 7)
    nkt.recalibrate(model, [x, x])
    assert capsys.readouterr().err == ""  # auto: no bar off a terminal
    nkt.recalibrate(model, [x, x], progress=True)
    assert "recalibrate" in capsys.readouterr().err
    with pytest.raises(TypeError, match="single Tensor"):
        nkt.recalibrate(model, x)
    with pytest.raises(ValueError, match="no batch"):
        nkt.recalibrate(model, [])
    with pytest.raises(ValueError, match="num_batches"):
        nkt.recalibrate(model, [x], num_batches=0)


def test_recalibrate_warns_about_a_batch_norm_never_called():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.used(x)

    model = Skips().to(F64)
    with pytest.warns(UserWarning, match="never calls unused"):
        nkt.recalibrate(model, [randn(3, 2, 4, 4)])
    assert torch.equal(model.unused.running_mean, torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------------------- recalibrate, 2 processes

WORKER = Path(__file__).with_name("recalibrate_worker.py")
DEADLINE_S = 120.0  # a bound, not a wait: the launcher returns as both ranks exit (20 s timed out when loaded)


@pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist
def test_recalibrate_across_two_gloo_processes(tmp_path):
    """Two ranks with uneven batches each end with the statistics of the union of their batches."""
    import recalibrate_worker as rw
    from normkit_torch.testing import run_gloo_workers

    states = run_gloo_workers(WORKER, tmp_path, deadline_s=DEADLINE_S)
    union = torch.cat(rw.rank_batches(0) + rw.rank_batches(1))
    single = nkt.recalibrate(rw.build_model(), [union])
    for r, state in enumerate(states):
        for k, v in single.state_dict().items():
            if "running" in k:
                torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-14, msg=f"rank {r} {k}")
    seen = bn_inputs(single, union)
    for name, a in seen.items():
        np.testing.assert_allclose(dict(single.named_modules())[name].running_var.numpy(),
                                   a.var((0, 2, 3), ddof=1), rtol=1e-12)
