"""Deployment paths, taken as a user takes them with torch.nn's modules, each compared with torch.nn's result.

TorchScript (script, save, load in a fresh process without normkit), torch.fx (symbolic_trace, fuse,
FX post-training quantization), eager-mode fusers (fuse_modules, fuse_modules_qat), torch.export with
a dynamic batch, torch.compile(dynamic=True) graph counts, ONNX (both exporters, run by onnxruntime),
and eps=0 as torch.nn takes it.

By design three of these paths compute with torch's operators under either kernel policy: a scripted
module runs ``torch.nn.functional``, an FX graph and torch's fusers hold the torch.nn twin (same
Parameters and buffers), an ONNX export records torch's operators. Those tests assert the result is
exactly (bit for bit) torch.nn's, under both policies; the others run each policy's own math.
"""

from __future__ import annotations

import copy
import functools
import io
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import normkit_torch as nkt
import normkit_torch.functional as NF
from conftest import F64, assert_state_equal, data, randomize

pytestmark = pytest.mark.filterwarnings(  # torch 2.13 deprecates both; users still take these paths
    "ignore:`torch.jit:DeprecationWarning", "ignore:torch.ao.quantization is deprecated:DeprecationWarning"
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: the core and torch's kernels differ by a few ulps
EXACT = dict(rtol=0.0, atol=0.0)


def _twin(module: nn.Module) -> nn.Module:
    """A torch.nn copy of ``module`` (every normkit module with a torch.nn twin converted), same state."""
    return nkt.to_torch(copy.deepcopy(module))


def _same_state(a: nn.Module, b: nn.Module, **tol) -> None:
    """Equal state_dicts, whatever order each lists its entries in (an exported program's order is its own)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k, **tol)


def _steps(module: nn.Module, inputs, modes=("train", "train", "eval")) -> list[torch.Tensor]:
    outs = []
    for mode, x in zip(modes, inputs):
        getattr(module, mode)()
        outs.append(module(x))
    return outs


# ---------------------------------------------------------------- TorchScript


def _lazy(cls, shape):
    module = cls(dtype=F64)
    module(data(shape))  # materialized: becomes its non-lazy class
    return module


SCRIPTABLE = [  # (id, factory, input shape)
    ("BatchNorm1d", lambda: nkt.BatchNorm1d(3, dtype=F64), (4, 3)),
    ("BatchNorm1d-cumulative", lambda: nkt.BatchNorm1d(3, momentum=None, dtype=F64), (4, 3, 5)),
    ("BatchNorm2d", lambda: nkt.BatchNorm2d(3, dtype=F64), (4, 3, 5, 6)),
    ("BatchNorm2d-batch-stats", lambda: nkt.BatchNorm2d(3, track_running_stats=False, dtype=F64), (4, 3, 5, 6)),
    ("BatchNorm3d", lambda: nkt.BatchNorm3d(3, affine=False, dtype=F64), (2, 3, 4, 3, 5)),
    ("LazyBatchNorm2d", lambda: _lazy(nkt.LazyBatchNorm2d, (4, 3, 5, 6)), (4, 3, 5, 6)),
    ("BatchNorm-any-rank", lambda: nkt.BatchNorm(3, dtype=F64), (2, 3, 4, 3, 2, 2)),
    ("InstanceNorm1d", lambda: nkt.InstanceNorm1d(3, dtype=F64), (4, 3, 7)),
    ("InstanceNorm2d", lambda: nkt.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=F64), (2, 3, 5, 6)),
    ("InstanceNorm3d-unbatched", lambda: nkt.InstanceNorm3d(3, dtype=F64), (3, 4, 3, 5)),
    ("LazyInstanceNorm2d", lambda: _lazy(nkt.LazyInstanceNorm2d, (2, 3, 5, 6)), (2, 3, 5, 6)),
    ("LayerNorm", lambda: nkt.LayerNorm((5, 6), dtype=F64), (4, 5, 6)),
    ("GroupNorm", lambda: nkt.GroupNorm(3, 6, dtype=F64), (4, 6, 5)),
    ("RMSNorm", lambda: nkt.RMSNorm(6, dtype=F64), (4, 5, 6)),
]


@pytest.mark.parametrize("make,shape", [p[1:] for p in SCRIPTABLE], ids=[p[0] for p in SCRIPTABLE])
def test_script_is_torch_nn_and_leaves_the_model_alone(make, shape, policy):
    """torch.jit.script of every normkit module class: the scripted module computes exactly what the scripted
    torch.nn twin does (outputs and running statistics, bit for bit) in training and in eval, equals the
    eager module (under "core" within float64 round-off), and scripting does not swap the eager module."""
    ours = randomize(make())
    twin = _twin(ours)
    eager = copy.deepcopy(ours)
    scripted, scripted_twin = torch.jit.script(ours), torch.jit.script(twin)
    assert type(ours).__module__.startswith("normkit_torch")  # not replaced by scripting
    assert scripted.original_name == type(ours).__name__
    inputs = [data(shape, seed=s) for s in range(3)]
    for got, want, reference in zip(_steps(scripted, inputs), _steps(scripted_twin, inputs), _steps(eager, inputs)):
        torch.testing.assert_close(got, want, **EXACT)
        torch.testing.assert_close(got, reference, **TIGHT)
    assert_state_equal(scripted, scripted_twin, **EXACT)
    assert_state_equal(ours, eager, **TIGHT)  # the scripted module trained the module's own tensors


def _fitted(cls, **kwargs):
    return cls(3, axis=1, dtype=F64, **kwargs).fit(data((50, 3, 4)))


TWINLESS = [  # (id, factory, input shape): scripted with torch operators, compared with the eager module
    ("FrozenBatchNorm2d", lambda: nkt.FrozenBatchNorm2d(3, dtype=F64), (4, 3, 5, 6)),
    ("FrozenBatchNorm-any-rank", lambda: nkt.FrozenBatchNorm(3, dtype=F64), (4, 3, 5)),
    ("BatchRenorm2d-eval", lambda: nkt.BatchRenorm2d(3, dtype=F64).eval(), (4, 3, 5, 6)),
    ("Standardize", lambda: _fitted(nkt.Standardize), (6, 3, 4)),
    ("MinMaxScale", lambda: _fitted(nkt.MinMaxScale, feature_range=(-1.0, 2.0)), (6, 3, 4)),
]


@pytest.mark.parametrize("make,shape", [p[1:] for p in TWINLESS], ids=[p[0] for p in TWINLESS])
def test_script_twinless_modules(make, shape):
    """The modules without a torch.nn twin script too (their math does not depend on the kernel policy)."""
    ours = make()
    if not isinstance(ours, (nkt.Standardize, nkt.MinMaxScale)):  # fitted scalers keep their statistics
        randomize(ours)
    scripted = torch.jit.script(ours)
    x = data(shape, seed=3)
    torch.testing.assert_close(scripted(x), ours(x), **TIGHT)


def test_script_limits_are_explicit():
    """BatchRenorm scripts for inference (its training step raises in the scripted module); SyncBatchNorm does not
    script, as torch.nn.SyncBatchNorm does not (torch 2.13), with an error that says what to do; an unfitted
    scaler raises in the scripted module as in the eager one."""
    renorm = torch.jit.script(nkt.BatchRenorm2d(3).train())
    with pytest.raises(torch.jit.Error, match="runs inference only"):
        renorm(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="SyncBatchNorm cannot be scripted"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nkt.SyncBatchNorm(3)))
    with pytest.raises(RuntimeError):
        torch.jit.script(nn.SyncBatchNorm(3))
    with pytest.raises(torch.jit.Error, match="Standardize is not fitted"):
        torch.jit.script(nkt.Standardize(3))(torch.randn(2, 3))


_LOAD_IN_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    model = torch.jit.load(sys.argv[1])
    x1, x2 = torch.load(sys.argv[2])
    model.train(); y1 = model(x1)
    model.eval(); y2 = model(x2)
    assert not any(name.startswith("normkit") for name in sys.modules), "normkit was imported"
    torch.save((y1, y2, dict(model.state_dict())), sys.argv[3])
""")


