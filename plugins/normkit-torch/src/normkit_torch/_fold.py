"""Fold inference-mode batch norms into the convolution or linear layer before them.

For a batch norm after a layer ``y = w * x + b`` (per output channel c):

    scale = weight / sqrt(running_var + eps)
    w' = w * scale[c]          b' = (b - running_mean) * scale + bias          (b = 0 without a bias)

computed in float64 and stored in the layer's dtype (torch's ``fuse_conv_bn_eval`` math). The output
channel is axis 0 of a Conv's weight ``(out, in/groups, *k)`` and axis 1 of a ConvTranspose's
``(in, out/groups, *k)`` within each group. The batch norm is replaced by ``nn.Identity`` in its
parent; the layer gains a bias where it had none. A pair folds only when both act on the same axis:
a Linear maps the LAST axis, a batch norm normalizes axis 1, so Linear + batch norm folds for 2-D
``(N, features)`` data only.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit_torch._frozen import is_batch_norm

__all__ = ["fold_batch_norm", "UnfoldedBatchNormWarning"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _TRANSPOSED
# modules that keep their input's rank: a Linear after Flatten and these sees 2-D input
_RANK_KEEPING = (nn.Linear, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU,
                 nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.Mish, nn.Hardswish, nn.PReLU, nn.Softplus)


class UnfoldedBatchNormWarning(UserWarning):
    """Batch norms ``fold_batch_norm`` left in the model; ``.unfolded`` lists ``(name, reason)`` pairs."""

    def __init__(self, unfolded: list[tuple[str, str]]) -> None:
        self.unfolded = unfolded
        lines = "".join(f"\n  {name}: {reason}" for name, reason in unfolded)
        super().__init__(f"fold_batch_norm left {len(unfolded)} batch norm(s) in the model:{lines}")


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps batch norms and the foldable layers as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batch_norm(m) or isinstance(m, _LAYERS) or super().is_leaf_module(m, module_qualified_name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _flattens_to_2d(m: Any) -> bool:
    """nn.Flatten(1, -1), torch.flatten(x, 1) or x.flatten(1) as a module or an fx node: (N, features) out."""
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    return False


def _sequential_pairs(module: nn.Module, prefix: str, flat: set[str]) -> Iterator[tuple[str, str]]:
    """(layer, batch norm) names adjacent in an ``nn.Sequential`` that runs ``nn.Sequential.forward``;
    adds to ``flat`` the Linear layers known to see 2-D input (after Flatten(1, -1) and rank-keeping modules)."""
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            children = list(m.named_children())
            two_d = False
            for a_name, a in children:
                if isinstance(a, nn.Linear) and two_d:
                    flat.add(_join(name, a_name))
                two_d = _flattens_to_2d(a) or (two_d and (isinstance(a, _RANK_KEEPING) or is_batch_norm(a)))
            for (a_name, a), (b_name, b) in zip(children, children[1:]):
                if isinstance(a, _LAYERS) and is_batch_norm(b):
                    yield _join(name, a_name), _join(name, b_name)


def _node_flattens_to_2d(node: Any, modules: dict) -> bool:
    """True where the fx node is a flatten from axis 1 to the end, or a rank-keeping module after one."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            m = modules.get(node.target)
            if _flattens_to_2d(m):
                return True
            if not (isinstance(m, _RANK_KEEPING) or is_batch_norm(m)) or len(node.args) != 1:
                return False
        elif node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten"):
            args, kw = list(node.args[1:]), dict(node.kwargs)
            start = kw.get("start_dim", args[0] if args else 0)
            end = kw.get("end_dim", args[1] if len(args) > 1 else -1)
            return start == 1 and end == -1
        else:
            return False
        node = node.args[0]
    return False


