"""One dispatch function per op, shaped like ``torch.nn.functional``: torch's kernel, or the normkit core.

``batch_norm``, ``instance_norm``, ``layer_norm``, ``group_norm``, ``rms_norm`` take the arguments
of their ``torch.nn.functional`` namesakes and keep their contract (``batch_norm`` and
``instance_norm`` update the given running buffers in place). Under the kernel policy ``"auto"``
(default) each calls the ``torch.nn.functional`` function of the kernel the plugin's table chose
for (op, device type, dtype): torch's own on every device, so a module behaves as its torch.nn
twin. Under ``"core"`` (``set_kernel_policy("core")`` / ``NORMKIT_TORCH_KERNELS=core``) each checks
its arguments as torch does (same errors) and computes through the normkit core, exact at large
data offsets where torch's float32 kernels are about 1e-3 off.

The choice is looked up once per configuration (``kernel_for``: a dict read per call, no hook
call); torch.compile and torch.export trace either policy without a graph break (the policy is
guarded). Graphs for other runtimes always get torch's operators: TorchScript compiles each
function as its ``torch.nn.functional`` namesake, and while ``torch.onnx.export`` runs (either
exporter) the policy ``"core"`` computes with torch's kernel too, so the ONNX graph holds the fused
``BatchNormalization`` / ``LayerNormalization`` / ``InstanceNormalization`` nodes torch.nn's export
has. Like ``torch.nn.functional``, each function honours ``__torch_function__``: torch.fx records
it as one call.
"""

from __future__ import annotations

import functools
import numbers
import sys
import threading
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from array_api_compat import torch as xp
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

import normkit
from normkit.plugin import kernels
from normkit_torch._policy import POLICY

_is_scripting = torch.jit.is_scripting  # one lookup less per call; TorchScript treats it as the original

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "set_kernel_policy",
    "get_kernel_policy",
    "kernel_for",
    "standardize",
    "min_max_scale",
    "is_compiling",
    "cumulative_momentum",
]


# ---------------------------------------------------------------- policy and kernel choice


def set_kernel_policy(policy: str) -> str:
    """Choose how normkit_torch computes; returns the previous policy.

    ``"auto"`` (default): torch's own kernels (torch.nn's behaviour and speed, on every device).
    ``"core"``: the generic normkit core (the reference; exact at large data offsets). Takes effect
    on the next call; a compiled graph recompiles. Initial value: ``NORMKIT_TORCH_KERNELS``.
    """
    return POLICY.set(policy)


def get_kernel_policy() -> str:
    """The current kernel policy, ``"auto"`` or ``"core"``."""
    return POLICY.get()


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) or torch.export traces: no hook calls and no value-dependent checks then."""
    if _is_scripting():
        return False
    return _IS_COMPILING()


def cumulative_momentum(num_batches_tracked: Tensor, like: Optional[Tensor]) -> float:
    """``1 / num_batches_tracked``, batch norm's ``momentum=None`` weight: a Python float, or while
    torch.compile traces a 0-d tensor in ``like``'s dtype (``float()`` of a buffer would break the graph)."""
    if _is_scripting():
        return 1.0 / float(num_batches_tracked)
    if is_compiling() and like is not None:
        return 1.0 / num_batches_tracked.to(like.dtype)  # type: ignore[return-value]
    return 1.0 / float(num_batches_tracked)