class _DeployNet(nn.Module):
    """A conv net with every scriptable module kind (scaler, batch/group/instance/layer/RMS norm, frozen BN)."""

    def __init__(self, lib) -> None:
        super().__init__()
        self.scale = nkt.Standardize(3, axis=1, dtype=F64).fit(data((20, 3, 6, 6), seed=9))
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=F64)
        self.bn = lib.BatchNorm2d(4, dtype=F64)
        self.gn = lib.GroupNorm(2, 4, dtype=F64)
        self.inorm = lib.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=F64)
        self.ln = lib.LayerNorm(6, dtype=F64)
        self.rms = lib.RMSNorm(6, dtype=F64)
        self.frozen = nkt.FrozenBatchNorm2d(4, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(self.scale(x))))
        return self.frozen(self.rms(self.ln(self.inorm(self.gn(x)))))


def test_scripted_model_saves_and_loads_in_a_fresh_process(tmp_path):
    """torch.jit.save, then torch.jit.load in a new interpreter that never imports normkit: the loaded model
    trains a step and evaluates exactly as the scripted torch.nn model does here."""
    torch.manual_seed(0)
    ours = randomize(_DeployNet(nkt))
    twin = torch.jit.script(_twin(ours))
    torch.jit.save(torch.jit.script(ours), tmp_path / "model.pt")
    x1, x2 = data((4, 3, 6, 6), seed=1), data((2, 3, 6, 6), seed=2)
    torch.save((x1, x2), tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(tmp_path / "model.pt"),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True, timeout=120)
    y1, y2, state = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(y1, twin.train()(x1), **EXACT)
    torch.testing.assert_close(y2, twin.eval()(x2), **EXACT)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(state[name], value, **EXACT, msg=name)