def _traced_pairs(module: nn.Module, prefix: str, errors: dict[str, str], flat: set[str]) -> Iterator[tuple[str, str]]:
    """(layer, batch norm) names where torch.fx shows the batch norm's only input is the layer's output,
    used nowhere else. A module fx cannot trace is searched child by child (its error is kept)."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # data-dependent control flow, unsupported ops: look inside the children
        errors[prefix] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for name, child in module.named_children():
            yield from _traced_pairs(child, _join(prefix, name), errors, flat)
        return
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not is_batch_norm(modules.get(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules.get(src.target), _LAYERS):
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if isinstance(modules[src.target], nn.Linear) and len(src.args) == 1 and _node_flattens_to_2d(src.args[0], modules):
            flat.add(_join(prefix, src.target))
        yield _join(prefix, src.target), _join(prefix, node.target)


def _accepted_ranks(bn: nn.Module) -> list[int]:
    """The input ranks 2..5 the batch norm's own input check accepts."""
    ranks = []
    for r in range(2, 6):
        try:
            bn._check_input_dim(torch.empty((1,) * r))
        except ValueError:
            continue
        ranks.append(r)
    return ranks


def _axis_reason(layer_name: str, layer: nn.Module, bn: nn.Module, seen: Optional[set[int]], flat: bool) -> str | None:
    """Why the layer and the batch norm act on different axes (None when they agree): ``seen`` holds the
    layer's output ranks in the ``example_inputs`` pass (None without one); ``flat``: its input is known 2-D."""
    kind, bn_kind = type(layer).__name__, type(bn).__name__
    if isinstance(layer, nn.Linear):
        if 2 not in _accepted_ranks(bn):
            return (f"{kind} ({layer_name}) acts on the last axis, {bn_kind} on axis 1 of its "
                    f"{'/'.join(f'{r}-D' for r in _accepted_ranks(bn))} input: different axes")
        if seen is not None:
            if seen != {2}:
                bad = max(seen - {2})
                return (f"{kind} ({layer_name}) acts on the last axis of its {bad}-D input, {bn_kind} on axis 1: "
                        "different axes (only 2-D (N, features) data folds)")
            return None
        if flat:
            return None
        return (f"cannot tell whether {kind} ({layer_name})'s input is 2-D (foldable) or 3-D (the Linear acts on the "
                f"last axis, {bn_kind} on axis 1): pass example_inputs= to fold_batch_norm")
    batched = layer.weight.dim()  # (N, C, *spatial): the weight's rank
    if seen is not None and seen != {batched}:
        return (f"{kind} ({layer_name}) got unbatched input (channels on axis 0, {bn_kind} normalizes axis 1): "
                "different axes")
    return None


def _reason_not_foldable(layer: nn.Module, bn: nn.Module) -> str | None:
    if isinstance(bn, _BatchNorm) and bn.training:
        return "in training mode (call model.eval() first: only inference-mode batch norms fold)"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if nn.utils.parametrize.is_parametrized(layer) or not isinstance(layer.weight, nn.Parameter):
        return f"its {type(layer).__name__}'s weight is parametrized or not a Parameter"
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return f"its {type(layer).__name__} is an uninitialized lazy module"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"its {type(layer).__name__} has {out} outputs, the batch norm {bn.num_features} features"
    return None


