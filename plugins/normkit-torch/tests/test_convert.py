"""convert / to_torch on whole models: outputs, parameters, buffers, devices, dtypes, flags and modes kept."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, assert_state_equal, data, randomize
from normkit_torch._convert import TO_NORMKIT, TO_TORCH


class SmallNet(nn.Sequential):
    """Conv-BN-ReLU x2, GroupNorm, InstanceNorm, then Linear-LayerNorm-RMSNorm-BN1d-Linear.

    The ModuleList is only a second path to the shared BatchNorm (same module reached twice).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            if not isinstance(m, nn.ModuleList):
                x = m(x)
        return x


def small_net() -> nn.Module:
    shared = nn.BatchNorm2d(8)
    return SmallNet(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        shared,
        nn.ReLU(),
        nn.GroupNorm(2, 8),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.ModuleList([shared]),
        nn.Flatten(),
        nn.Linear(8 * 5 * 6, 16),
        nn.LayerNorm(16, bias=False),
        nn.RMSNorm(16),
        nn.BatchNorm1d(16, momentum=None),
        nn.Linear(16, 4),
    )


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_convert_keeps_outputs_state_and_objects():
    torch.manual_seed(0)
    net = randomize(small_net().to(F64))
    net[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    net[1].weight.requires_grad_(False)
    twin = copy.deepcopy(net)
    params = {n: p for n, p in net.named_parameters()}
    buffers = {n: b for n, b in net.named_buffers()}

    out = nkt.convert(net)
    assert out is net  # in place, and returned
    assert type(net[1]) is nkt.BatchNorm2d and type(net[4]) is nkt.BatchNorm2d and net[8][0] is net[4]
    assert type(net[6]) is nkt.GroupNorm and type(net[7]) is nkt.InstanceNorm2d
    assert type(net[11]) is nkt.LayerNorm and type(net[12]) is nkt.RMSNorm and type(net[13]) is nkt.BatchNorm1d
    assert not any(t in TO_NORMKIT for t in _types(net))
    for n, p in net.named_parameters():  # the very same Parameter objects: optimizers keep working
        assert p is params[n] and p.requires_grad == twin.get_parameter(n).requires_grad
    for n, b in net.named_buffers():
        assert b is buffers[n]

    x = data((4, 3, 5, 6))
    for mode in ("train", "eval", "train"):
        getattr(net, mode)(), getattr(twin, mode)()
        torch.testing.assert_close(net(x), twin(x), rtol=1e-10, atol=1e-12)
        assert_state_equal(net, twin, rtol=1e-10, atol=1e-12)

    back = nkt.to_torch(net)
    assert back is net and [type(m) for m in net.modules()] == _types(twin)
    torch.testing.assert_close(net(x), twin(x), rtol=1e-10, atol=1e-12)
    assert_state_equal(net, twin, rtol=1e-10, atol=1e-12)


def test_convert_keeps_mode_dtype_and_device():
    net = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float16), nn.LayerNorm(4)).eval()
    nkt.convert(net)
    assert not net.training and not net[0].training
    assert net[0].weight.dtype == torch.float16 and net[0].running_mean.dtype == torch.float16
    assert net[0].weight.device.type == "cpu" and net[1].weight.device.type == "cpu"


def test_root_module_and_lazy_and_sync():
    bn = nn.BatchNorm3d(3, affine=False)
    converted = nkt.convert(bn)
    assert type(converted) is nkt.BatchNorm3d and converted.running_mean is bn.running_mean

    lazy = nkt.convert(nn.Sequential(nn.LazyBatchNorm2d(), nn.LazyInstanceNorm1d()))
    assert type(lazy[0]) is nkt.LazyBatchNorm2d and type(lazy[1]) is nkt.LazyInstanceNorm1d
    lazy[0](torch.randn(2, 5, 3, 3))
    assert type(lazy[0]) is nkt.BatchNorm2d and lazy[0].weight.shape == (5,)

    sync = nn.SyncBatchNorm(3, momentum=0.2, dtype=F64)
    randomize(sync)
    ours = nkt.convert(nn.Sequential(sync))[0]
    assert type(ours) is nkt.SyncBatchNorm and ours.momentum == 0.2  # synchronized, never a local BatchNorm
    x = data((2, 3, 4, 5))
    ref = nn.BatchNorm2d(3, momentum=0.2, dtype=F64)
    ref.load_state_dict(sync.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-12)
    assert_state_equal(ours, ref, rtol=1e-10, atol=1e-12)
    assert type(nkt.to_torch(nn.Sequential(ours))[0]) is nn.SyncBatchNorm


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d look-alike (timm is not installed here): channels-first input, forward overridden."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                        self.eps).permute(0, 3, 1, 2)


class TaggedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that only adds an attribute (and its repr): forward is torch.nn's."""

    def __init__(self, num_features: int, tag: str = "", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.tag = tag

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tag={self.tag!r}"


class TaggedLayerNorm(nn.LayerNorm):
    kind = "tagged"  # a class attribute only


def _timm_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1, dtype=F64), TaggedBatchNorm2d(4, tag="stem", dtype=F64),
                         LayerNorm2d(4, dtype=F64), nn.BatchNorm2d(4, dtype=F64), TaggedLayerNorm(6, dtype=F64))


def test_subclasses_are_reported_and_left_alone():
    """By default only exact torch.nn classes are swapped; each skipped subclass is named (path, class, reason)."""
    net = _timm_like()
    with pytest.warns(nkt.UnconvertedNormWarning) as caught:
        assert nkt.convert(net) is net
    message = str(caught[0].message)
    assert "1 (TaggedBatchNorm2d): subclass of torch.nn.BatchNorm2d: pass subclasses=True" in message
    assert "2 (LayerNorm2d): subclass of torch.nn.LayerNorm overriding forward" in message
    assert "4 (TaggedLayerNorm)" in message and "3 (" not in message
    assert [type(m) for m in net] == [nn.Conv2d, TaggedBatchNorm2d, LayerNorm2d, nkt.BatchNorm2d, TaggedLayerNorm]
    _, report = nkt.convert(net, report=True)  # nothing left to swap; still the same three reported, no warning
    assert report.converted == [] and [(p, c) for p, c, _ in report.skipped] == [
        ("1", "TaggedBatchNorm2d"), ("2", "LayerNorm2d"), ("4", "TaggedLayerNorm")]
    assert set(TO_TORCH) == set(TO_NORMKIT.values())


def test_subclasses_true_converts_subclasses_that_keep_torch_forward(policy):
    """subclasses=True: a subclass with torch.nn's forward computes with normkit (torch.nn's outputs and
    statistics), keeps its class (isinstance), attributes and other methods, pickles, deep-copies and scripts;
    one overriding forward stays as it is (reported); to_torch gives the subclass back."""
    torch.manual_seed(0)
    net = randomize(_timm_like())
    theirs = copy.deepcopy(net)
    out, report = nkt.convert(net, subclasses=True, report=True)
    assert out is net
    assert [p for p, _, _ in report.converted] == ["1", "3", "4"] and [p for p, _, _ in report.skipped] == ["2"]
    bn, ln = net[1], net[4]
    assert isinstance(bn, TaggedBatchNorm2d) and isinstance(bn, nkt.BatchNorm2d) and bn.tag == "stem"
    assert isinstance(ln, TaggedLayerNorm) and isinstance(ln, nkt.LayerNorm) and ln.kind == "tagged"
    assert "tag='stem'" in repr(bn) and type(bn).__name__ == "TaggedBatchNorm2d"
    assert type(net[2]) is LayerNorm2d
    x = data((4, 3, 5, 6))
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(net(x), theirs(x), rtol=1e-10, atol=1e-12)
        assert_state_equal(net, theirs, rtol=1e-10, atol=1e-12)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert type(copied[1]) is type(bn) and copied[1].tag == "stem"
        torch.testing.assert_close(copied(x), net(x), rtol=0, atol=0)
    y = data((2, 4, 5, 6), seed=1)
    torch.testing.assert_close(torch.jit.script(bn)(y), bn(y), rtol=1e-10, atol=1e-12)
    nkt.to_torch(net)
    assert [type(m) for m in net] == [nn.Conv2d, TaggedBatchNorm2d, LayerNorm2d, nn.BatchNorm2d, TaggedLayerNorm]
    assert net[1].tag == "stem"


def test_torch_utilities_see_normkit_batch_norm():
    """swa_utils.update_bn (isinstance _BatchNorm) and fuse_conv_bn_eval work on converted models as on torch's."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    theirs = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(F64))
    ours = nkt.convert(copy.deepcopy(theirs))
    loader = [data((4, 3, 6, 6), seed=s) for s in range(3)]
    update_bn(loader, ours), update_bn(loader, theirs)
    assert int(ours[1].num_batches_tracked) == 3
    assert_state_equal(ours, theirs, rtol=1e-10, atol=1e-12)
    ours.eval(), theirs.eval()
    fused = fuse_conv_bn_eval(ours[0], ours[1])
    x = data((2, 3, 6, 6), seed=7)
    torch.testing.assert_close(fused(x), theirs(x), rtol=1e-10, atol=1e-12)