# ---------------------------------------------------------------- torch.fx


class _FxNet(nn.Module):
    """Every module kind, those with a torch.nn twin and those without (leaves at their own path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=F64)
        self.bn = nkt.BatchNorm2d(4, dtype=F64)
        self.gn = nkt.GroupNorm(2, 4, dtype=F64)
        self.inorm = nkt.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=F64)
        self.ln = nkt.LayerNorm(6, dtype=F64)
        self.rms = nkt.RMSNorm(6, dtype=F64)
        self.any_rank = nkt.BatchNorm(4, dtype=F64)
        self.sync = nkt.SyncBatchNorm(4, dtype=F64)
        self.frozen = nkt.FrozenBatchNorm2d(4, dtype=F64)
        self.scale = nkt.Standardize(4, axis=1, dtype=F64).fit(data((10, 4, 6, 6)))
        self.w = nn.Parameter(torch.ones(6, dtype=F64) * 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rms(self.ln(self.inorm(self.gn(torch.relu(self.bn(self.conv(x)))))))
        x = self.scale(self.frozen(self.sync(self.any_rank(x))))
        return NF.layer_norm(x, (6,), self.w)  # the functional API: one call_function node


def test_fx_symbolic_trace(policy):
    """symbolic_trace: each module with a torch.nn twin is one call of the twin (exact type, same tensors),
    the others are leaves, the functional API one node; the GraphModule computes exactly what the model with
    those modules swapped for torch.nn's does, trains the model's own buffers, and equals the eager normkit
    model (policy "core": within float64 round-off)."""
    torch.manual_seed(0)
    model = randomize(_FxNet())
    eager, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    for name in ("bn", "gn", "inorm", "ln", "rms"):  # the modules with a torch.nn twin; the rest stay normkit's
        setattr(torch_model, name, nkt.to_torch(getattr(torch_model, name)))
    gm = torch.fx.symbolic_trace(model)
    called = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert called["bn.torch_twin"] is nn.BatchNorm2d and called["gn.torch_twin"] is nn.GroupNorm
    assert called["inorm.torch_twin"] is nn.InstanceNorm2d and called["ln.torch_twin"] is nn.LayerNorm
    assert called["rms.torch_twin"] is nn.RMSNorm and called["sync"] is nkt.SyncBatchNorm
    assert called["any_rank"] is nkt.BatchNorm and called["frozen"] is nkt.FrozenBatchNorm2d
    assert called["scale"] is nkt.Standardize
    assert gm.get_submodule("bn.torch_twin").running_mean is model.bn.running_mean
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][-1] is NF.layer_norm
    inputs = [data((4, 3, 6, 6), seed=s) for s in range(3)]
    for got, want, reference in zip(_steps(gm, inputs), _steps(torch_model, inputs), _steps(eager, inputs)):
        torch.testing.assert_close(got, want, **EXACT)
        torch.testing.assert_close(got, reference, **TIGHT)
    assert_state_equal(model, eager, **TIGHT)


def test_fx_trace_keeps_an_uninitialized_lazy_module_a_leaf(policy):
    """As torch.nn's: the GraphModule calls the Lazy module itself, which materializes on its first real input."""
    results = []
    for lib in (nkt, nn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1, dtype=F64), lib.LazyBatchNorm2d(dtype=F64),
                              lib.LazyInstanceNorm1d(dtype=F64))
        model[2] = nn.Sequential(nn.Flatten(2), model[2])
        gm = torch.fx.symbolic_trace(model)
        assert isinstance(gm.get_submodule("1"), nn.LazyBatchNorm2d) and gm.get_submodule("1") is model[1]
        results.append((gm(data((4, 3, 5, 6))), type(gm.get_submodule("1")).__name__))
    torch.testing.assert_close(results[0][0], results[1][0], **TIGHT)
    assert results[0][1] == results[1][1] == "BatchNorm2d"