def _scaled_weight(layer: nn.Module, w: Tensor, scale: Tensor) -> Tensor:
    """The weight with each output channel c multiplied by scale[c]: axis 0 of a Conv/Linear weight;
    a ConvTranspose's ``(in, out/groups, *k)`` weight holds output channel g * out/groups + j at [g-th rows, j]."""
    if isinstance(layer, _TRANSPOSED):
        g = layer.groups
        grouped = w.reshape((g, w.shape[0] // g) + tuple(w.shape[1:]))
        return (grouped * scale.reshape((g, 1, -1) + (1,) * (w.dim() - 2))).reshape(w.shape)
    return w * scale.reshape((-1,) + (1,) * (w.dim() - 1))


def _output_ranks(model: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """{id(layer): output ranks} of the foldable layers in one eval-mode, no-grad pass over ``example_inputs``
    (every module's train/eval mode restored; nothing updated)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    seen: dict[int, set[int]] = {}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            seen.setdefault(id(module), set()).add(output.dim())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    except Exception as exc:
        raise ValueError(f"fold_batch_norm: the model failed on example_inputs ({type(exc).__name__}: {exc})") from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return seen


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """``layer``'s weight and bias become w * scale and (b - running_mean) * scale + bias (float64 math)."""
    w = layer.weight
    wide = torch.float32 if w.device.type == "mps" else torch.float64
    rm, rv = bn.running_mean.to(wide), bn.running_var.to(wide)
    gamma = bn.weight.to(wide) if bn.weight is not None else torch.ones_like(rm)
    beta = bn.bias.to(wide) if bn.bias is not None else torch.zeros_like(rm)
    scale = gamma * torch.rsqrt(rv + bn.eps)
    b = layer.bias.to(wide) if layer.bias is not None else torch.zeros_like(rm)
    new_w = _scaled_weight(layer, w.to(wide), scale)
    new_b = (b - rm) * scale + beta
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def fold_batch_norm(model: nn.Module, *, inplace: bool = False, example_inputs: Any = None) -> nn.Module:
    """``model`` with every foldable inference-mode batch norm folded into the Conv*d, ConvTranspose*d or Linear before it.

    Batch norms: torch.nn's and normkit's BatchNorm1d/2d/3d and SyncBatchNorm, BatchRenorm*d (all
    in eval mode) and FrozenBatchNorm* (always). "Before it" is adjacency in an ``nn.Sequential``,
    or, in any module torch.fx can trace (else in each child that it can), the batch norm's only
    input being the layer's output, used nowhere else; the layer and the batch norm must each be
    used once in the model. Convolutions and transposed convolutions of any groups, padding, stride
    and dilation fold. A Linear folds only where its output is 2-D ``(N, features)`` (on 3-D input
    it maps the last axis, a BatchNorm1d normalizes axis 1): known from one eval-mode pass over
    ``example_inputs`` (a tensor or a tuple of forward arguments; also checks that every conv got
    batched input), or without it when the Linear follows ``nn.Flatten()`` / ``torch.flatten(x, 1)``
    (through activations, dropout, other Linears and batch norms); otherwise it stays, with a warning.

    Returns a deep copy (``inplace=False``) or ``model`` itself, whose batch norms are replaced by
    ``nn.Identity``; its outputs equal the original's in eval mode to round-off. Batch norms left
    (no foldable layer before them, training mode, no running statistics) are listed, with the
    reason, in one ``UnfoldedBatchNormWarning`` (its ``.unfolded`` holds ``(name, reason)`` pairs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batch_norm expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"fold_batch_norm: inplace must be a bool, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if is_batch_norm(model):
        warnings.warn(UnfoldedBatchNormWarning([("model", "the model is the batch norm itself")]), stacklevel=2)
        return model
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    modules = dict(model.named_modules())
    errors: dict[str, str] = {}
    flat: set[str] = set()
    pairs = dict((bn, layer) for layer, bn in _sequential_pairs(model, "", flat))
    for layer, bn in _traced_pairs(model, "", errors, flat):
        pairs.setdefault(bn, layer)
    ranks = None if example_inputs is None else _output_ranks(model, example_inputs)
    folded: set[str] = set()
    unfolded: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    for bn_name, layer_name in pairs.items():
        layer, bn = modules[layer_name], modules[bn_name]
        reason = _reason_not_foldable(layer, bn)
        if reason is None:
            seen = None if ranks is None else ranks.get(id(layer), set())
            if seen is not None and not seen:
                reason = f"the example_inputs pass never calls {layer_name}"
            else:
                reason = _axis_reason(layer_name, layer, bn, seen, layer_name in flat)
        if reason is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
            reason = "it or the layer before it is shared (used at more than one place in the model)"
        if reason is None and layer_name in folded:
            reason = f"{layer_name} is already folded with another batch norm"
        if reason is not None:
            reasons[bn_name] = reason
            continue
        _fold_into(layer, bn)
        folded.add(layer_name)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
        reasons[bn_name] = ""
    for name, m in modules.items():
        if is_batch_norm(m) and reasons.get(name) != "":
            reason = reasons.get(name)
            if reason is None:
                traced = [p for p in errors if name.startswith(p + ".") or p == ""]
                reason = "no Conv*d, ConvTranspose*d or Linear whose output only it takes"
                if traced:
                    reason += f" (torch.fx could not trace {traced[-1] or 'the model'}: {errors[traced[-1]]})"
            unfolded.append((name, reason))
    if unfolded:
        warnings.warn(UnfoldedBatchNormWarning(unfolded), stacklevel=2)
    return model

