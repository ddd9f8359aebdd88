"""normkit_torch.get_state / set_state / from_state / copy_norm_states on normkit's and torch.nn's modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import PAIRS, data, pair_id, randomize
from normkit import NormState

KIND = {"BatchNorm": "batch", "InstanceNorm": "instance", "LayerNorm": "layer", "GroupNorm": "group", "RMSNorm": "rms"}


def kind_of(cls: type) -> str:
    return next(v for k, v in KIND.items() if cls.__name__.startswith(k))


def trained(cls: type, args: tuple, kwargs: dict, shape: tuple, dtype=torch.float32) -> nn.Module:
    """A module with random weights and two training steps behind it (running statistics and count moved)."""
    m = randomize(cls(*args, **kwargs, dtype=dtype)).train()
    with torch.no_grad():
        for seed in (1, 2):
            m(data(shape, dtype, seed))
    return m


def bitwise(t: torch.Tensor, a: np.ndarray) -> bool:
    t = t.detach()
    return t.numpy().dtype == a.dtype and t.numpy().tobytes() == a.tobytes()


@pytest.mark.parametrize("native", [False, True], ids=["normkit", "torch.nn"])
@pytest.mark.parametrize("p", PAIRS, ids=[pair_id(p) for p in PAIRS])
def test_get_state_reads_every_field(p, native):
    ours, theirs, args, kwargs, shape = p
    m = trained(theirs if native else ours, args, kwargs, shape)
    s = nkt.get_state(m)
    assert s.kind == kind_of(ours) and s.dtype == "float32"
    assert s.source == ("torch.nn." if native else "normkit_torch.") + (theirs if native else ours).__name__
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is None:
            assert getattr(s, name) is None, name
        else:
            assert bitwise(t, getattr(s, name)), name
    assert s.eps == (m.eps if m.eps is not None else float(torch.finfo(torch.float32).eps))
    if s.kind in ("batch", "instance", "group"):
        assert s.feature_axis == 1 and s.normalized_axes is None and s.shape == (args[-1],)
    else:
        assert s.normalized_axes == tuple(range(-len(m.normalized_shape), 0)) and s.shape == tuple(m.normalized_shape)
    if s.track_running_stats:
        assert s.running_var_correction == 1
        assert s.momentum == (0.0 if m.momentum is None and s.kind == "instance" else m.momentum)
        counted = int(m.num_batches_tracked)
        assert s.num_batches_tracked == (counted or None) and (s.kind == "instance" or counted == 2)
    else:
        assert s.momentum is None and s.running_var_correction is None and s.num_batches_tracked is None
    rank = {"BatchNorm2d": 4, "BatchNorm3d": 5, "InstanceNorm1d": 3, "InstanceNorm2d": 4, "InstanceNorm3d": 5}
    assert s.input_rank == rank.get(ours.__name__)


@pytest.mark.parametrize("native", [False, True], ids=["normkit", "torch.nn"])
@pytest.mark.parametrize("p", PAIRS, ids=[pair_id(p) for p in PAIRS])
def test_from_state_round_trips_exactly(p, native):
    ours, theirs, args, kwargs, shape = p
    m = trained(theirs if native else ours, args, kwargs, shape)
    s = nkt.get_state(m)
    again = nkt.from_state(s)
    assert type(again) is (nkt.BatchNorm if ours is nkt.BatchNorm1d else ours)  # BatchNorm1d: any rank >= 2
    assert nkt.get_state(again) == s
    assert again.training  # a new torch module trains, as torch's do
    want, got = m.state_dict(), again.state_dict()
    if ours is nkt.BatchNorm1d:
        assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert again.eps == s.eps
    if s.track_running_stats:
        assert again.momentum == s.momentum
    # the module built by hand from the same arguments and state_dict computes bit for bit the same
    twin = ours(*args, **kwargs, dtype=torch.float32)
    twin.load_state_dict(want)
    x = data(shape, torch.float32, 3)
    for mode in (True, False):
        twin.train(mode), again.train(mode)
        with torch.no_grad():
            assert torch.equal(again(x), twin(x)), f"training={mode}"
        for k, v in twin.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), (k, mode)


def test_rms_eps_none_is_recorded_as_the_machine_epsilon():
    for dtype, eps in ((torch.float32, 2.0**-23), (torch.float64, 2.0**-52), (torch.float16, 2.0**-23), (torch.bfloat16, 2.0**-23)):
        s = nkt.get_state(nn.RMSNorm(4, dtype=dtype))
        assert s.eps == eps, dtype
    x = data((3, 4), torch.float32)
    native = nn.RMSNorm(4).eval()
    ported = nkt.from_state(nkt.get_state(native)).eval()
    torch.testing.assert_close(ported(x), native(x), rtol=0, atol=4 * 2.0**-23)


def test_bfloat16_state_is_widened_exactly_and_restored():
    m = trained(nn.BatchNorm1d, (5,), {}, (8, 5), torch.bfloat16)
    s = nkt.get_state(m)
    assert s.dtype == "bfloat16" and s.weight.dtype == np.float32
    again = nkt.from_state(s)
    assert again.weight.dtype is torch.bfloat16
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("cls, rank", [(nn.SyncBatchNorm, None), (nn.LazyBatchNorm2d, 4), (nn.LazyInstanceNorm1d, 3)])
def test_sync_and_lazy_modules(cls, rank):
    m = cls() if cls.__name__.startswith("Lazy") else cls(3)
    if cls.__name__.startswith("Lazy"):
        with pytest.raises(ValueError, match="not initialized yet: run one batch"):
            nkt.get_state(m)
        with torch.no_grad():
            m(data((2, 3) + (4,) * (rank - 2), torch.float32))
    s = nkt.get_state(m)
    assert s.shape == (3,) and s.input_rank == rank
    assert nkt.get_state(nkt.from_state(s)) == s


def test_instance_norm_momentum_none_is_zero_and_keeps_the_statistics():
    m = randomize(nn.InstanceNorm2d(3, momentum=None, affine=True, track_running_stats=True))
    s = nkt.get_state(m)
    assert s.momentum == 0.0
    ported = nkt.from_state(s)
    before = ported.running_var.clone()
    with torch.no_grad():
        ported(data((2, 3, 4, 5), torch.float32))
    assert torch.equal(ported.running_var, before)  # torch's momentum=None: no update, as momentum 0


@pytest.mark.parametrize("rank, cls", [(2, nkt.BatchNorm1d), (3, nkt.BatchNorm1d), (4, nkt.BatchNorm2d),
                                       (5, nkt.BatchNorm3d), (None, nkt.BatchNorm)])
def test_from_state_picks_the_class_by_input_rank(rank, cls):
    s = nkt.get_state(nn.BatchNorm3d(2)).replace(input_rank=None)
    assert type(nkt.from_state(s, input_rank=rank)) is cls


def test_from_state_layout_and_overrides():
    s = nkt.get_state(nn.BatchNorm2d(3)).replace(feature_axis=-1)  # as Keras records a channels-last layer
    m = nkt.from_state(s)
    assert type(m) is nkt.BatchNorm2d and nkt.get_state(m).feature_axis == 1
    with pytest.raises(ValueError, match=r"channels_first.*x.permute\(0, 3, 1, 2\).*'channels_last'"):
        nkt.from_state(s, layout="channels_last")
    m = nkt.from_state(s, eps=1e-3, momentum=None, dtype=torch.float64)
    assert (m.eps, m.momentum, m.weight.dtype) == (1e-3, None, torch.float64)
    with pytest.raises(ValueError, match="pass input_rank=3, 4 or 5"):
        nkt.from_state(nkt.get_state(nn.InstanceNorm2d(3)).replace(input_rank=None))
    with pytest.raises(TypeError, match="normkit.NormState"):
        nkt.from_state({"kind": "batch"})


def test_get_state_rejects_other_modules_and_extra_state():
    with pytest.raises(TypeError, match="expected a torch normalization module .* got Linear"):
        nkt.get_state(nn.Linear(2, 2))

    class Renormed(nn.BatchNorm1d):  # a subclass with statistics of its own (batch renormalization's, say)
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.register_buffer("running_std", torch.ones(n))

    with pytest.raises(ValueError, match=r"Renormed carries \['running_std'\], which a NormState does not hold"):
        nkt.get_state(Renormed(3))


def test_set_state_translates_eps_momentum_and_count():
    src = trained(nn.BatchNorm2d, (3,), {"eps": 1e-3, "momentum": 0.3}, (4, 3, 2, 2), torch.float64)
    dst = nkt.BatchNorm2d(3)  # float32, torch's defaults eps=1e-5, momentum=0.1
    nkt.set_state(dst, nkt.get_state(src))
    assert (dst.eps, dst.momentum, int(dst.num_batches_tracked)) == (1e-3, 0.3, 2)
    assert dst.weight.dtype is torch.float32
    torch.testing.assert_close(dst.running_var, src.running_var.float(), rtol=0, atol=0)


def test_set_state_fills_the_identity_and_refuses_what_it_cannot_hold():
    s = nkt.get_state(randomize(nn.BatchNorm1d(3, bias=False)))
    dst = randomize(nkt.BatchNorm1d(3))
    nkt.set_state(dst, s)  # a state without bias into a module with one: bias 0, exactly equivalent
    assert torch.equal(dst.bias, torch.zeros(3))
    back = randomize(nkt.BatchNorm1d(3), seed=5)
    no_bias = nkt.BatchNorm1d(3, bias=False)
    with pytest.raises(ValueError, match=r"has no bias \(bias=False or affine=False\), but the state's bias is not all 0"):
        nkt.set_state(no_bias, nkt.get_state(back))
    with_zero_bias = nkt.get_state(back).replace(bias=np.zeros(3, "float32"))
    nkt.set_state(no_bias, with_zero_bias)  # a zero bias needs no parameter
    assert torch.equal(no_bias.weight, back.weight)


@pytest.mark.parametrize("target, state_of, message", [
    (lambda: nkt.BatchNorm2d(3), lambda: nn.LayerNorm(3), "kind mismatch: a layer norm state"),
    (lambda: nkt.BatchNorm2d(4), lambda: nn.BatchNorm2d(3), r"size mismatch: the state's per-feature shape is \(3,\), BatchNorm2d has \(4,\)"),
    (lambda: nkt.GroupNorm(2, 6), lambda: nn.GroupNorm(3, 6), "num_groups mismatch: the state has 3, GroupNorm has 2"),
    (lambda: nkt.BatchNorm2d(3), lambda: nn.BatchNorm2d(3, track_running_stats=False), "track_running_stats=True, the state has no running"),
    (lambda: nkt.BatchNorm2d(3, track_running_stats=False), lambda: nn.BatchNorm2d(3), "track_running_stats=False, the state has running"),
    (lambda: nkt.InstanceNorm2d(3), lambda: nn.GroupNorm(1, 3), "kind mismatch"),
    (lambda: nkt.LayerNorm(3, elementwise_affine=False), lambda: randomize(nn.LayerNorm(3)), r"has no weight \(affine=False\)"),
])
def test_set_state_mismatch_writes_nothing(target, state_of, message):
    dst = randomize(target(), seed=9)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        nkt.set_state(dst, nkt.get_state(state_of()))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_norm_over_non_trailing_axes_is_refused():
    s = NormState("layer", (4,), eps=1e-3, normalized_axes=(-3,), input_rank=4)  # Keras axis=1 on NCHW
    with pytest.raises(ValueError, match=r"LayerNorm normalizes the trailing axes \(-1,\); the state normalizes axes \(-3,\)"):
        nkt.from_state(s)


def test_group_norm_with_one_channel_per_group_is_an_instance_norm():
    g = randomize(nn.GroupNorm(3, 3))
    inst = nkt.InstanceNorm1d(3, affine=True)
    nkt.set_state(inst, nkt.get_state(g))
    x = data((2, 3, 7), torch.float32)
    with torch.no_grad():
        y_inst, y_group = inst(x), g(x)
    torch.testing.assert_close(y_inst, y_group, rtol=0, atol=8 * 2.0**-23 * float(y_group.abs().max()))


class Net(nn.Module):
    def __init__(self, c: int = 4, norm_last=nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3)
        self.bn = nn.BatchNorm2d(c)
        self.block = nn.Sequential(nn.Conv2d(c, c, 1), nn.GroupNorm(2, c))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 4, 6), norm_last(6))


def test_copy_norm_states_in_order_and_by_name():
    src, dst = randomize(Net()), nkt.convert(Net())
    report = nkt.copy_norm_states(src, dst)
    assert report.ok and report.copied == [("bn", "bn"), ("block.1", "block.1"), ("head.2", "head.2")]
    assert nkt.norm_states(dst) == nkt.norm_states(src)
    assert list(nkt.norm_states(dst)) == ["bn", "block.1", "head.2"]
    states = nkt.norm_states(randomize(Net(), seed=3))
    renamed = {f"layer{i}": s for i, s in enumerate(states.values())}
    nkt.copy_norm_states(renamed, dst, mapping={"layer0": "bn", "layer1": "block.1", "layer2": "head.2"})
    assert list(nkt.norm_states(dst).values()) == list(states.values())
    nkt.copy_norm_states(list(states.values()), dst)  # a plain sequence pairs in order


def test_copy_norm_states_reports_and_copies_nothing_on_mismatch():
    src, dst = randomize(Net()), randomize(Net(norm_last=nn.RMSNorm), seed=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)nothing copied.*head.2 -> head.2: kind mismatch: a layer norm state"):
        nkt.copy_norm_states(src, dst)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    report = nkt.copy_norm_states(src, dst, strict=False)
    assert report.copied == [("bn", "bn"), ("block.1", "block.1")] and not report.ok
    assert [m[:2] for m in report.mismatched] == [("head.2", "head.2")]
    short = nn.Sequential(nn.BatchNorm2d(4))
    report = nkt.copy_norm_states(src, short, strict=False)
    assert report.unmatched_source == ["block.1", "head.2"] and report.copied == [("bn", "0")]
    with pytest.raises(TypeError, match="cannot read normalization states from int"):
        nkt.copy_norm_states(3, dst)


@pytest.mark.parametrize("native", [False, True], ids=["normkit", "torch.nn"])
def test_state_that_overflows_float16_is_refused(native):
    """A float32 BatchNorm1d whose running_var reached 7.82e4 cannot live in float16 (largest 65504): set_state and
    from_state(dtype=float16) refuse, naming the statistic, the value and the limit, and write nothing (before:
    the module stored inf, and every inference output was 0 or NaN). bfloat16 holds it; 65519 rounds to 65504."""
    m = nn.BatchNorm1d(2)
    with torch.no_grad():
        m.running_var.copy_(torch.tensor([1.0, 7.82e4]))
    s = nkt.get_state(m)
    target = (nn.BatchNorm1d if native else nkt.BatchNorm1d)(2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"running_var in BatchNorm1d of dtype float16: it holds 78200.0, above "
                                         r"float16's largest finite value 65504.0 \(it would become inf\)"):
        nkt.set_state(target, s)
    assert target.running_var.tolist() == [1.0, 1.0]  # nothing written
    with pytest.raises(ValueError, match="float16's largest finite value 65504"):
        nkt.from_state(s, dtype=torch.float16)
    assert torch.isfinite(nkt.from_state(s, dtype=torch.bfloat16).running_var).all()
    nkt.set_state(target, s.replace(running_var=np.array([1.0, 65519.0], "float32")))
    assert target.running_var.tolist() == [1.0, 65504.0]


def test_diverged_module_state_is_refused_by_name():
    """A module whose statistics went NaN/inf (a diverged run) gives no NormState: the error names the field
    (before: the NaN was transferred in silence into every framework)."""
    m = nn.BatchNorm1d(3)
    with torch.no_grad():
        m.running_mean[1] = float("nan")
    with pytest.raises(ValueError, match=r"NormState.running_mean must be finite, got 1 non-finite value\(s\) \(nan at \(1,\)\)"):
        nkt.get_state(m)
    m = nn.LayerNorm(2)
    with torch.no_grad():
        m.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"NormState.weight must be finite.*inf at \(0,\)"):
        nkt.get_state(m)