def _conv_bn_net(lib) -> nn.Module:
    torch.manual_seed(0)
    return randomize(nn.Sequential(nn.Conv2d(3, 8, 3), lib.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                   lib.BatchNorm2d(4))).eval()


def test_fx_fuse_folds_conv_and_normkit_batch_norm():
    """torch.fx.experimental.optimization.fuse folds conv + normkit BatchNorm2d as it folds torch.nn's."""
    from torch.fx.experimental.optimization import fuse

    ours, theirs = fuse(_conv_bn_net(nkt)), fuse(_conv_bn_net(nn))
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:] == [nn.Conv2d, nn.ReLU,
                                                                                              nn.Conv2d]
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(ours(x), theirs(x), **EXACT)


def test_fx_quantization_matches_torch_nn():
    """prepare_fx / convert_fx (default qconfig mapping, native backend config) on conv-bn-relu-conv-bn: the
    same fused, quantized model as with torch.nn.BatchNorm2d, the same quantized outputs."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.backend_config import get_native_backend_config
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    x = torch.randn(4, 3, 10, 10)
    quantized = []
    for lib in (nkt, nn):
        prepared = prepare_fx(_conv_bn_net(lib), get_default_qconfig_mapping(), (x,),
                              backend_config=get_native_backend_config())
        for seed in range(3):
            prepared(torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(seed)))
        quantized.append(convert_fx(prepared))
    ours, theirs = quantized
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]
    assert "torch.ao.nn.intrinsic.quantized" in type(ours.get_submodule("0")).__module__  # conv-bn-relu fused
    assert ours.code == theirs.code
    torch.testing.assert_close(ours(x), theirs(x), **EXACT)


# ---------------------------------------------------------------- eager quantization fusers

FUSIONS = [  # (id, modules before the batch norm, normkit/torch batch norm class name, after, input shape)
    ("conv2d-bn-relu", lambda: [nn.Conv2d(3, 4, 3)], "BatchNorm2d", [nn.ReLU], (2, 3, 6, 6)),
    ("conv1d-bn", lambda: [nn.Conv1d(3, 4, 3)], "BatchNorm1d", [], (2, 3, 6)),
    ("conv3d-bn-relu", lambda: [nn.Conv3d(3, 4, 2)], "BatchNorm3d", [nn.ReLU], (2, 3, 4, 4, 4)),
    ("linear-bn", lambda: [nn.Linear(3, 4)], "BatchNorm1d", [], (5, 3)),
    ("convtranspose2d-bn", lambda: [nn.ConvTranspose2d(3, 4, 2)], "BatchNorm2d", [], (2, 3, 4, 4)),
    ("bn-relu", lambda: [], "BatchNorm2d", [nn.ReLU], (2, 4, 3, 3)),
]


@pytest.mark.parametrize("before,bn,after,shape", [f[1:] for f in FUSIONS], ids=[f[0] for f in FUSIONS])
def test_fuse_modules_accept_normkit_batch_norm(before, bn, after, shape):
    """fuse_modules (eval) and fuse_modules_qat (train) fuse normkit's BatchNorm1d/2d/3d as torch.nn's (no
    call to make first): the same fused module types, the same folded outputs; the QAT module holds the normkit
    module's own Parameters and buffers (inside its torch.nn twin)."""
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    torch.manual_seed(0)
    first = before()
    theirs = randomize(nn.Sequential(*first, getattr(nn, bn)(4), *(a() for a in after)))
    ours = copy.deepcopy(theirs)
    ours[len(first)] = getattr(nkt, bn)(4)
    ours[len(first)].load_state_dict(theirs[len(first)].state_dict())
    names = [[str(i) for i in range(len(theirs))]]
    x = torch.randn(shape)
    fused = [fuse_modules(copy.deepcopy(m).eval(), names) for m in (ours, theirs)]
    assert [type(m) for m in fused[0].modules()] == [type(m) for m in fused[1].modules()]
    torch.testing.assert_close(fused[0](x), fused[1](x), **EXACT)
    bn_module = ours[len(first)]
    qat = []
    for m in (ours, theirs):
        try:
            qat.append(fuse_modules_qat(m.train(), names, inplace=True))
        except Exception as error:  # noqa: BLE001 - compared with torch's own below
            qat.append(error)
    if isinstance(qat[1], Exception):  # torch's own limit (conv-transpose + bn in QAT): the same error
        assert type(qat[0]) is type(qat[1]) and str(qat[0]) == str(qat[1])
        return
    assert [type(m) for m in qat[0].modules()] == [type(m) for m in qat[1].modules()]
    twin = [m for m in qat[0].modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)][0]
    assert twin.weight is bn_module.weight and twin.running_var is bn_module.running_var


