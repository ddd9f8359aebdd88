"""Fold inference-mode batch norms into the convolution or linear layer before them.

For a batch norm after a layer ``y = w * x + b`` (per output channel c):

    scale = weight / sqrt(running_var + eps)
    w' = w * scale[c]          b' = (b - running_mean) * scale + bias          (b = 0 without a bias)

computed in float64 and stored in the layer's dtype (torch's ``fuse_conv_bn_eval`` math). The batch
norm is replaced by ``nn.Identity`` in its parent; the layer gains a bias where it had none.
"""

from __future__ import annotations

import copy
import warnings
from typing import Iterator

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit_torch._frozen import is_batch_norm

__all__ = ["fold_batch_norm", "UnfoldedBatchNormWarning"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


def _sequential_pairs(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    """(layer, batch norm) names adjacent in an ``nn.Sequential`` that runs ``nn.Sequential.forward``."""
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            children = list(m.named_children())
            for (a_name, a), (b_name, b) in zip(children, children[1:]):
                if isinstance(a, _LAYERS) and is_batch_norm(b):
                    yield _join(name, a_name), _join(name, b_name)


def _traced_pairs(module: nn.Module, prefix: str, errors: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(layer, batch norm) names where torch.fx shows the batch norm's only input is the layer's output,
    used nowhere else. A module fx cannot trace is searched child by child (its error is kept)."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # data-dependent control flow, unsupported ops: look inside the children
        errors[prefix] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for name, child in module.named_children():
            yield from _traced_pairs(child, _join(prefix, name), errors)
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
        yield _join(prefix, src.target), _join(prefix, node.target)


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
    new_w = w.to(wide) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    new_b = (b - rm) * scale + beta
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def fold_batch_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every foldable inference-mode batch norm folded into the Conv1d/2d/3d or Linear before it.

    Batch norms: torch.nn's and normkit's BatchNorm1d/2d/3d and SyncBatchNorm, BatchRenorm*d (all
    in eval mode) and FrozenBatchNorm* (always). "Before it" is adjacency in an ``nn.Sequential``,
    or, in any module torch.fx can trace (else in each child that it can), the batch norm's only
    input being the layer's output, used nowhere else; the layer and the batch norm must each be
    used once in the model. Convolutions of any groups, padding, stride and dilation fold. A
    Linear folds with the batch norm over its output features (2-D input ``(N, features)``).

    Returns a deep copy (``inplace=False``) or ``model`` itself, whose batch norms are replaced by
    ``nn.Identity``; its outputs equal the original's in eval mode to round-off. Batch norms left
    (no foldable layer before them, training mode, no running statistics) are listed, with the
    reason, in one ``UnfoldedBatchNormWarning`` (its ``.unfolded`` holds ``(name, reason)`` pairs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batch_norm expects a torch.nn.Module, got {type(model).__name__}")
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
    pairs = dict((bn, layer) for layer, bn in _sequential_pairs(model, ""))
    for layer, bn in _traced_pairs(model, "", errors):
        pairs.setdefault(bn, layer)
    folded: set[str] = set()
    unfolded: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    for bn_name, layer_name in pairs.items():
        layer, bn = modules[layer_name], modules[bn_name]
        reason = _reason_not_foldable(layer, bn)
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
                reason = "no Conv1d/2d/3d or Linear whose output only it takes"
                if traced:
                    reason += f" (torch.fx could not trace {traced[-1] or 'the model'}: {errors[traced[-1]]})"
            unfolded.append((name, reason))
    if unfolded:
        warnings.warn(UnfoldedBatchNormWarning(unfolded), stacklevel=2)
    return model