def _exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` runs (torch.onnx is never imported here: unloaded, no export runs)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _is_compiling_fn() -> Callable[[], bool]:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:  # torch < 2.3
        from torch._dynamo import is_compiling as fn
    return fn


_IS_COMPILING = _is_compiling_fn()

# (op, device, dtype, kernels.generation()) -> torch.nn.functional function, or None (the core)
_CHOSEN: dict[tuple, Optional[Callable[..., Any]]] = {}
_CHOSEN_GENERATION = [-1]
_LOCK = threading.Lock()
_MISSING = object()
_TORCH_FUNCTIONAL: dict[str, Optional[Callable[..., Any]]] = {
    "batch_norm": F.batch_norm,
    "instance_norm": F.instance_norm,
    "layer_norm": F.layer_norm,
    "group_norm": F.group_norm,
    "rms_norm": getattr(F, "rms_norm", None),
}


def kernel_for(op: str, input: Tensor) -> Optional[Callable[..., Any]]:
    """The ``torch.nn.functional`` function that computes ``op`` on ``input``, or None for the core.

    None under the policy ``"core"``, except during ``torch.onnx.export`` (torch's own function: the
    fused ONNX nodes). Under ``"auto"``: the ``nn_functional`` of the kernel the ``normkit_kernel``
    hook offers for (op, device type, dtype), asked once per configuration and policy generation;
    where it offers none (a dtype outside the table: torch raises its own error), torch's own
    function, as while torch.compile traces a configuration not yet seen eagerly (no hook call
    then). torch.nn's behaviour is the contract of "auto".
    """
    if not POLICY.enabled():
        return _TORCH_FUNCTIONAL[op] if _exporting_onnx() else None
    key = (op, input.device, input.dtype, kernels.generation())  # a device object hashes faster than its .type
    found = _CHOSEN.get(key, _MISSING)
    if found is _MISSING:
        if is_compiling():
            return _TORCH_FUNCTIONAL[op]
        found = _choose(op, input, key)
    return found  # type: ignore[return-value]


def _choose(op: str, input: Tensor, key: tuple) -> Optional[Callable[..., Any]]:
    kernel = kernels.lookup(op, xp, input.device, input.dtype)
    found = getattr(kernel, "nn_functional", None) or _TORCH_FUNCTIONAL[op]
    with _LOCK:
        if _CHOSEN_GENERATION[0] != key[3]:  # a policy change or a new plugin: forget older choices
            _CHOSEN.clear()
            _CHOSEN_GENERATION[0] = key[3]
        _CHOSEN[key] = found
    return found


# ---------------------------------------------------------------- torch's contract on the core path
#
# Under "core" each function keeps torch.nn.functional's contract: torch's own checks and messages
# run first (below); where the core refuses an input torch takes (an empty batch, eps < 0, momentum
# outside [0, 1], NaN eps, a per-channel tensor of shape (1, C)...) or takes one torch refuses (a
# momentum that is not a number, dtypes torch's CPU kernels do not mix, normalized_shape=()), torch's
# own function decides: its result (nothing the core could compute better: no statistics, or
# arguments outside the algorithm's domain) or its error.

_CORE_REFUSALS = (ValueError, TypeError)  # how the core refuses an argument (named in its message)


def _core_or_torch(core: Callable[[], Any], torch_call: Callable[[], Any]) -> Any:
    """The core's answer; where the core refuses the arguments, torch's function's (its result or its error).
    While torch.compile traces, the core's alone (a try block in the graph would break it)."""
    if is_compiling():
        return core()
    try:
        return core()
    except _CORE_REFUSALS:
        pass
    return torch_call()  # outside the except block: torch's error alone, not chained to the core's


def _buffer_value(t: Tensor) -> Tensor:
    """``t`` as the value a running buffer takes in place: detached, and without functionalize's wrapper (synced
    first). grad/jacrev/jvp wrappers need no unwrapping: the copy runs with torch.func switched off
    (``_buffer_writes``). A vmap-batched value stays wrapped: its copy raises, as torch.nn's update does."""
    t = t.detach()
    if is_compiling():
        return t
    while torch._is_functional_tensor(t):
        torch._sync(t)
        t = torch._from_functional_tensor(t)
    return t


class _OutsideTransforms:
    """no_grad, and torch.func's layers switched off: aten's kernels update running buffers below torch.func,
    so a buffer that a grad/jvp transform captured takes its new value (an in-place op on it raises above)."""

    def __enter__(self) -> None:
        self._no_grad, self._no_func = torch.no_grad(), torch._C._DisableFuncTorch()
        self._no_grad.__enter__()
        self._no_func.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._no_func.__exit__(*exc)
        self._no_grad.__exit__(*exc)


def _buffer_writes() -> Any:
    """The context of the in-place running-buffer updates: ``_OutsideTransforms`` inside a torch.func transform,
    else ``torch.no_grad()`` (what torch.compile traces)."""
    if not is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        return _OutsideTransforms()
    return torch.no_grad()


def _torch_refuses(input: Tensor, *tensors: Optional[Tensor], momentum: Any = 0.1) -> bool:
    """Arguments the core would take but torch's kernel refuses: a momentum that is not a real number or a
    tensor (a NumPy array), or on CPU per-channel tensors of a dtype aten does not mix with the input's
    (only float32 parameters with float16/bfloat16 input). Not asked while torch.compile traces."""
    if is_compiling():
        return False
    if not isinstance(momentum, (numbers.Real, Tensor)):
        return True
    if input.device.type != "cpu":
        return False
    dtypes = {t.dtype for t in tensors if isinstance(t, Tensor)}
    return bool(dtypes) and dtypes != {input.dtype} and not (
        input.dtype in (torch.float16, torch.bfloat16) and dtypes == {torch.float32})



def _verify_batch_size(size: Sequence[int]) -> None:
    """torch's: statistics need more than one value per channel."""
    count = size[0]
    for d in size[2:]:
        count = count * d
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _verify_spatial_size(size: torch.Size) -> None:
    """torch's: instance statistics need more than one spatial element."""
    count = 1
    for d in size[2:]:
        count = count * d
    if count == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def _check_features(channels: int, repeat: int, **tensors: Optional[Tensor]) -> None:
    """aten's check: each per-channel tensor holds ``channels`` elements (instance norm: counts times the batch)."""
    for name, t in tensors.items():
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels * repeat} elements not {t.numel() * repeat}")


def _check_trailing(input: Tensor, normalized_shape: tuple[int, ...], star: str) -> None:
    """aten's message when the input's trailing dimensions are not ``normalized_shape``."""
    n = len(normalized_shape)
    if input.dim() < n or tuple(input.shape[input.dim() - n :]) != normalized_shape:
        dims = ", ".join(str(d) for d in normalized_shape)
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape [{star}{dims}], "
            f"but got input of size{list(input.shape)}"
        )


def _check_normalized_params(shape: tuple[int, ...], **tensors: Optional[Tensor]) -> None:
    """aten's check: the affine parameters of layer and RMS norm have the shape ``normalized_shape``."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{list(t.shape)} and normalized_shape = {list(shape)}"
            )


def _as_shape(normalized_shape: Any) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


# ---------------------------------------------------------------- the dispatch functions


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Union[float, Tensor] = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: Optional[int] = None,
) -> Tensor:
    """``F.batch_norm``: channels on axis 1; in training the running buffers are updated in place.

    ``momentum`` may also be a 0-d tensor (the cumulative average ``1 / num_batches_tracked`` while
    torch.compile traces, where a Python float of a buffer would break the graph): the core computes then.
    ``virtual_batch_size`` (ghost batch norm, ``normkit.batch_norm``'s): in training each run of that many
    samples is normalized by its own statistics, by the core (torch has no such kernel); TorchScript refuses it.
    """
    if _is_scripting():
        assert isinstance(momentum, float)
        if training and virtual_batch_size is not None:
            raise RuntimeError(
                "batch_norm: virtual_batch_size (ghost batch norm) does not run in TorchScript (torch has no such "
                "kernel); script the module in eval mode, or train it in Python"
            )
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean, running_var,
            weight, bias, training=training, momentum=momentum, eps=eps, virtual_batch_size=virtual_batch_size,
        )
    fn = kernel_for("batch_norm", input)
    # one virtual batch of the whole (known) batch is plain batch norm, kernels included
    ghost = bool(training and virtual_batch_size is not None and input.dim() > 0
                 and virtual_batch_size != input.shape[0])
    if fn is not None and not isinstance(momentum, Tensor) and not ghost:
        return fn(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        _verify_batch_size(input.size())
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    channels = input.shape[1] if input.dim() > 1 else 0  # aten's count for a rank-0/1 input
    _check_features(channels, 1, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)

    # partials, not closures: TorchScript's frontend parses this body (refusing nested defs and lambdas)
    core = functools.partial(
        normkit.batch_norm,
        input, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps, axis=1,
        virtual_batch_size=virtual_batch_size if training else None, xp=xp,
    )
    torch_call = functools.partial(F.batch_norm, input, running_mean, running_var, weight, bias, training, momentum,
                                   eps)

    if ghost:  # normkit's own feature: the core's contract and messages
        out = core()
    elif _torch_refuses(input, running_mean, running_var, weight, bias, momentum=momentum):
        return torch_call()
    else:
        out = _core_or_torch(core, torch_call)
        if isinstance(out, Tensor):  # torch's function answered (and updated the buffers itself)
            return out
    if training and running_mean is not None and running_var is not None:
        out = out._replace(running_mean=_buffer_value(out.running_mean), running_var=_buffer_value(out.running_var))
        with _buffer_writes():
            running_mean.copy_(out.running_mean)
            running_var.copy_(out.running_var)
    return out.output


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm``: input ``(N, C, *spatial)``; with ``use_input_stats`` the running buffers get the
    batch average of the per-instance mean and unbiased variance, in place. The output is contiguous."""
    if _is_scripting():
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            instance_norm, (input, running_mean, running_var, weight, bias), input, running_mean, running_var,
            weight, bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps,
        )
    fn = kernel_for("instance_norm", input)
    if fn is not None:
        return fn(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if use_input_stats:
        _verify_spatial_size(input.size())
    torch_call = functools.partial(F.instance_norm, input, running_mean, running_var, weight, bias, use_input_stats,
                                   momentum, eps)

    if input.dim() < 2 or _torch_refuses(input, running_mean, running_var, weight, bias, momentum=momentum):
        return torch_call()
    _check_features(input.shape[1], input.shape[0], running_mean=running_mean, running_var=running_var,
                    weight=weight, bias=bias)
    out = _core_or_torch(functools.partial(
        normkit.instance_norm, input, running_mean, running_var, weight, bias,
        use_input_stats=use_input_stats, momentum=momentum, eps=eps, axis=1, xp=xp,
    ), torch_call)
    if isinstance(out, Tensor):  # torch's function answered (and updated the buffers itself)
        return out
    output, new_mean, new_var = out
    if use_input_stats and running_mean is not None and running_var is not None:
        with _buffer_writes():
            running_mean.copy_(_buffer_value(new_mean))
            running_var.copy_(_buffer_value(new_var))
    return output.contiguous()


def layer_norm(
    input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm``: normalize over the trailing ``normalized_shape`` dimensions (an int, a tuple or a list)."""
    if _is_scripting():
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            layer_norm, (input, weight, bias), input, normalized_shape, weight=weight, bias=bias, eps=eps
        )
    fn = kernel_for("layer_norm", input)
    if fn is not None:
        return fn(input, normalized_shape, weight, bias, eps)
    shape = _as_shape(normalized_shape)
    torch_call = functools.partial(F.layer_norm, input, normalized_shape, weight, bias, eps)

    if not shape or _torch_refuses(input, weight, bias):  # () : torch's "at least 1-dimensional" error
        return torch_call()
    _check_normalized_params(shape, weight=weight, bias=bias)
    _check_trailing(input, shape, "*, ")
    axes = tuple(range(input.dim() - len(shape), input.dim()))
    return _core_or_torch(functools.partial(normkit.layer_norm, input, weight, bias, axis=axes, eps=eps, xp=xp),
                          torch_call)


def group_norm(
    input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    """``F.group_norm``: input ``(N, C, *)``, channels split into ``num_groups`` consecutive groups."""
    if _is_scripting():
        return F.group_norm(input, num_groups, weight, bias, eps)
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm, (input, weight, bias), input, num_groups, weight=weight, bias=bias,
                                     eps=eps)
    fn = kernel_for("group_norm", input)
    if fn is not None:
        return fn(input, num_groups, weight, bias, eps)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    torch_call = functools.partial(F.group_norm, input, num_groups, weight, bias, eps)

    if not isinstance(num_groups, int) or num_groups <= 0 or _torch_refuses(input, weight, bias):
        return torch_call()
    _verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != channels):
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in input, "
                f"but got {name} of shape {list(t.shape)} and input of shape {list(input.shape)}"
            )
    return _core_or_torch(  # keeps channels_last
        functools.partial(normkit.group_norm, input, num_groups, weight, bias, axis=1, eps=eps, xp=xp), torch_call)


def rms_norm(
    input: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None, eps: Optional[float] = None
) -> Tensor:
    """``F.rms_norm``: ``x / sqrt(mean(x**2) + eps) * weight`` over the trailing dimensions; ``eps=None`` is
    the machine epsilon of the compute dtype (float32's for half input)."""
    if _is_scripting():
        return F.rms_norm(input, normalized_shape, weight, eps)
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(rms_norm, (input, weight), input, normalized_shape, weight=weight, eps=eps)
    fn = kernel_for("rms_norm", input)
    if fn is not None:
        return fn(input, normalized_shape, weight, eps)
    shape = _as_shape(normalized_shape)
    torch_call = functools.partial(F.rms_norm, input, normalized_shape, weight, eps)

    if not shape:  # torch's "at least 1-dimensional" error
        return torch_call()
    if input.dim() < len(shape):
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got {input.dim()}")
    _check_normalized_params(shape, weight=weight)
    _check_trailing(input, shape, "*")
    axes = tuple(range(input.dim() - len(shape), input.dim()))
    return _core_or_torch(functools.partial(normkit.rms_norm, input, weight, axis=axes, eps=eps, xp=xp), torch_call)


# ---------------------------------------------------------------- the fitted scalers' math


def standardize(x: Tensor, mean: Tensor, std: Tensor, axis: int) -> Tensor:
    """``(x - mean) / std`` per feature along ``axis``."""
    return normkit.standardize(x, axis=axis, mean=mean, std=std, xp=xp)


def min_max_scale(
    x: Tensor, data_min: Tensor, data_max: Tensor, feature_range: tuple[float, float], axis: int
) -> Tensor:
    """Linear map of ``[data_min, data_max]`` onto ``feature_range`` per feature along ``axis``."""
    return normkit.min_max_scale(
        x, axis=axis, feature_range=feature_range, data_min=data_min, data_max=data_max, xp=xp
    )