# ---------------------------------------------------------------- torch.export and torch.compile(dynamic=True)


class _ExportNet(nn.Module):
    """A conv net with every normkit module kind that computes (scalers, batch/renorm/frozen/sync/any-rank batch
    norm, group, instance, layer and RMS norm, the cumulative-average batch norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nkt.MinMaxScale(3, axis=1, dtype=F64).fit(data((10, 3, 8, 8)))
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=F64)
        self.norms = nn.Sequential(
            nkt.BatchNorm2d(4, dtype=F64), nkt.BatchNorm2d(4, momentum=None, dtype=F64),
            nkt.BatchNorm(4, dtype=F64), nkt.SyncBatchNorm(4, dtype=F64), nkt.BatchRenorm2d(4, dtype=F64),
            nkt.FrozenBatchNorm2d(4, dtype=F64), nkt.GroupNorm(2, 4, dtype=F64),
            nkt.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=F64),
            nkt.LayerNorm(64, dtype=F64), nkt.RMSNorm(64, dtype=F64),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms(self.conv(self.scale(x)))


@pytest.mark.parametrize("mode,dim", [("train", "range"), ("train", "auto"), ("eval", "range")])
def test_export_dynamic_batch(mode, dim, policy):
    """torch.export.export at 8x3x64x64 with the batch Dim("b", min=2, max=64) or Dim.AUTO: the program runs at
    batch 3 and 16 and equals the eager model, outputs and running statistics (float64 round-off). Training
    is the mode that specialized the batch (the core's statistics count); eval runs the same code minus it."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    model = getattr(randomize(_ExportNet()), mode)()
    eager = copy.deepcopy(model)
    batch = Dim("b", min=2, max=64) if dim == "range" else Dim.AUTO
    program = export(model, (data((8, 3, 64, 64)),), dynamic_shapes=({0: batch},)).module()
    for seed, n in enumerate((3, 16)):
        x = data((n, 3, 64, 64), seed=seed)
        torch.testing.assert_close(program(x), eager(x), **TIGHT)
    _same_state(program, eager, **TIGHT)


def _graph_count(lib) -> tuple[int, int]:
    """(graphs torch.compile(dynamic=True) builds for batches 2..32, calls that ran a compiled graph), counted by
    the backend: a batch Dynamo gave up on (recompile limit) runs eagerly and is missing from the calls."""
    torch._dynamo.reset()
    graphs, calls = [], []

    def backend(gm: torch.fx.GraphModule, _: list) -> object:
        graphs.append(gm)
        return lambda *args: calls.append(1) or gm.forward(*args)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), lib.BatchNorm2d(4), nn.ReLU(), lib.GroupNorm(2, 4),
                          lib.InstanceNorm2d(4, affine=True, track_running_stats=True), lib.LayerNorm(8),
                          lib.RMSNorm(8))
    compiled = torch.compile(model, dynamic=True, backend=backend)
    try:
        for n in range(2, 33):
            compiled(torch.randn(n, 3, 8, 8))
    finally:
        torch._dynamo.reset()
    return len(graphs), len(calls)


@functools.cache
def _torch_nn_graph_count() -> tuple[int, int]:
    return _graph_count(nn)


