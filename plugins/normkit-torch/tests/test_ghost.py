"""Ghost batch norm in normkit_torch's batch-norm modules (``virtual_batch_size=``), under both kernel policies.

Judged against ``normkit.testing.reference.ghost_batch_norm`` (float64 NumPy: each run of V samples
batch-normalized alone; the running statistics updated once per step with the whole batch's, torch's
unbiased convention), step after step, then in eval. float64 throughout: rtol 1e-10 / atol 1e-12
leaves 1e4x margin over the ~1e-15 round-off of sums of at most 60 values.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import normkit_torch as nkt
from conftest import F64, data, randomize
from normkit.testing import reference

TIGHT = dict(rtol=1e-10, atol=1e-12)
CASES = [  # (class, kwargs, input shape, virtual batch size)
    (nkt.BatchNorm1d, {}, (12, 5), 4),
    (nkt.BatchNorm1d, {"momentum": None}, (8, 3, 7), 2),
    (nkt.BatchNorm2d, {"affine": False}, (6, 3, 4, 5), 3),
    (nkt.BatchNorm3d, {"momentum": 0.3}, (4, 2, 3, 3, 4), 2),
    (nkt.BatchNorm, {}, (8, 3, 5, 2), 4),
    (nkt.LazyBatchNorm2d, {}, (6, 3, 4, 5), 2),
]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


@pytest.mark.parametrize("cls,kwargs,shape,v", CASES, ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in CASES])
def test_training_steps_then_eval_match_reference(cls, kwargs, shape, v, policy):
    c = shape[1]
    module = cls(*(() if cls.__name__.startswith("Lazy") else (c,)), virtual_batch_size=v, dtype=F64, **kwargs)
    module(data(shape, seed=9))  # materialize a Lazy module; every module starts from one step
    randomize(module)
    module.num_batches_tracked.zero_()
    rm, rv = _np(module.running_mean).copy(), _np(module.running_var).copy()
    w = None if module.weight is None else _np(module.weight)
    b = None if module.bias is None else _np(module.bias)
    for step in range(1, 4):
        x = data(shape, seed=step, offset=float(step))
        y = module(x)
        momentum = 1.0 / step if module.momentum is None else module.momentum
        want, rm, rv = reference.ghost_batch_norm(_np(x), rm, rv, w, b, virtual_batch_size=v, momentum=momentum)
        np.testing.assert_allclose(_np(y), want, **TIGHT)
        np.testing.assert_allclose(_np(module.running_mean), rm, **TIGHT)
        np.testing.assert_allclose(_np(module.running_var), rv, **TIGHT)
        assert int(module.num_batches_tracked) == step  # once per call, not once per virtual batch
    module.eval()
    x = data((5,) + shape[1:], seed=7)  # inference: any batch size, the running statistics
    np.testing.assert_allclose(_np(module(x)), reference.batch_norm(_np(x), rm, rv, w, b)[0], **TIGHT)


def test_gradients_are_each_virtual_batchs(policy):
    module = randomize(nkt.BatchNorm2d(3, virtual_batch_size=2, dtype=F64))
    x = data((6, 3, 4, 2)).requires_grad_()
    up = data((6, 3, 4, 2), seed=1)
    (module(x) * up).sum().backward()
    w = _np(module.weight)
    parts = [reference.batch_norm_grad(_np(x)[i:i + 2], _np(up)[i:i + 2], w) for i in range(0, 6, 2)]
    np.testing.assert_allclose(_np(x.grad), np.concatenate([p[0] for p in parts]), **TIGHT)
    np.testing.assert_allclose(_np(module.weight.grad), sum(p[1] for p in parts), **TIGHT)
    np.testing.assert_allclose(_np(module.bias.grad), sum(p[2] for p in parts), **TIGHT)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 4, 4)])
def test_one_virtual_batch_is_plain_batch_norm_bit_for_bit(shape, policy):
    cls = nkt.BatchNorm1d if len(shape) == 2 else nkt.BatchNorm2d
    ghost, plain = randomize(cls(3, virtual_batch_size=8)), randomize(cls(3))
    x = data(shape, dtype=torch.float32)
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    for a, b in zip(ghost.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_constructor_repr_and_state_dict():
    for cls, torch_cls in [(nkt.BatchNorm2d, nn.BatchNorm2d), (nkt.LazyBatchNorm1d, nn.LazyBatchNorm1d),
                           (nkt.BatchNorm, nn.modules.batchnorm._BatchNorm)]:
        ours = inspect.signature(cls).parameters
        assert list(ours)[:-1] == list(inspect.signature(torch_cls).parameters)
        assert ours["virtual_batch_size"].kind is inspect.Parameter.KEYWORD_ONLY and ours["virtual_batch_size"].default is None
    module, twin = nkt.BatchNorm2d(3, virtual_batch_size=4), nn.BatchNorm2d(3)
    assert repr(module) == repr(twin)[:-1] + ", virtual_batch_size=4)"
    assert repr(nkt.BatchNorm2d(3)) == repr(twin)
    assert list(module.state_dict()) == list(twin.state_dict())
    module.load_state_dict(randomize(twin).state_dict(), strict=True)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert clone.virtual_batch_size == 4
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).virtual_batch_size == 4
    with pytest.raises(TypeError):  # keyword-only: torch.nn's positional arguments keep their places
        nkt.BatchNorm2d(3, 1e-5, 0.1, True, True, None, None, 4)


@pytest.mark.parametrize("value,error,match", [
    (0, ValueError, "got 0"), (2.0, TypeError, "got float 2.0"), (True, TypeError, "got bool"),
])
def test_bad_virtual_batch_size_is_refused_by_name(value, error, match):
    with pytest.raises(error, match=f"virtual_batch_size must be None or a positive int.*{match}"):
        nkt.BatchNorm1d(3, virtual_batch_size=value)


def test_batch_not_divisible_names_both_numbers(policy):
    module = nkt.BatchNorm1d(3, virtual_batch_size=4, dtype=F64)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size .* batch of 6 samples"):
        module(data((6, 3)))
    module.eval()
    assert module(data((6, 3))).shape == (6, 3)


# ---------------------------------------------------------------- deployment paths


def test_fx_records_a_ghost_module_as_a_leaf(policy):
    model = nn.Sequential(nn.Conv2d(3, 3, 1, dtype=F64), nkt.BatchNorm2d(3, virtual_batch_size=2, dtype=F64))
    graph_module = torch.fx.symbolic_trace(copy.deepcopy(model))
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]  # not "1.torch_twin": torch.nn's BatchNorm2d has no virtual batches
    x = data((4, 3, 5, 5))
    torch.testing.assert_close(graph_module(x), model(x), **TIGHT)
    with pytest.raises(AttributeError):
        model[1].torch_twin


def test_torchscript_runs_eval_and_refuses_training():
    module = randomize(nkt.BatchNorm2d(3, virtual_batch_size=2, dtype=F64))
    scripted = torch.jit.script(copy.deepcopy(module))
    with pytest.raises(torch.jit.Error, match="virtual_batch_size .* does not run in TorchScript"):
        scripted(data((4, 3, 2, 2)))
    scripted.eval()
    module.eval()
    x = data((5, 3, 2, 2))
    torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=0)


def test_compile_fullgraph_and_export_with_a_batch_multiple_of_v():
    """torch.compile(fullgraph=True) and torch.export with the batch ``2 * Dim("g")`` (a dynamic batch is a multiple
    of V) train as eagerly: outputs and running statistics (ghost training runs the core under either policy)."""
    from torch.export import Dim, export

    model = nn.Sequential(nn.Conv2d(3, 4, 1, dtype=F64), nkt.BatchNorm2d(4, virtual_batch_size=2, dtype=F64))
    randomize(model)
    eager, compiled = copy.deepcopy(model), torch.compile(copy.deepcopy(model), fullgraph=True)
    x = data((6, 3, 4, 4))
    torch.testing.assert_close(compiled(x), eager(x), **TIGHT)
    program = export(copy.deepcopy(model), (x,), dynamic_shapes=({0: 2 * Dim("g", min=2, max=16)},)).module()
    eager = copy.deepcopy(model)
    for n in (4, 10):
        x = data((n, 3, 4, 4), seed=n)
        torch.testing.assert_close(program(x), eager(x), **TIGHT)
    ours, theirs = program.state_dict(), eager.state_dict()  # an exported program lists its state in its own order
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], msg=k, **TIGHT)


def test_to_torch_keeps_and_qat_fusion_refuses_a_ghost_module():
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nkt.BatchNorm2d(4, virtual_batch_size=2), nn.ReLU())
    assert type(nkt.to_torch(copy.deepcopy(model))[1]) is nkt.BatchNorm2d  # torch.nn has no ghost batch norm
    with pytest.raises(TypeError, match=r"BatchNorm2d\(virtual_batch_size=2\) cannot be fused for quantization"):
        fuse_modules_qat(copy.deepcopy(model).train(), [["0", "1", "2"]])
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])(x), model(x))
