"""The torch plugin's kernel decision: each candidate kernel inside the normkit_torch module, against torch.nn.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/torch_kernels.py [ROUNDS] [SHAPE-FILTER,...] [DTYPE]

For every shape: time of the module computing through core / _autograd / aten / function-or-aten,
over torch.nn.BatchNorm*d's, for a training step under no_grad (fwd), forward+backward (fb) and
eval; interleaved rounds, median of paired ratios (benchmarks/run.py's harness). The numbers behind
the decision table in plugins/normkit-torch/src/normkit_torch/_plugin.py come from this script.
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "normkit-torch" / "src"))
spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent / "run.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
import normkit_torch as nkt
from normkit_torch import _functional, _autograd, _kernels
CANDS = {
    "core": (_functional.batch_norm_train, _functional.batch_norm_eval),
    "function": (_autograd.batch_norm_train, _autograd.batch_norm_eval),
    "aten": (_kernels.native_batch_norm_train, _kernels.native_batch_norm_eval),
    "hybrid": (_kernels.function_or_native_batch_norm_train, _kernels.native_batch_norm_eval),
}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
SHAPES = list(bench.TORCH_SHAPES) + [
    ("seq 32x64x1024 NCL", (32, 64, 1024), False),
    ("small dense 64x128", (64, 128), False),
    ("small 8x32x8x8 NHWC", (8, 32, 8, 8), True),
    ("mid 16x32x16x16 NCHW", (16, 32, 16, 16), False),
    ("mid 16x32x16x16 NHWC", (16, 32, 16, 16), True),
    ("vol 8x32x16x16x16 NCDHW", (8, 32, 16, 16, 16), False),
]
dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32
out = {}
for name, shape, cl in SHAPES:
    if only and not any(o in name for o in only):
        continue
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    xg = x.detach().clone().requires_grad_(True)
    ncls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)]
    ocls = {2: nkt.BatchNorm1d, 3: nkt.BatchNorm1d, 4: nkt.BatchNorm2d, 5: nkt.BatchNorm3d}[len(shape)]
    mods = {"native": ncls(c, dtype=dtype)}
    for k, (tr, ev) in CANDS.items():
        m = ocls(c, dtype=dtype)
        m._normkit_kernel = (lambda tr, ev: (lambda op, x: tr if op == "batch_norm_train" else ev))(tr, ev)
        mods[k] = m
    layout = _functional.layout_of(x)
    def fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f
    def fb(m):
        ps = [m.weight, m.bias]
        def f():
            torch.autograd.grad(m(xg), [xg, *ps], dy)
        return f
    res = {}
    for m in mods.values(): m.train()
    r = bench.interleaved({k: fwd(m) for k, m in mods.items()}, rounds)
    res["fwd"] = {k: bench.ratio(r, k, "native") for k in CANDS} | {"native_ms": r["native"][0] * 1e3}
    r = bench.interleaved({k: fb(m) for k, m in mods.items()}, rounds)
    res["fb"] = {k: bench.ratio(r, k, "native") for k in CANDS} | {"native_ms": r["native"][0] * 1e3}
    for m in mods.values(): m.eval()
    r = bench.interleaved({k: fwd(m) for k, m in mods.items()}, rounds)
    res["eval"] = {k: bench.ratio(r, k, "native") for k in CANDS} | {"native_ms": r["native"][0] * 1e3}
    out[name] = res
    print(f"{name:24s} [{layout}]", " | ".join(f"{op}: " + " ".join(f"{k}={v:.2f}" for k, v in d.items() if k in CANDS) + f" (native {d['native_ms']:.3f}ms)" for op, d in res.items()), flush=True)
print(json.dumps(out))
