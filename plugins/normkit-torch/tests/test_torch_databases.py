"""torch's own test databases through normkit_torch, under both kernel policies, against torch in the same test.

- ``torch.testing._internal.common_modules.module_db``: every entry of a torch.nn normalization module.
  The normkit twin is built with the entry's constructor inputs and the torch module's (randomized)
  state; each sample input runs in training and in eval mode, in each dtype the entry lists. Outputs,
  the state afterwards, the gradients of the input and every parameter, and errors (same type, torch's
  message) must be torch's. The entry's error inputs must raise as torch does. The Lazy variants run the
  same inputs without ``num_features``.
- ``common_methods_invocations.op_db``: every sample of ``nn.functional.batch_norm`` (both variants),
  ``layer_norm``, ``group_norm``, ``instance_norm`` and ``rms_norm`` in every CPU floating dtype through
  the ``normkit_torch.functional`` namesake: output, the running buffers it updates in place, gradients,
  errors; and the op's error inputs.
- Nothing is skipped silently: every normalization entry of both databases is either driven here or in
  ``EXCLUDED`` with its reason, and each reason is asserted (the twin does not exist).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import normkit_torch as nkt
import normkit_torch.functional as NF
from conftest import POLICIES, randomize
from normkit_torch._convert import TO_NORMKIT


def _load_databases() -> tuple[list, list, Any]:
    """module_db and op_db, with the global side effects of importing torch's test utilities undone
    (common_utils freezes torch.backends flags, wraps TorchScript calls in a profiler and loads a
    hypothesis profile of its own: none of that may leak into the rest of the suite)."""
    import hypothesis

    profile = hypothesis.settings._current_profile
    script_calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    backends = importlib.import_module("torch.backends")
    flag = backends.flags_frozen()
    from torch.testing._internal import common_methods_invocations, common_modules  # noqa: E402

    torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    if not flag:
        vars(backends)["__allow_nonbracketed_mutation_flag"] = True  # disable_global_flags() undone
    if profile is not None:
        hypothesis.settings.load_profile(profile)
    return common_modules.module_db, common_methods_invocations.op_db, common_modules.ModuleErrorEnum


MODULE_DB, OP_DB, ModuleErrorEnum = _load_databases()

# --- what is driven, and what is not (each with its reason, asserted below) ---------------------------------

OPS = {  # op_db name -> the normkit_torch.functional namesake
    "nn.functional.batch_norm": NF.batch_norm,
    "nn.functional.layer_norm": NF.layer_norm,
    "nn.functional.group_norm": NF.group_norm,
    "nn.functional.instance_norm": NF.instance_norm,
    "nn.functional.rms_norm": NF.rms_norm,
}
EXCLUDED_OPS = {  # op_db entries with "norm" in the name that are not a normalization layer's functional
    "native_batch_norm": "aten internal (torch.native_batch_norm): normkit_torch.functional has no such function",
    "_native_batch_norm_legit": "aten internal: normkit_torch.functional has no such function",
    "_batch_norm_with_update": "aten internal: normkit_torch.functional has no such function",
    "native_group_norm": "aten internal: normkit_torch.functional has no such function",
    "native_layer_norm": "aten internal: normkit_torch.functional has no such function",
    "nn.functional.local_response_norm": "normkit has no local response normalization",
    "nn.functional.normalize": "Lp normalization of vectors, not a normalization layer: normkit has none",
    "masked.normalize": "Lp normalization of masked tensors: normkit has none",
    "normal": "random sampling (torch.normal), not a normalization",
    "log_normal": "random sampling, not a normalization",
    "norm": "vector/matrix norm, not a normalization",
    "renorm": "torch.renorm (clip sub-tensor norms), not a normalization layer",
    "linalg.norm": "vector/matrix norm", "linalg.matrix_norm": "matrix norm", "linalg.vector_norm": "vector norm",
    "masked.norm": "vector norm of masked tensors",
}
EXCLUDED_MODULES = {
    nn.LocalResponseNorm: "normkit has no LocalResponseNorm (torch.nn's twin table has none to drive)",
}
LAZY = {  # module_db has no Lazy entries: the Lazy twins run each entry's inputs without num_features
    nn.BatchNorm1d: (nn.LazyBatchNorm1d, nkt.LazyBatchNorm1d),
    nn.BatchNorm2d: (nn.LazyBatchNorm2d, nkt.LazyBatchNorm2d),
    nn.BatchNorm3d: (nn.LazyBatchNorm3d, nkt.LazyBatchNorm3d),
    nn.InstanceNorm1d: (nn.LazyInstanceNorm1d, nkt.LazyInstanceNorm1d),
    nn.InstanceNorm2d: (nn.LazyInstanceNorm2d, nkt.LazyInstanceNorm2d),
    nn.InstanceNorm3d: (nn.LazyInstanceNorm3d, nkt.LazyInstanceNorm3d),
}
# differences that remain, each asserted to occur (so a fix shows up as a failure to update this table)
# None today: the last one (a float16 instance-norm weight gradient 3 ulps from the float64 result) was the
# reference's, which differentiated an unrounded g (see _backward); against the same g normkit's is within 1 ulp.
KNOWN: dict[tuple[str, str], str] = {  # (policy, start of the difference's line) -> why
}
NORM_MODULES = [info for info in MODULE_DB if "norm" in info.module_cls.__name__.lower()]
DRIVEN_MODULES = [info for info in NORM_MODULES if info.module_cls not in EXCLUDED_MODULES]
NORM_OPS = [op for op in OP_DB if "norm" in op.name]
DRIVEN_OPS = [op for op in NORM_OPS if op.name in OPS]
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def test_every_normalization_entry_is_driven_or_excluded_for_its_reason():
    assert {info.module_cls for info in NORM_MODULES} - set(EXCLUDED_MODULES) == {
        info.module_cls for info in DRIVEN_MODULES}
    for info in DRIVEN_MODULES:
        assert info.module_cls in TO_NORMKIT, info.name
    for cls in EXCLUDED_MODULES:
        assert cls not in TO_NORMKIT and not hasattr(nkt, cls.__name__)
    names = {op.name for op in NORM_OPS}
    assert names == set(OPS) | set(EXCLUDED_OPS), names ^ (set(OPS) | set(EXCLUDED_OPS))
    assert {op.name for op in DRIVEN_OPS} == set(OPS)
    assert sorted(op.variant_test_name for op in DRIVEN_OPS if op.name == "nn.functional.batch_norm") == [
        "", "without_cudnn"]
    for name in EXCLUDED_OPS:
        assert not hasattr(NF, name.rpartition(".")[2])
    # the entries are torch.nn's: the twin table covers every torch.nn normalization module but these
    assert len(DRIVEN_MODULES) == 9 and len(DRIVEN_OPS) == 6


# --- running one case on each side -------------------------------------------------------------------------


class Raised:
    """What a call raised: its type and message (torch's message is the contract where torch raises)."""

    def __init__(self, error: BaseException) -> None:
        self.type, self.message = type(error), str(error)

    def __repr__(self) -> str:
        return f"{self.type.__name__}({self.message!r})"


def _attempt(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - compared against torch's
        return Raised(error)


def _fresh(t: Any, dtype: Optional[torch.dtype] = None) -> Any:
    """An independent copy of a sample argument (each side mutates its own buffers, has its own leaves);
    floating tensors converted to ``dtype`` where given (the float64 reference run)."""
    if isinstance(t, torch.Tensor):
        copy = t.detach().clone()
        if dtype is not None and copy.is_floating_point():
            copy = copy.to(dtype)
        return copy.requires_grad_(t.requires_grad)
    if isinstance(t, (list, tuple)):
        return type(t)(_fresh(v, dtype) for v in t)
    if isinstance(t, dict):
        return {k: _fresh(v, dtype) for k, v in t.items()}
    return t


def _leaves(*objs: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            found += _leaves(*obj)
        elif isinstance(obj, dict):
            found += _leaves(*obj.values())
    return found


def _backward(out: Any, leaves: list[torch.Tensor], sample_dtype: Optional[torch.dtype] = None) -> Any:
    """Gradients of ``sum(out * g)`` (g fixed, seeded) with respect to every leaf that requires grad. ``g`` is
    rounded to ``sample_dtype`` (the sample's own dtype, given for the float64 reference run): the reference
    differentiates the same g a float16 run does (an unrounded g moved float16 weight gradients by 3 ulps)."""
    wanted = [t for t in leaves if t.requires_grad]
    if not isinstance(out, torch.Tensor) or not out.requires_grad or not wanted:
        return None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(sample_dtype or out.dtype).to(out.dtype)
    return _attempt(lambda: torch.autograd.grad(out, wanted, g, allow_unused=True))


def _no_further_from_reference(ours: torch.Tensor, theirs: torch.Tensor, reference: Any) -> bool:
    """Where normkit's value is not torch's within torch.testing's tolerance of the dtype: its worst error
    against torch's own float64 result (the same inputs, torch's function in float64) is at most torch's
    worst error, or one unit of round-off of the dtype at the tensor's largest magnitude (a float16
    gradient rounds to 1/1024 of its scale whoever computes it)."""
    if not isinstance(reference, torch.Tensor) or reference.shape != ours.shape or not ours.is_floating_point():
        return False
    ref = reference.detach().double()
    error = (ours.detach().double() - ref).abs().nan_to_num(nan=float("inf")).max()
    torch_error = (theirs.detach().double() - ref).abs().nan_to_num(nan=float("inf")).max()
    scale = torch.finfo(ours.dtype).eps * ref.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()
    return bool(error <= max(float(torch_error), float(scale)))


def _differences(ours: Any, theirs: Any, what: str, reference: Any = None) -> list[str]:
    """Where ``ours`` is not ``theirs``: a tensor (shape, dtype, values within round-off, or closer to the
    float64 ``reference`` where given), an error (type and message), or a sequence of those."""
    if isinstance(theirs, Raised) or isinstance(ours, Raised):
        if not (isinstance(theirs, Raised) and isinstance(ours, Raised)):
            return [f"{what}: normkit {ours!r}, torch {theirs!r}"]
        if ours.type is not theirs.type or ours.message != theirs.message:
            return [f"{what}: normkit raised {ours!r}, torch raised {theirs!r}"]
        return []
    if isinstance(theirs, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(theirs):
            return [f"{what}: normkit {ours!r}, torch {theirs!r}"]
        refs = reference if isinstance(reference, (list, tuple)) and len(reference) == len(theirs) else [None] * len(theirs)
        return [d for i, (a, b, r) in enumerate(zip(ours, theirs, refs)) for d in _differences(a, b, f"{what}[{i}]", r)]
    if theirs is None or ours is None:
        return [] if ours is theirs else [f"{what}: normkit {ours!r}, torch {theirs!r}"]
    if not isinstance(ours, torch.Tensor):
        return [] if ours == theirs else [f"{what}: normkit {ours!r}, torch {theirs!r}"]
    try:
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    except AssertionError as error:
        if ours.shape == theirs.shape and ours.dtype == theirs.dtype and _no_further_from_reference(ours, theirs, reference):
            return []
        return [f"{what}: {' '.join(str(error).split())[:300]}"]
    return []


def _compare(ours: dict, theirs: dict, where: str, reference: Callable[[], dict]) -> list[str]:
    """Every key's differences; the float64 reference is computed only where a tensor differs."""
    found = [key for key in theirs.keys() | ours.keys() if _differences(ours.get(key), theirs.get(key), where)]
    ref = reference() if found else {}
    return [d for key in sorted(found) for d in _differences(ours.get(key), theirs.get(key), f"{where} {key}",
                                                              ref.get(key))]


# --- module_db -------------------------------------------------------------------------------------------


def _module_run(build: Callable[[], nn.Module], state: Optional[dict], forward: Any, training: bool,
                dtype: Optional[torch.dtype] = None) -> dict:
    """Build, load ``state``, set the mode, call on a fresh copy of ``forward`` (floating tensors in ``dtype``
    where given); output, state and gradients."""
    module = _attempt(build)
    if isinstance(module, Raised):
        return {"construct": module}
    if state is not None:
        module.load_state_dict(_fresh(state, dtype))
    module.train(training)
    args, kwargs = _fresh(forward.args, dtype), _fresh(forward.kwargs, dtype)
    out = _attempt(lambda: module(*args, **kwargs))
    result = {"output": out}
    if not isinstance(out, Raised):
        result["state"] = [t for _, t in sorted(module.state_dict().items())]
        result["state names"] = sorted(module.state_dict())
        sample_dtype = next((t.dtype for t in _leaves(forward.args) if t.is_floating_point()), None)
        result["gradients"] = _backward(out, _leaves(args, kwargs) + list(module.parameters()), sample_dtype)
    return result


def _module_cases(info: Any, dtype: torch.dtype, training: bool, lazy: bool) -> list:
    kwargs = {"lazy": True} if lazy and info.module_cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d) else {}
    torch.manual_seed(0)
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training, **kwargs)


def module_differences(info: Any, dtype: torch.dtype, lazy: bool = False) -> list[str]:
    """Every difference between torch's module and normkit's twin over the entry's inputs, both modes."""
    theirs_cls, ours_cls = LAZY[info.module_cls] if lazy else (info.module_cls, TO_NORMKIT[info.module_cls])
    found = []
    for training in (True, False):
        cases = _module_cases(info, dtype, training, lazy)
        assert cases, f"{info.name} {dtype}: module_db gives no sample input (nothing would be compared)"
        for i, case in enumerate(cases):
            args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
            if lazy and "lazy" not in str(case.constructor_input.kwargs) and info.module_cls in LAZY and \
                    info.module_cls not in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
                args = args[1:]  # num_features comes from the input
            factory = dict(kwargs, device="cpu", dtype=dtype)
            state = None
            if not lazy:
                torch_module = _attempt(lambda: info.module_cls(*args, **factory))
                if not isinstance(torch_module, Raised):
                    state = randomize(torch_module, seed=i).state_dict()
            theirs = _module_run(lambda: theirs_cls(*args, **factory), state, case.forward_input, training)
            ours = _module_run(lambda: ours_cls(*args, **factory), state, case.forward_input, training)
            where = f"{ours_cls.__name__}{tuple(args)}{kwargs} {case.desc or 'default'} {dtype} " \
                    f"{'train' if training else 'eval'}"
            f64 = dict(factory, dtype=torch.float64)
            found += _compare(ours, theirs, where, lambda: _module_run(
                lambda: theirs_cls(*args, **f64), state, case.forward_input, training, torch.float64))
    return found


def module_error_differences(info: Any, dtype: torch.dtype) -> list[str]:
    """The entry's error inputs: normkit raises where torch does, the same type, a message matching torch's."""
    if info.module_error_inputs_func is None:
        return []
    found = []
    for err in info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True):
        case = err.module_error_input
        args, kwargs = case.constructor_input.args, case.constructor_input.kwargs

        def call(cls: type) -> Any:
            module = cls(*args, **kwargs, dtype=dtype)
            return module(*case.forward_input.args, **case.forward_input.kwargs)

        theirs, ours = _attempt(lambda: call(info.module_cls)), _attempt(lambda: call(TO_NORMKIT[info.module_cls]))
        assert isinstance(theirs, Raised) and issubclass(theirs.type, err.error_type), theirs  # torch's own contract
        found += _differences(ours, theirs, f"{info.name}{args}{kwargs} error input")
    return found


def assert_only_known(found: list[str], policy: str, prefixes: tuple[str, ...]) -> None:
    """No difference but the KNOWN ones of this policy and entry, and each of those still occurs."""
    known = [line for (p, line) in KNOWN if p == policy and line.startswith(prefixes)]
    unexpected = [d for d in found if not d.startswith(tuple(known))]
    assert not unexpected, f"{len(unexpected)} differences from torch:\n" + "\n".join(unexpected)
    gone = [line for line in known if not any(d.startswith(line) for d in found)]
    assert not gone, f"fixed, remove from KNOWN: {gone}"


@pytest.mark.parametrize("info", DRIVEN_MODULES, ids=lambda info: info.name)
def test_module_db(info, policy):
    found = []
    for dtype in info.supported_dtypes("cpu"):
        found += module_differences(info, dtype)
        found += module_error_differences(info, dtype)
        if info.module_cls in LAZY:
            found += module_differences(info, dtype, lazy=True)
    names = (TO_NORMKIT[info.module_cls].__name__, *(cls.__name__ for cls in LAZY.get(info.module_cls, ())))
    assert_only_known(found, policy, names)


# --- op_db -----------------------------------------------------------------------------------------------


def _op_run(fn: Callable[..., Any], sample: Any, dtype: Optional[torch.dtype] = None) -> dict:
    args = _fresh((sample.input, *sample.args), dtype)
    kwargs = _fresh(sample.kwargs, dtype)
    out = _attempt(lambda: fn(*args, **kwargs))
    result = {"output": out, "arguments after": _leaves(args, kwargs)}  # the running buffers updated in place
    if not isinstance(out, Raised):
        result["gradients"] = _backward(out, _leaves(args, kwargs), sample.input.dtype)
    return result


def op_differences(op: Any, dtype: torch.dtype) -> list[str]:
    found = []
    torch.manual_seed(0)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, f"{op.name} {dtype}: op_db gives no sample input (nothing would be compared)"
    for i, sample in enumerate(samples):
        theirs, ours = _op_run(op.op, sample), _op_run(OPS[op.name], sample)
        where = f"{op.name}[{i}] input {tuple(sample.input.shape)} {sample.kwargs if not any(isinstance(v, torch.Tensor) for v in sample.kwargs.values()) else ''} {dtype}"
        found += _compare(ours, theirs, where, lambda: _op_run(op.op, sample, torch.float64))
    return found


def op_error_differences(op: Any) -> list[str]:
    found = []
    if op.error_inputs_func is None:
        return found
    for err in op.error_inputs("cpu"):
        sample = err.sample_input
        theirs, ours = _op_run(op.op, sample)["output"], _op_run(OPS[op.name], sample)["output"]
        assert isinstance(theirs, Raised), theirs  # torch's own contract
        found += _differences(ours, theirs, f"{op.name} error input {tuple(sample.input.shape)} {sample.args}")
    return found


@pytest.mark.parametrize("op", DRIVEN_OPS, ids=lambda op: f"{op.name}-{op.variant_test_name or 'default'}")
def test_op_db(op, policy):
    found = []
    for dtype in sorted(set(op.supported_dtypes("cpu")) & set(FLOATING), key=str):
        found += op_differences(op, dtype)
    found += op_error_differences(op)
    assert_only_known(found, policy, (f"{op.name}[", f"{op.name} "))


if __name__ == "__main__":  # python test_torch_databases.py: every difference, both policies
    for name in POLICIES:
        nkt.set_kernel_policy(name)
        rows = []
        for info in DRIVEN_MODULES:
            for dtype in info.supported_dtypes("cpu"):
                rows += module_differences(info, dtype) + module_error_differences(info, dtype)
                if info.module_cls in LAZY:
                    rows += module_differences(info, dtype, lazy=True)
        for op in DRIVEN_OPS:
            for dtype in sorted(set(op.supported_dtypes("cpu")) & set(FLOATING), key=str):
                rows += op_differences(op, dtype)
            rows += op_error_differences(op)
        print(f"policy {name}: {len(rows)} differences")
        print("\n".join(f"  {r[:400]}" for r in rows))
    sys.exit(0)