def test_compile_dynamic_builds_no_more_graphs_than_torch_nn(policy):
    graphs, calls = _graph_count(nkt)
    torch_graphs, torch_calls = _torch_nn_graph_count()
    assert 1 <= graphs <= torch_graphs and calls == torch_calls == 31


# ---------------------------------------------------------------- ONNX


class _OnnxNet(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.in2 = lib.InstanceNorm2d(4, affine=True)
        self.gn = lib.GroupNorm(2, 4)
        self.bn = lib.BatchNorm2d(4)
        self.ln = lib.LayerNorm(6)
        self.in1 = lib.InstanceNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(self.bn(self.gn(self.in2(x))))
        return self.in1(y.flatten(2)).reshape(x.shape)


def _onnx(model: nn.Module, x: torch.Tensor, dynamo: bool):
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@functools.cache
def _torch_nn_onnx_ops(dynamo: bool) -> tuple[str, ...]:
    torch.manual_seed(0)
    return tuple(n.op_type for n in _onnx(randomize(_OnnxNet(nn)).eval(), torch.randn(2, 4, 5, 6), dynamo).graph.node)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_has_torch_nn_fused_nodes(dynamo, policy):
    """Both exporters, both policies: the graph's node types are torch.nn's, in order (LayerNormalization,
    InstanceNormalization, BatchNormalization: the fused nodes runtimes optimize), and onnxruntime gives the
    eager normkit model's outputs (float32: within 1e-5, ~80 ulps of outputs of magnitude below 4)."""
    import onnxruntime

    torch.manual_seed(0)
    model = randomize(_OnnxNet(nkt)).eval()
    x = torch.randn(2, 4, 5, 6) * 3.0 + 1.0
    proto = _onnx(model, x, dynamo)
    ops = tuple(n.op_type for n in proto.graph.node)
    assert ops == _torch_nn_onnx_ops(dynamo)
    assert {"LayerNormalization", "InstanceNormalization", "BatchNormalization"} <= set(ops)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- eps as torch.nn takes it


EPS_MODULES = [  # (id, normkit class, torch class, args, kwargs, input shape, mode)
    ("BatchNorm2d-eval", "BatchNorm2d", (3,), {}, (4, 3, 5, 6), "eval"),
    ("InstanceNorm2d", "InstanceNorm2d", (3,), {"affine": True}, (4, 3, 5, 6), "train"),
    ("LayerNorm", "LayerNorm", (6,), {}, (4, 5, 6), "train"),
    ("GroupNorm", "GroupNorm", (3, 6), {}, (4, 6, 5), "train"),
    ("RMSNorm", "RMSNorm", (6,), {}, (4, 5, 6), "train"),
]


@pytest.mark.parametrize("name,args,kwargs,shape,mode", [e[1:] for e in EPS_MODULES], ids=[e[0] for e in EPS_MODULES])
def test_eps_zero_as_torch_nn(name, args, kwargs, shape, mode, policy):
    """eps=0 is accepted where torch.nn accepts it (the family, batch norm in eval) with torch.nn's outputs."""
    theirs = randomize(getattr(nn, name)(*args, eps=0.0, dtype=F64, **kwargs))
    ours = getattr(nkt, name)(*args, eps=0.0, dtype=F64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    getattr(ours, mode)(), getattr(theirs, mode)()
    x = data(shape)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


def test_batch_norm_eps_rules_as_torch(policy):
    """Batch norm keeps torch's rules and messages: eps > 0 in training, eps >= 0 in eval."""
    x = data((4, 3, 5))
    for mode, eps, message in (("train", 0.0, "must be positive during training, but got 0.0"),
                               ("eval", -1e-5, "must be non-negative, but got -1e-05")):
        for lib in (nn, nkt):
            module = getattr(lib.BatchNorm1d(3, eps=eps, dtype=F64), mode)()
            with pytest.raises(ValueError, match=message):
                module(x)


def test_negative_eps_in_the_family(policy):
    """torch.nn's family modules take a negative eps (torch computes rsqrt(var + eps): NaN where var < -eps);
    the modules are drop-ins under both policies: "auto" is torch's kernel, and "core", whose own rule refuses
    eps < 0, hands the arguments it refuses to torch's function (issue 20: torch's checks and messages)."""
    x = data((4, 5, 6))
    theirs, ours = nn.LayerNorm(6, eps=-1e-5, dtype=F64), nkt.LayerNorm(6, eps=-1e-5, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), **EXACT)
