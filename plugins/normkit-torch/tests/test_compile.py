"""torch.compile(fullgraph=True), static and dynamic shapes, under both kernel policies: one graph, no Dynamo
warnings, same results and buffer updates as eager torch.nn."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, assert_state_equal, data, randomize

TIGHT = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _no_dynamo_warnings(caught) -> None:
    """Dynamo traced our code cleanly: no warning about it (e.g. on a cached helper it had to trace through)."""
    dynamo = [str(w.message) for w in caught if "dynamo" in str(w.message).lower() or "graph break" in str(w.message)]
    assert not dynamo, dynamo


def _compiled_matches(ours: nn.Module, theirs: nn.Module, shapes, **compile_kwargs) -> None:
    compiled = torch.compile(ours, fullgraph=True, **compile_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, shape in enumerate(shapes):
            x = data(shape, seed=step)
            torch.testing.assert_close(compiled(x), theirs(x), **TIGHT)
            assert_state_equal(ours, theirs, **TIGHT)
    _no_dynamo_warnings(caught)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_batch_norm_fullgraph_inductor(momentum, policy):
    """Inductor for the default momentum; aot_eager (the same graph capture, no code generation) for the
    cumulative average, whose 0-d tensor momentum torch.nn itself cannot compile in one graph."""
    ours, theirs = nkt.BatchNorm2d(3, momentum=momentum, dtype=F64), nn.BatchNorm2d(3, momentum=momentum, dtype=F64)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    backend = {} if momentum is not None else {"backend": "aot_eager"}
    _compiled_matches(ours, theirs, [(4, 3, 5, 6)] * 3, **backend)
    ours.eval(), theirs.eval()
    _compiled_matches(ours, theirs, [(4, 3, 5, 6)], **backend)


def test_batch_norm_fullgraph_dynamic_shapes(policy):
    ours, theirs = nkt.BatchNorm2d(3, dtype=F64), nn.BatchNorm2d(3, dtype=F64)
    _compiled_matches(ours, theirs, [(4, 3, 5, 6), (6, 3, 7, 2), (3, 3, 4, 4)], dynamic=True)


def test_training_step_fullgraph_backward(policy):
    ours, theirs = nkt.BatchNorm1d(5, dtype=F64), nn.BatchNorm1d(5, dtype=F64)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = data((8, 5))
    grads = []
    for m in (compiled, theirs):
        xi = x.clone().requires_grad_(True)
        (m(xi) ** 2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], **TIGHT)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TIGHT)


class _Family(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.gn = lib.GroupNorm(2, 4, dtype=F64)
        self.inorm = lib.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=F64)
        self.ln = lib.LayerNorm((5, 6), dtype=F64)
        self.rms = lib.RMSNorm(6, dtype=F64)

    def forward(self, x):
        return self.rms(self.ln(self.inorm(self.gn(x))))


def test_family_fullgraph(policy):
    ours, theirs = _Family(nkt), _Family(nn)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    _compiled_matches(ours, theirs, [(2, 4, 5, 6)] * 2, backend="aot_eager")
    _compiled_matches(ours, theirs, [(2, 4, 5, 6), (3, 4, 5, 6)], backend="aot_eager", dynamic=True)


def test_standardize_fullgraph():
    x = data((50, 4))
    scaler = nkt.Standardize(4, dtype=F64).fit(x)
    compiled = torch.compile(scaler, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(x), (x - x.mean(0)) / x.std(0, unbiased=False), rtol=1e-9, atol=1e-12)
    _no_dynamo_warnings(caught)
