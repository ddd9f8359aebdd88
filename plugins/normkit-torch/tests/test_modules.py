"""Each normkit module against its torch.nn twin, computed in the test: arguments, state, math, modes, dtypes.

Every test that computes runs under both kernel policies (fixture ``policy``): torch's kernels and the core."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from typing import Optional

import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, PAIRS, assert_state_equal, data, make_pair, pair_id
from normkit_torch._convert import TO_NORMKIT

TIGHT = dict(rtol=1e-10, atol=1e-12)


# --- the class surface ----------------------------------------------------------------------------


@pytest.mark.parametrize("theirs,ours", list(TO_NORMKIT.items()), ids=lambda c: c.__name__)
def test_signature_and_class(theirs, ours):
    expected = inspect.signature(theirs.__init__)
    if issubclass(ours, nkt.BatchNorm.__mro__[1]):  # batch norm: torch.nn's, plus the keyword-only ghost batch size
        ghost = inspect.Parameter("virtual_batch_size", inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=Optional[int])
        expected = expected.replace(parameters=[*expected.parameters.values(), ghost])
    assert inspect.signature(ours.__init__) == expected
    assert ours.__name__ == theirs.__name__
    assert issubclass(ours, nn.modules.batchnorm._BatchNorm) == issubclass(theirs, nn.modules.batchnorm._BatchNorm)


def test_defaults_parameters_buffers_repr(pair):
    ours_cls, torch_cls, args, kwargs, _ = pair
    ours, theirs = ours_cls(*args, **kwargs), torch_cls(*args, **kwargs)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in theirs.named_parameters()]
    assert [(n, b.shape, b.dtype) for n, b in ours.named_buffers()] == [
        (n, b.shape, b.dtype) for n, b in theirs.named_buffers()]
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    assert ours._version == theirs._version


def test_state_dict_loads_both_ways(pair, policy):
    ours, theirs = make_pair(pair)  # torch -> normkit, strict
    x = data(pair[4])
    ours(x), theirs(x)
    back = pair[1](*pair[2], **pair[3], dtype=F64)
    back.load_state_dict(ours.state_dict(), strict=True)  # normkit -> torch, strict
    assert_state_equal(back, theirs, **TIGHT)


def test_reset_parameters_and_running_stats(pair):
    ours, theirs = make_pair(pair)
    fresh = pair[1](*pair[2], **pair[3], dtype=F64)
    if hasattr(ours, "reset_running_stats"):
        ours(data(pair[4]))
        ours.reset_running_stats()
        theirs.reset_running_stats()
        assert_state_equal(ours, theirs, rtol=0, atol=0)
    ours.reset_parameters()
    assert_state_equal(ours, fresh, rtol=0, atol=0)


# --- math, modes, gradients -----------------------------------------------------------------------


def test_train_then_eval_parity(pair, policy):
    ours, theirs = make_pair(pair)
    for step in range(3):
        x = data(pair[4], seed=step)
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
        assert_state_equal(ours, theirs, **TIGHT)
    ours.eval(), theirs.eval()
    x = data(pair[4], seed=9)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
    assert_state_equal(ours, theirs, **TIGHT)  # inference leaves the statistics


def test_gradients(pair, policy):
    ours, theirs = make_pair(pair)
    x = data(pair[4])
    up = data(pair[4], seed=5)
    grads = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        (m(xi) * up).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TIGHT)
    for name, b in ours.named_buffers():
        assert not b.requires_grad and b.grad_fn is None, name


def test_momentum_none_is_cumulative_average(policy):
    ours, theirs = nkt.BatchNorm1d(3, momentum=None, dtype=F64), nn.BatchNorm1d(3, momentum=None, dtype=F64)
    batches = [data((6, 3), seed=s) for s in range(4)]
    for x in batches:
        ours(x), theirs(x)
    assert int(ours.num_batches_tracked) == 4
    torch.testing.assert_close(ours.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), **TIGHT)
    torch.testing.assert_close(ours.running_var, torch.stack([b.var(0) for b in batches]).mean(0), **TIGHT)
    assert_state_equal(ours, theirs, **TIGHT)


def test_eval_without_running_stats_uses_batch_statistics(policy):
    ours = nkt.BatchNorm2d(3, track_running_stats=False, affine=False, dtype=F64).eval()
    x = data((4, 3, 5, 6))
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(ours(x), (x - mean) / torch.sqrt(var + 1e-5), **TIGHT)


# --- torch's errors, same type and message ---------------------------------------------------------


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


ERRORS = [
    ("BatchNorm2d", (3,), {}, (3, 5, 5), True),
    ("BatchNorm1d", (3,), {}, (2, 3, 4, 4), True),
    ("BatchNorm3d", (3,), {}, (2, 3, 4, 4), True),
    ("BatchNorm2d", (3,), {}, (2, 4, 5, 5), True),
    ("BatchNorm2d", (3,), {}, (2, 4, 5, 5), False),
    ("BatchNorm2d", (3,), {"track_running_stats": False}, (2, 4, 5, 5), True),
    ("BatchNorm1d", (3,), {}, (1, 3), True),
    ("BatchNorm2d", (3,), {}, (1, 3, 1, 1), True),
    ("BatchNorm2d", (3,), {"eps": 0.0}, (2, 3, 5, 5), True),
    ("BatchNorm2d", (3,), {"eps": -1.0}, (2, 3, 5, 5), False),
    ("InstanceNorm2d", (3,), {}, (2, 3, 1, 1), True),
    ("InstanceNorm2d", (3,), {"affine": True}, (2, 4, 5, 5), True),
    ("InstanceNorm2d", (3,), {"track_running_stats": True}, (2, 4, 5, 5), True),
    ("InstanceNorm2d", (3,), {"track_running_stats": True}, (2, 4, 5, 5), False),
    ("InstanceNorm1d", (3,), {}, (2, 3, 4, 4), True),
    ("LayerNorm", (4,), {}, (2, 3, 5), True),
    ("LayerNorm", ((3, 4),), {"elementwise_affine": False}, (4,), True),
    ("GroupNorm", (2, 6), {}, (6,), True),
    ("GroupNorm", (2, 6), {}, (2, 4, 5), True),
    ("GroupNorm", (2, 6), {"affine": False}, (2, 3, 5), True),
    ("RMSNorm", ((3, 4),), {}, (2, 3, 5), True),
    ("RMSNorm", ((3, 4),), {}, (4,), True),
]


@pytest.mark.filterwarnings("ignore:input's size at dim")
@pytest.mark.parametrize("name,args,kwargs,shape,training", ERRORS, ids=[f"{e[0]}-{e[2]}-{e[3]}-{e[4]}" for e in ERRORS])
def test_errors_match_torch(name, args, kwargs, shape, training, policy):
    x = torch.randn(shape)
    ours = getattr(nkt, name)(*args, **kwargs).train(training)
    theirs = getattr(nn, name)(*args, **kwargs).train(training)
    assert _error(lambda: ours(x)) == _error(lambda: theirs(x))


def test_batch_of_one_message(policy):
    with pytest.raises(ValueError) as info:
        nkt.BatchNorm1d(3)(torch.randn(1, 3))
    assert str(info.value) == "Expected more than 1 value per channel when training, got input size torch.Size([1, 3])"
    nkt.BatchNorm1d(3).eval()(torch.randn(1, 3))  # inference takes one sample


def test_construction_errors_match_torch():
    assert _error(lambda: nkt.GroupNorm(2, 5)) == _error(lambda: nn.GroupNorm(2, 5))


def test_any_rank_batch_norm(policy):
    ours = nkt.BatchNorm(3, dtype=F64)
    theirs = nn.BatchNorm1d(3, dtype=F64)
    for shape in [(4, 3), (4, 3, 5)]:
        torch.testing.assert_close(ours(data(shape)), theirs(data(shape)), **TIGHT)
    ref = nn.BatchNorm3d(3, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    x = data((2, 3, 4, 3, 5))
    torch.testing.assert_close(ours(x), ref(x), **TIGHT)
    assert _error(lambda: ours(torch.randn(3, dtype=F64))) == _error(lambda: nn.SyncBatchNorm(3)(torch.randn(3)))


# --- checkpoints ----------------------------------------------------------------------------------


def test_old_checkpoint_without_num_batches_tracked_loads_like_torch():
    src = nn.BatchNorm2d(3, dtype=F64)
    src(data((4, 3, 5, 6)))
    state = src.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # saved before num_batches_tracked existed
    ours, theirs = nkt.BatchNorm2d(3, dtype=F64), nn.BatchNorm2d(3, dtype=F64)
    ours.load_state_dict(copy.deepcopy(state), strict=True)
    theirs.load_state_dict(copy.deepcopy(state), strict=True)
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    del state._metadata[""]["version"]
    ours.load_state_dict(copy.deepcopy(state), strict=True)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):  # a current checkpoint must have it
        state._metadata[""]["version"] = 2
        ours.load_state_dict(state, strict=True)


def test_pre_0_4_instance_norm_checkpoint_error_like_torch():
    state = nn.InstanceNorm2d(3, track_running_stats=True).state_dict()
    del state._metadata[""]["version"]
    errors = []
    for cls in (nkt.InstanceNorm2d, nn.InstanceNorm2d):
        with pytest.raises(RuntimeError) as info:
            cls(3).load_state_dict(copy.deepcopy(state), strict=True)
        errors.append(str(info.value).replace(cls.__module__, ""))
    assert errors[0] == errors[1]


# --- instance norm quirks -------------------------------------------------------------------------


def test_instance_norm_quirks(policy):
    x = data((2, 3, 5, 6))
    ours = nkt.InstanceNorm2d(3, track_running_stats=True, dtype=F64)
    ours(x)
    assert int(ours.num_batches_tracked) == 0  # never counts
    mean = x.mean((2, 3)).mean(0)
    var = x.var((2, 3), unbiased=True).mean(0)  # mean of unbiased per-instance variances
    torch.testing.assert_close(ours.running_mean, 0.1 * mean, **TIGHT)
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * var, **TIGHT)

    frozen = nkt.InstanceNorm2d(3, track_running_stats=True, momentum=None, dtype=F64)
    frozen(x)
    assert_state_equal(frozen, nn.InstanceNorm2d(3, track_running_stats=True, dtype=F64), rtol=0, atol=0)

    unbatched, theirs = nkt.InstanceNorm1d(3, dtype=F64), nn.InstanceNorm1d(3, dtype=F64)
    y = unbatched(data((3, 7)))
    assert y.shape == (3, 7)
    torch.testing.assert_close(y, theirs(data((3, 7))), **TIGHT)

    with pytest.warns(UserWarning, match="does not match num_features"):
        nkt.InstanceNorm1d(3)(torch.randn(2, 4, 5))


def test_lazy_modules_become_normkit_modules(policy):
    for ours_cls, torch_cls, shape, target in [
        (nkt.LazyBatchNorm2d, nn.LazyBatchNorm2d, (4, 3, 5, 6), nkt.BatchNorm2d),
        (nkt.LazyBatchNorm1d, nn.LazyBatchNorm1d, (4, 3), nkt.BatchNorm1d),
        (nkt.LazyInstanceNorm2d, nn.LazyInstanceNorm2d, (2, 3, 5, 6), nkt.InstanceNorm2d),
    ]:
        ours, theirs = ours_cls(dtype=F64), torch_cls(dtype=F64)
        assert repr(ours) == repr(theirs)
        x = data(shape)
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
        assert type(ours) is target and ours.num_features == 3
        assert_state_equal(ours, theirs, **TIGHT)


# --- dtypes and layouts ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_module(pair, half, policy):
    ours, theirs = make_pair(pair, dtype=torch.float32)
    x = data(pair[4], dtype=half)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == half
    tol = dict(rtol=1e-2, atol=1e-2) if half == torch.float16 else dict(rtol=4e-2, atol=4e-2)
    torch.testing.assert_close(y_ours, y_theirs, **tol)
    for name, b in ours.named_buffers():
        assert b.dtype == dict(theirs.named_buffers())[name].dtype
    if policy == "auto":  # torch's kernel: torch.nn's own statistics
        assert_state_equal(ours, theirs, rtol=0, atol=0)
        return
    _, upcast = make_pair(pair, dtype=torch.float32)
    upcast(x.float())  # the core reduces half input in float32: as torch's on the upcast input
    assert_state_equal(ours, upcast, rtol=1e-5, atol=1e-6)


def _outcome(module, x):
    """The module's output and state after one call, or its error's type and message."""
    try:
        return module(x), module.state_dict()
    except Exception as error:  # noqa: BLE001 - compared with torch.nn's
        return type(error), str(error)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm
@pytest.mark.parametrize("module_dtype,input_dtype", [(F64, torch.float32), (torch.float32, F64)], ids=str)
def test_mixed_dtype_input_as_torch_nn(pair, module_dtype, input_dtype, policy):
    """A module left in one dtype given input of another: torch.nn's outcome under either policy, torch's CPU
    "mixed dtype" error where aten refuses to mix (batch, layer, group norm), the same output otherwise; the core
    would cast and compute."""
    ours, theirs = make_pair(pair, dtype=module_dtype)
    x = data(pair[4], dtype=input_dtype)
    got, want = _outcome(ours, x), _outcome(theirs, x)
    if isinstance(want[0], type):
        assert got == want
        return
    assert isinstance(got[0], torch.Tensor) and got[0].dtype == want[0].dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_rms_norm_eps_none_half_uses_float32_eps(policy):
    x = torch.full((2, 4), 1e-4, dtype=torch.float16)  # mean(x**2) ~ 1e-8: eps matters
    ours, theirs = nkt.RMSNorm(4), nn.RMSNorm(4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
    expected = 1e-4 / (1e-8 + torch.finfo(torch.float32).eps) ** 0.5
    torch.testing.assert_close(ours(x).float(), torch.full((2, 4), expected), rtol=1e-3, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_kept(training, policy):
    x = data((4, 3, 5, 6)).to(memory_format=torch.channels_last)
    for ours_cls, torch_cls, args in [(nkt.BatchNorm2d, nn.BatchNorm2d, (3,)), (nkt.GroupNorm, nn.GroupNorm, (3, 3)),
                                      (nkt.InstanceNorm2d, nn.InstanceNorm2d, (3,))]:
        ours, theirs = ours_cls(*args, dtype=F64), torch_cls(*args, dtype=F64)
        ours = ours.to(memory_format=torch.channels_last).train(training)
        theirs = theirs.to(memory_format=torch.channels_last).train(training)
        y_ours, y_theirs = ours(x), theirs(x)
        torch.testing.assert_close(y_ours, y_theirs, **TIGHT)
        cl = torch.channels_last
        assert y_ours.is_contiguous(memory_format=cl) == y_theirs.is_contiguous(memory_format=cl), ours_cls.__name__
    assert nkt.BatchNorm2d(3, dtype=F64).train(training)(x).is_contiguous(memory_format=torch.channels_last)


# --- copies, serialization, functional use --------------------------------------------------------


def test_deepcopy_pickle_save_load(pair):
    ours, _ = make_pair(pair)
    ours(data(pair[4]))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), torch.load(buffer, weights_only=False)]
    x = data(pair[4], seed=3)
    ours.eval()
    for again in copies:
        assert type(again) is type(ours)
        assert_state_equal(again, ours, rtol=0, atol=0)
        torch.testing.assert_close(again.eval()(x), ours(x), rtol=0, atol=0)


def test_to_dtype(pair, policy):
    ours, theirs = make_pair(pair)
    ours, theirs = ours.to(torch.float32), theirs.to(torch.float32)
    assert_state_equal(ours, theirs, rtol=0, atol=0)
    x = data(pair[4], dtype=torch.float32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert_state_equal(ours, theirs, rtol=1e-5, atol=1e-6)


def test_functional_call(pair, policy):
    ours, theirs = make_pair(pair)
    x = data(pair[4])
    outs, states = [], []
    for m in (ours, theirs):
        state = {k: v.clone() for k, v in m.state_dict().items()}
        outs.append(torch.func.functional_call(m, state, (x,)))
        states.append(state)
    torch.testing.assert_close(outs[0], outs[1], **TIGHT)
    for k in states[1]:
        torch.testing.assert_close(states[0][k], states[1][k], **TIGHT)  # buffers updated in the dict passed
    assert_state_equal(ours, make_pair(pair)[0], rtol=0, atol=0)  # the module itself is untouched


def test_pairs_cover_every_family():
    covered = {p[0] for p in PAIRS}
    for cls in (nkt.BatchNorm1d, nkt.BatchNorm2d, nkt.BatchNorm3d, nkt.InstanceNorm1d, nkt.InstanceNorm2d,
                nkt.InstanceNorm3d, nkt.LayerNorm, nkt.GroupNorm, nkt.RMSNorm):
        assert cls in covered, pair_id
