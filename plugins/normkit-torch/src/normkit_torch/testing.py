"""normkit_torch's conformance harness: each normkit module against its torch.nn twin and the float64 reference.

The shared suite (``normkit.testing.conformance.CHECKS``) runs over ``TorchHarness().cases()`` under
both kernel policies (torch's kernels, the normkit core); everything crossing this harness's edges is
a NumPy array, named as torch's state_dict names it. Every case has random weight, bias and running
statistics (at the data's offset: float32 cases at 1e4 test inference centring) and float64
reference gradients.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import normkit_torch as nkt
from normkit.testing import reference
from normkit.testing.conformance import LayerCase
from normkit_torch._convert import constructor_kwargs

__all__ = ["TorchHarness", "CountCollectives", "end_process_group", "run_gloo_workers"]

State = dict[str, np.ndarray]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _randomize(module: nn.Module, offset: float) -> nn.Module:
    """Deterministic non-trivial state, the same on both twins, so affine or statistics bugs cannot hide:
    weight 1 + 0.5 N(0, 1), bias 0.5 N(0, 1), running statistics near the data's (mean offset + 0.5,
    variance 4: the generated input is offset + 0.5 + 2 N(0, 1)), so inference at a large offset
    centres on statistics at that offset."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", offset + 0.5), ("running_var", 4.0)):
            t = getattr(module, name, None)
            if t is None:
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name == "running_var":
                noise = noise.abs()
            t.copy_((value + 0.5 * noise).to(t.dtype))
    return module


def _pair(ours: type, native: type, args: tuple, kwargs: dict, dtype: str, offset: float) -> tuple[Callable, Callable]:
    def build(cls: type) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            return _randomize(cls(*args, **kwargs, dtype=_DTYPES[dtype]), offset)

        return make

    return build(ours), build(native)


def _kwargs_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


# --- float64 references under torch's state names --------------------------------------------------


def _get(state: State, name: str) -> Optional[np.ndarray]:
    return state.get(name)


def _batch_norm_reference(momentum: Optional[float], eps: float, track: bool) -> Callable:
    def ref(x: np.ndarray, state: State, training: bool) -> tuple[np.ndarray, State]:
        w, b = _get(state, "weight"), _get(state, "bias")
        if not track:  # no running statistics: batch statistics in both modes
            y, _, _ = reference.batch_norm(x, None, None, w, b, training=True, eps=eps, axis=1)
            return y, {}
        if not training:
            y, _, _ = reference.batch_norm(x, state["running_mean"], state["running_var"], w, b,
                                           training=False, eps=eps, axis=1)
            return y, {}
        nbt = float(state["num_batches_tracked"]) + 1.0
        m = 1.0 / nbt if momentum is None else momentum
        y, rm, rv = reference.batch_norm(x, state["running_mean"], state["running_var"], w, b,
                                         training=True, momentum=m, eps=eps, axis=1, correction=1)
        return y, {"running_mean": rm, "running_var": rv, "num_batches_tracked": np.asarray(nbt)}

    return ref


def _instance_norm_reference(momentum: Optional[float], eps: float, track: bool) -> Callable:
    def ref(x: np.ndarray, state: State, training: bool) -> tuple[np.ndarray, State]:
        w, b = _get(state, "weight"), _get(state, "bias")
        if track and not training:  # inference with the running statistics
            y, _, _ = reference.batch_norm(x, state["running_mean"], state["running_var"], w, b,
                                           training=False, eps=eps, axis=1)
            return y, {}
        y = reference.instance_norm(x, w, b, axis=1, eps=eps)
        if not track:
            return y, {}
        spatial = tuple(range(2, x.ndim))
        mean = x.mean(axis=spatial).mean(axis=0)
        unbiased = x.var(axis=spatial, ddof=1).mean(axis=0)
        m = 0.0 if momentum is None else momentum
        return y, {
            "running_mean": (1 - m) * state["running_mean"] + m * mean,
            "running_var": (1 - m) * state["running_var"] + m * unbiased,
        }

    return ref


def _layer_norm_reference(ndim: int, eps: float) -> Callable:
    def ref(x: np.ndarray, state: State, training: bool) -> tuple[np.ndarray, State]:
        axes = tuple(range(-ndim, 0))
        return reference.layer_norm(x, _get(state, "weight"), _get(state, "bias"), axis=axes, eps=eps), {}

    return ref


def _group_norm_reference(groups: int, eps: float) -> Callable:
    def ref(x: np.ndarray, state: State, training: bool) -> tuple[np.ndarray, State]:
        return reference.group_norm(x, groups, _get(state, "weight"), _get(state, "bias"), axis=1, eps=eps), {}

    return ref


