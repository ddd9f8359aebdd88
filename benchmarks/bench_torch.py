"""normkit_torch benchmarks: every module against its torch.nn twin, and the functional API on torch tensors.

    python benchmarks/bench_torch.py [--quick]    # prints the goals and the markdown tables
    make bench                                     # through benchmarks/run.py

Runs in a subprocess pinned to one CPU (taskset) with one thread. Ratios are normkit / torch, the
median of interleaved per-round ratios (``run.interleaved``): below 1.0 normkit is faster. Rows
"normkit_torch" use the default kernel policy ("auto": torch's kernels); rows "core policy" force the
generic normkit core (``normkit_torch.set_kernel_policy("core")``) for the timed calls only; rows
"noise control" time torch against itself, the same way: their distance from 1.00x is the run's noise. Memory:
bytes autograd keeps between forward and backward (``saved_tensors_hooks``, one count per storage, x
included on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import THREAD_ENV, interleaved, ratio  # noqa: E402

# (module class name, constructor arguments, input shape, channels_last)
MODULES = [
    ("BatchNorm1d", (1024,), (256, 1024), False),
    ("BatchNorm2d", (256,), (8, 256, 28, 28), False),
    ("BatchNorm2d", (256,), (8, 256, 28, 28), True),
    ("BatchNorm2d", (64,), (32, 64, 56, 56), False),
    ("BatchNorm2d", (64,), (32, 64, 56, 56), True),
    ("LayerNorm", (768,), (16, 128, 768), False),
    ("GroupNorm", (32, 256), (8, 256, 28, 28), False),
    ("InstanceNorm2d", (64,), (8, 64, 56, 56), False),
    ("RMSNorm", (768,), (16, 128, 768), False),
]
QUICK_MODULES = [MODULES[i] for i in (0, 1, 2, 5, 6, 7, 8)]

# (function, input shape) for normkit.<function> against torch.nn.functional
FUNCTIONS = [
    ("batch_norm", (8, 256, 28, 28)),
    ("layer_norm", (16, 128, 768)),
    ("group_norm", (8, 256, 28, 28)),
    ("instance_norm", (8, 64, 56, 56)),
    ("rms_norm", (16, 128, 768)),
]

IMPLS = {"auto": "normkit_torch", "core": "normkit_torch, core policy", "control": "torch.nn again (noise control)"}
FN_IMPLS = {"auto": "normkit on torch tensors", "core": "normkit on torch tensors, core policy",
            "control": "torch.nn.functional again (noise control)"}


def _label(name: str, args: tuple, shape: tuple, cl: bool = False) -> str:
    layout = " NHWC" if cl else (" NCHW" if len(shape) == 4 else "")
    return f"{name}({', '.join(map(str, args))}) {'x'.join(map(str, shape))}{layout}"


def _under(policy: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` computed under ``policy`` ("native" and the default "auto" need no switch)."""
    if policy != "core":
        return fn
    import normkit_torch

    def call() -> Any:
        previous = normkit_torch.set_kernel_policy(policy)
        try:
            return fn()
        finally:
            normkit_torch.set_kernel_policy(previous)

    return call