def _rms_norm_reference(ndim: int, eps: Optional[float], dtype: str) -> Callable:
    eps_value = float(np.finfo(dtype).eps) if eps is None else eps  # eps=None: the dtype's machine epsilon

    def ref(x: np.ndarray, state: State, training: bool) -> tuple[np.ndarray, State]:
        axes = tuple(range(-ndim, 0))
        return reference.rms_norm(x, _get(state, "weight"), axis=axes, eps=eps_value), {}

    return ref


# --- cases ----------------------------------------------------------------------------------------

_BN = {1: (nkt.BatchNorm1d, nn.BatchNorm1d), 2: (nkt.BatchNorm2d, nn.BatchNorm2d), 3: (nkt.BatchNorm3d, nn.BatchNorm3d)}
_IN = {1: (nkt.InstanceNorm1d, nn.InstanceNorm1d), 2: (nkt.InstanceNorm2d, nn.InstanceNorm2d)}

# (rank, input shape, options, dtype, data_offset); weight, bias and running statistics are random in all
_BN_CASES: list[tuple[int, tuple[int, ...], dict, str, float]] = [
    (1, (8, 5), {}, "float64", 0.0),
    (1, (8, 5), {"affine": False}, "float64", 0.0),
    (1, (8, 5), {"bias": False}, "float64", 0.0),
    (1, (8, 5), {"track_running_stats": False}, "float64", 0.0),
    (1, (8, 5), {"momentum": None}, "float64", 0.0),
    (1, (8, 5, 7), {}, "float64", 0.0),
    (1, (8, 5, 7), {"momentum": None, "affine": False}, "float64", 0.0),
    (1, (64, 5), {}, "float32", 1e4),
    (2, (4, 3, 5, 6), {}, "float64", 0.0),
    (2, (4, 3, 5, 6), {"eps": 1e-3, "momentum": 0.3}, "float64", 0.0),
    (2, (4, 3, 5, 6), {"affine": False}, "float64", 0.0),
    (2, (4, 3, 5, 6), {"bias": False}, "float64", 0.0),
    (2, (4, 3, 5, 6), {"track_running_stats": False}, "float64", 0.0),
    (2, (4, 3, 5, 6), {"momentum": None}, "float64", 0.0),
    (2, (4, 3, 5, 6), {}, "float32", 0.0),
    (2, (4, 3, 5, 6), {}, "float32", 1e4),
    (3, (2, 3, 4, 5, 6), {}, "float64", 0.0),
    (3, (2, 3, 4, 5, 6), {"track_running_stats": False, "affine": False}, "float64", 0.0),
]

# (rank, input shape, options, dtype, data_offset)
_IN_CASES: list[tuple[int, tuple[int, ...], dict, str, float]] = [
    (1, (4, 3, 7), {}, "float64", 0.0),
    (1, (4, 3, 7), {"affine": True, "track_running_stats": True}, "float64", 0.0),
    (2, (2, 3, 5, 6), {}, "float64", 0.0),
    (2, (2, 3, 5, 6), {"affine": True}, "float64", 0.0),
    (2, (2, 3, 5, 6), {"track_running_stats": True}, "float64", 0.0),
    (2, (2, 3, 5, 6), {"affine": True, "track_running_stats": True, "momentum": None}, "float64", 0.0),
    (2, (2, 3, 5, 6), {"affine": True, "track_running_stats": True}, "float32", 1e4),
]


def _named_grads(dx: np.ndarray, dw: np.ndarray, db: Optional[np.ndarray], weight: bool, bias: bool) -> tuple:
    grads = {}
    if weight:
        grads["weight"] = dw
    if bias and db is not None:
        grads["bias"] = db
    return dx, grads


def _batch_norm_reference_gradients(eps: float, affine: bool, bias: bool) -> Callable:
    """Float64 training-mode gradients under torch's parameter names."""

    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        dx, dw, db = reference.batch_norm_grad(x, upstream, state.get("weight") if affine else None, axis=1, eps=eps)
        return _named_grads(dx, dw, db, affine, affine and bias)

    return ref


def _group_norm_reference_gradients(groups: Optional[int], eps: float, affine: bool, bias: bool) -> Callable:
    """Float64 gradients of group norm (``groups`` None: one channel a group, instance norm in training)."""

    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        g = x.shape[1] if groups is None else groups
        dx, dw, db = reference.group_norm_grad(x, upstream, g, state.get("weight") if affine else None, axis=1, eps=eps)
        return _named_grads(dx, dw, db, affine, affine and bias)

    return ref


def _layer_norm_reference_gradients(ndim: int, eps: float, affine: bool, bias: bool) -> Callable:
    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        axes = tuple(range(-ndim, 0))
        dx, dw, db = reference.layer_norm_grad(x, upstream, state.get("weight") if affine else None, axis=axes, eps=eps)
        return _named_grads(dx, dw, db, affine, affine and bias)

    return ref


def _rms_norm_reference_gradients(ndim: int, eps: Optional[float], dtype: str, affine: bool) -> Callable:
    eps_value = float(np.finfo(dtype).eps) if eps is None else eps

    def ref(x: np.ndarray, upstream: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        axes = tuple(range(-ndim, 0))
        dx, dw = reference.rms_norm_grad(x, upstream, state.get("weight") if affine else None, axis=axes, eps=eps_value)
        return _named_grads(dx, dw, None, affine, False)

    return ref


def _case_id(cls: type, args: tuple, shape: tuple, opts: dict, dtype: str, offset: float) -> str:
    arg_id = "-".join(str(a) for a in args)
    suffix = f"-offset={offset:g}" if offset else ""
    return f"{cls.__name__}-{arg_id}-{'x'.join(map(str, shape))}-{_kwargs_id(opts)}-{dtype}{suffix}"


def _bn_cases() -> list[LayerCase]:
    cases = []
    for rank, shape, opts, dtype, offset in _BN_CASES:
        ours, native = _BN[rank]
        make_ours, make_native = _pair(ours, native, (shape[1],), opts, dtype, offset)
        eps = opts.get("eps", 1e-5)
        cases.append(LayerCase(
            id=_case_id(ours, (shape[1],), shape, opts, dtype, offset),
            make_normkit=make_ours, make_native=make_native, input_shape=shape,
            reference=_batch_norm_reference(opts.get("momentum", 0.1), eps, opts.get("track_running_stats", True)),
            dtype=dtype, data_offset=offset,
            reference_gradients=_batch_norm_reference_gradients(eps, opts.get("affine", True), opts.get("bias", True)),
        ))
    return cases


def _in_cases() -> list[LayerCase]:
    cases = []
    for rank, shape, opts, dtype, offset in _IN_CASES:
        ours, native = _IN[rank]
        make_ours, make_native = _pair(ours, native, (shape[1],), opts, dtype, offset)
        cases.append(LayerCase(
            id=_case_id(ours, (shape[1],), shape, opts, dtype, offset),
            make_normkit=make_ours, make_native=make_native, input_shape=shape,
            reference=_instance_norm_reference(opts.get("momentum", 0.1), 1e-5, opts.get("track_running_stats", False)),
            dtype=dtype, data_offset=offset,
            reference_gradients=_group_norm_reference_gradients(None, 1e-5, opts.get("affine", False),
                                                                opts.get("bias", True)),
        ))
    return cases


def _family_cases() -> list[LayerCase]:
    """LayerNorm, GroupNorm, RMSNorm: (classes, args, options, input shape, dtype, offset, reference, gradients)."""
    specs: list[tuple] = []
    for opts, shape, dtype, offset in (({}, (4, 5, 6), "float64", 0.0), ({"bias": False}, (4, 5, 6), "float64", 0.0),
                                       ({"elementwise_affine": False}, (4, 5, 6), "float32", 0.0),
                                       ({}, (4, 5, 6), "float32", 1e4)):
        affine = opts.get("elementwise_affine", True)
        specs.append((nkt.LayerNorm, nn.LayerNorm, ((6,),), opts, shape, dtype, offset, _layer_norm_reference(1, 1e-5),
                      _layer_norm_reference_gradients(1, 1e-5, affine, opts.get("bias", True))))
    specs.append((nkt.LayerNorm, nn.LayerNorm, ((5, 6),), {"eps": 1e-3}, (4, 5, 6), "float64", 0.0,
                  _layer_norm_reference(2, 1e-3), _layer_norm_reference_gradients(2, 1e-3, True, True)))
    for args, opts, shape, dtype, offset in (((3, 6), {}, (4, 6, 5), "float64", 0.0),
                                             ((2, 6), {"affine": False}, (2, 6, 4, 5), "float64", 0.0),
                                             ((3, 6), {}, (4, 6, 5), "float32", 1e4)):
        affine = opts.get("affine", True)
        specs.append((nkt.GroupNorm, nn.GroupNorm, args, opts, shape, dtype, offset, _group_norm_reference(args[0], 1e-5),
                      _group_norm_reference_gradients(args[0], 1e-5, affine, True)))
    for args, opts, shape, dtype, offset in ((((6,),), {}, (4, 5, 6), "float64", 0.0),
                                             (((5, 6),), {"eps": 1e-6, "elementwise_affine": False}, (4, 5, 6),
                                              "float64", 0.0),
                                             (((6,),), {}, (4, 5, 6), "float32", 1e4)):
        ndim, eps = len(args[0]), opts.get("eps")
        specs.append((nkt.RMSNorm, nn.RMSNorm, args, opts, shape, dtype, offset, _rms_norm_reference(ndim, eps, dtype),
                      _rms_norm_reference_gradients(ndim, eps, dtype, opts.get("elementwise_affine", True))))
    cases = []
    for ours, native, args, opts, shape, dtype, offset, ref, ref_grads in specs:
        make_ours, make_native = _pair(ours, native, args, opts, dtype, offset)
        cases.append(LayerCase(
            id=_case_id(ours, args, shape, opts, dtype, offset), make_normkit=make_ours, make_native=make_native,
            input_shape=shape, reference=ref, dtype=dtype, data_offset=offset, reference_gradients=ref_grads,
        ))
    return cases


class TorchHarness:
    """The ``normkit.testing.conformance.Harness`` of normkit_torch; NumPy in, NumPy out."""

    name = "torch"

    def cases(self) -> list[LayerCase]:
        return _bn_cases() + _in_cases() + _family_cases()

    def copy_state(self, src: nn.Module, dst: nn.Module) -> None:
        dst.load_state_dict(src.state_dict(), strict=True)

    def forward(self, layer: nn.Module, x: np.ndarray, training: bool) -> np.ndarray:
        layer.train(training)
        with torch.no_grad():
            return layer(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def gradients(self, layer: nn.Module, x: np.ndarray, upstream: np.ndarray) -> tuple[np.ndarray, State]:
        layer.train(True)
        layer.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        (layer(xt) * torch.from_numpy(upstream)).sum().backward()
        grads = {name: p.grad.numpy() for name, p in layer.named_parameters() if p.grad is not None}
        return xt.grad.numpy(), grads

    def state(self, layer: nn.Module) -> State:
        return {name: t.detach().cpu().numpy() for name, t in layer.state_dict().items()}

    def roundtrip(self, layer: nn.Module) -> nn.Module:
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        fresh = type(layer)(**constructor_kwargs(layer), dtype=_float_dtype(layer))
        fresh.load_state_dict(state, strict=True)
        return fresh.train(layer.training)


def _float_dtype(layer: nn.Module) -> Any:
    for t in list(layer.parameters()) + list(layer.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


_COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter", "barrier")


class CountCollectives:
    """Counts the calls to torch.distributed's public collectives inside the block (their names, in ``calls``)."""

    def __enter__(self) -> "CountCollectives":
        import torch.distributed as dist

        self.calls: list[str] = []
        self._saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
        for name, fn in self._saved.items():
            setattr(dist, name, self._counted(name, fn))
        return self

    def _counted(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def end_process_group() -> None:
    """A worker's clean end: free what still holds the group (DDP reducers), wait for every rank, then destroy it.

    Without the barrier a rank that destroys its group and exits while the other still talks to it makes gloo
    abort the other ("terminate called without an active exception", exit -6: seen once in a full test run).
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: Any, outdir: Any, deadline_s: float, env: Optional[dict], cwd: Any, world: int) -> tuple:
    """Every rank of ``worker``, killed at the deadline: (exit codes, None for killed; their output tails)."""
    import os
    import subprocess
    import sys
    import time

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    logs = [open(outdir / f"rank{r}.log", "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(outdir)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=cwd) for r in range(world)]
    end = time.monotonic() + deadline_s
    codes: list = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = ""
    for r, log in enumerate(logs):
        log.seek(0)
        text += f"--- rank {r} ---\n{log.read()[-3000:]}\n"
        log.close()
    return codes, text


def run_gloo_workers(worker: Any, outdir: Any, *, deadline_s: float, env: Optional[dict] = None, cwd: Any = None,
                     world: int = 2) -> list:
    """Run ``python WORKER RANK WORLD PORT OUTDIR`` for each rank (gloo on 127.0.0.1) and return what each saved in
    ``OUTDIR/rank{RANK}.pt``.

    Bounded: every rank is killed at ``deadline_s``. A port another process took between its choice and its use is
    retried once. Raises AssertionError with the exit codes and each rank's output when a rank is killed or does not
    exit 0, and with the traceback when a rank saved ``{"error": traceback}``.
    """
    from pathlib import Path

    for attempt in range(2):
        run_dir = Path(outdir) / f"attempt{attempt}"
        run_dir.mkdir(parents=True, exist_ok=True)
        codes, text = _launch(worker, run_dir, deadline_s, env, cwd, world)
        if codes == [0] * world or "address already in use" not in text.lower():
            break
    if None in codes:
        raise AssertionError(f"the {world} gloo workers did not finish within {deadline_s} s (killed)\n{text}")
    if codes != [0] * world:
        raise AssertionError(f"gloo workers failed with exit codes {codes}\n{text}")
    results = [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        if isinstance(res, dict) and "error" in res:
            raise AssertionError(f"rank {r} raised:\n{res['error']}")
    return results