def _saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd keeps between forward and backward, one count per storage."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _group(fns: dict, k: str, kind: str, rounds: int) -> dict:
    """``k``'s and native's ``kind`` calls interleaved with each other only (the core's large temporaries
    would disturb the calls that follow them), half the rounds in each order: the first of two
    identical torch.nn calls is measured up to 1.3x slower on some shapes (allocator), so a fixed
    order would bias the ratio. Native's timings are kept per group: each ratio compares one group."""
    a, b = f"native/{kind}", f"{k}/{kind}"
    first = interleaved({a: fns[a], b: fns[b]}, (rounds + 1) // 2)
    second = interleaved({b: fns[b], a: fns[a]}, rounds // 2 or 1)
    out = {}
    for key, name in ((b, b), (a, f"{a}@{k}")):
        per_round = first[key][1] + second[key][1]
        out[name] = (statistics.median(per_round), per_round)
    return out


def _row(group: str, config: str, impl: str, res: dict, k: str, kinds: tuple, mem: dict | None = None) -> dict:
    row = dict(part="torch", group=group, config=config, impl=impl,
               ms={kind: res[f"{k}/{kind}"][0] * 1e3 for kind in kinds},
               native_ms={kind: res[f"native/{kind}@{k}"][0] * 1e3 for kind in kinds})
    for kind in kinds:
        row[kind] = ratio(res, f"{k}/{kind}", f"native/{kind}@{k}")
    if mem is not None:
        row["mem"] = mem[k] / mem["native"]
    return row


def part_modules(rounds: int, quick: bool) -> list[dict]:
    import torch
    from torch import nn

    import normkit_torch

    torch.set_num_threads(1)
    normkit_torch.set_kernel_policy("auto")
    rows = []
    for name, args, shape, cl in QUICK_MODULES if quick else MODULES:
        torch.manual_seed(0)
        x = torch.randn(shape) * 2 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        xg = x.detach().clone().requires_grad_(True)
        extra = {"affine": True} if name.startswith("InstanceNorm") else {}
        mods = {"native": getattr(nn, name)(*args, **extra), "auto": getattr(normkit_torch, name)(*args, **extra),
                "core": getattr(normkit_torch, name)(*args, **extra), "control": getattr(nn, name)(*args, **extra)}
        fns: dict[str, Callable[[], Any]] = {}
        for k, m in mods.items():
            params = list(m.parameters())

            def fwd(m=m):
                with torch.no_grad():
                    return m(x)

            def fb(m=m, params=params):
                torch.autograd.grad(m(xg), [xg, *params], dy)

            fns[f"{k}/fwd"] = _under(k, fwd)
            fns[f"{k}/fb"] = _under(k, fb)
        res: dict = {}
        for k in ("auto", "core", "control"):
            for m in mods.values():
                m.train()
            res.update(_group(fns, k, "fwd", rounds))
            res.update(_group(fns, k, "fb", rounds))
            for m in mods.values():
                m.eval()
            res.update({key.replace("/fwd", "/eval"): v for key, v in _group(fns, k, "fwd", rounds).items()})
        for m in mods.values():
            m.train()
        mem = {k: _saved_bytes(_under(k, lambda m=m: m(xg))) for k, m in mods.items()}
        config = _label(name, args, shape, cl)
        for k in ("auto", "core", "control"):
            rows.append(_row("modules", config, IMPLS[k], res, k, ("fwd", "fb", "eval"), mem))
    return rows


def part_functional(rounds: int, quick: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F

    import normkit
    import normkit_torch

    torch.set_num_threads(1)
    normkit_torch.set_kernel_policy("auto")
    rows = []
    for name, shape in FUNCTIONS:
        torch.manual_seed(0)
        x = torch.randn(shape) * 2 + 1
        dy = torch.randn_like(x)
        xg = x.detach().clone().requires_grad_(True)
        c = shape[-1] if name in ("layer_norm", "rms_norm") else shape[1]
        w = torch.rand(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        native: dict[str, Callable[[Any], Any]] = {
            "batch_norm": lambda t: F.batch_norm(t, rm.clone(), rv.clone(), w, b, training=True),
            "layer_norm": lambda t: F.layer_norm(t, (c,), w, b),
            "group_norm": lambda t: F.group_norm(t, 32, w, b),
            "instance_norm": lambda t: F.instance_norm(t, None, None, w, b),
            "rms_norm": lambda t: F.rms_norm(t, (c,), w),
        }
        ours: dict[str, Callable[[Any], Any]] = {
            "batch_norm": lambda t: normkit.batch_norm(t, rm, rv, w, b, training=True).output,
            "layer_norm": lambda t: normkit.layer_norm(t, w, b),
            "group_norm": lambda t: normkit.group_norm(t, 32, w, b),
            "instance_norm": lambda t: normkit.instance_norm(t, None, None, w, b).output,
            "rms_norm": lambda t: normkit.rms_norm(t, w),
        }
        params = [w] if name == "rms_norm" else [w, b]
        impls = {"native": native[name], "auto": ours[name], "core": ours[name], "control": native[name]}
        fns: dict[str, Callable[[], Any]] = {}
        for k, f in impls.items():
            def fwd(f=f):
                with torch.no_grad():
                    return f(x)

            def fb(f=f):
                torch.autograd.grad(f(xg), [xg, *params], dy)

            fns[f"{k}/fwd"] = _under(k, fwd)
            fns[f"{k}/fb"] = _under(k, fb)
        res = {}
        for k in ("auto", "core", "control"):
            res.update(_group(fns, k, "fwd", rounds))
            res.update(_group(fns, k, "fb", rounds))
        mem = {k: _saved_bytes(_under(k, lambda f=f: f(xg))) for k, f in impls.items()}
        config = f"normkit.{name} {'x'.join(map(str, shape))} vs F.{name}"
        for k in ("auto", "core", "control"):
            rows.append(_row("functional", config, FN_IMPLS[k], res, k, ("fwd", "fb"), mem))
    return rows


PARTS = {"modules": part_modules, "functional": part_functional}


# ---------------------------------------------------------------- driver and report


def run_part(part: str, rounds: int, quick: bool) -> list[dict]:
    """One part in a fresh process, one CPU, one thread."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--rounds", str(rounds)] + (["--quick"] if quick else [])
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        return [dict(part="torch", group=part, config="all", impl="failed", error=last)]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def collect(rounds: int, quick: bool = False, parts: str = "modules,functional") -> list[dict]:
    rows = []
    for part in parts.split(","):
        rows += run_part(part, rounds, quick)
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def table(rows: list[dict]) -> str:
    """The torch sections of RESULTS.md."""
    sections = [
        ("modules", "torch (CPU, one thread): normkit_torch modules / torch.nn", ("fwd", "fb", "eval", "mem")),
        ("functional", "The functional API on torch tensors (CPU, one thread): normkit.* / torch.nn.functional",
         ("fwd", "fb", "mem")),
    ]
    names = {"fwd": "fwd train", "fb": "fwd+bwd", "eval": "eval fwd", "mem": "saved-for-backward memory"}
    out = []
    for group, title, kinds in sections:
        mine = [r for r in rows if r["part"] == "torch" and r.get("group") == group]
        if not mine:
            continue
        timed = [k for k in kinds if k != "mem"]
        out += ["", f"### {title}", "",
                "| module and shape | implementation | " + " | ".join(names[k] for k in kinds) + " | normkit ms | native ms |",
                "|---|---|" + "---|" * len(kinds) + "---|---|"]
        for r in mine:
            if "error" in r:
                out.append(f"| {r['config']} | {r['impl']}: {r['error'][:160]} |" + " |" * (len(kinds) + 2))
                continue
            ms = " / ".join(f"{r['ms'][k]:.2f}" for k in timed)
            nms = " / ".join(f"{r['native_ms'][k]:.2f}" for k in timed)
            out.append(f"| {r['config']} | {r['impl']} | " + " | ".join(_fmt(r.get(k)) for k in kinds) + f" | {ms} | {nms} |")
    return "\n".join(out)


def goals(rows: list[dict]) -> list[tuple[str, tuple[float, str] | None, float]]:
    """(goal, worst (ratio, config) or None, limit) for issue #12's torch targets."""
    def worst(group: str, key: str, impl: str):
        vals = [(r[key], r["config"]) for r in rows
                if r["part"] == "torch" and r.get("group") == group and r.get("impl") == impl and key in r]
        return max(vals) if vals else None

    mod, fn = IMPLS["auto"], FN_IMPLS["auto"]
    return [
        ("normkit_torch modules fwd+bwd <= 1.05x torch.nn", worst("modules", "fb", mod), 1.05),
        ("normkit_torch modules fwd train <= 1.05x torch.nn", worst("modules", "fwd", mod), 1.05),
        ("normkit_torch modules eval fwd <= 1.05x torch.nn", worst("modules", "eval", mod), 1.05),
        ("normkit_torch modules saved-for-backward memory <= 1.0x torch.nn", worst("modules", "mem", mod), 1.0),
        ("normkit.* on torch tensors fwd+bwd <= 1.2x torch.nn.functional", worst("functional", "fb", fn), 1.2),
        ("normkit.* on torch tensors saved-for-backward memory <= 1.0x", worst("functional", "mem", fn), 1.0),
        ("(the run's noise) torch against itself <= 1.05x, every module row",
         max([w for w in (worst("modules", key, IMPLS["control"]) for key in ("fwd", "fb", "eval")) if w] or [None]), 1.05),
    ]


def goal_lines(rows: list[dict]) -> list[str]:
    return [f"| {name} | not measured | - |" if w is None else
            f"| {name} | {w[0]:.2f}x ({w[1]}) | {'yes' if w[0] <= limit else 'no'} |"
            for name, w, limit in goals(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and 5 rounds")
    ap.add_argument("--part", choices=sorted(PARTS), help="run one part in this process and print JSON")
    ap.add_argument("--parts", default="modules,functional")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    if args.part:
        print(json.dumps(PARTS[args.part](rounds, args.quick)))
        return
    rows = collect(rounds, args.quick, args.parts)
    print("\n".join(["| goal | worst measured (shape) | met |", "|---|---|---|", *goal_lines(rows)]) + "\n" + table(rows))


if __name__ == "__main__":
    main()
