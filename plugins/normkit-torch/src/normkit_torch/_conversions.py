"""The model libraries' normalization layers as normkit modules, for ``convert``; ``register_conversion``.

A conversion is ``fn(module) -> new module`` (or None: declined), keyed by the module's exact class;
the new module holds the very Parameter and buffer objects, children and mode of the old one, so the
state_dict keys and values stay. Built in, registered when the library is imported:

- transformers' RMSNorm family, recognised by shape, not by name: a module with one parameter
  ``weight``, a float ``variance_epsilon`` and a ``forward`` that is, statement for statement (names
  aside), one of transformers' four RMSNorm forms (``_RMS_FORMS``: LlamaRMSNorm's and ~140 copies,
  OLMo's, NemotronH's, T5LayerNorm's) -> ``Float32RMSNorm``, the same float32 computation and cast back;
- timm's ``LayerNorm`` -> ``normkit_torch.LayerNorm``; ``LayerNorm2d`` -> ``LayerNorm2d`` (channels of NCHW);
  ``BatchNormAct2d`` / ``GroupNormAct`` / ``FrozenBatchNormAct2d`` -> ``TimmBatchNormAct2d`` /
  ``TimmGroupNormAct`` / ``TimmFrozenBatchNormAct2d`` (normkit's norm, then timm's own ``drop`` and ``act``);
- torchvision's ``FrozenBatchNorm2d`` (also timm's) -> ``normkit_torch.FrozenBatchNorm2d``.

``looks_like_norm`` is what the report names when no conversion applied.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from normkit_torch import _batchnorm as bn, _frozen, _normalization as norm
from normkit_torch._functional import layer_norm, rms_norm
from normkit_torch._twins import constructor_kwargs  # the one reading of torch.nn's configuration

__all__ = [
    "register_conversion",
    "conversion_for",
    "looks_like_norm",
    "Float32RMSNorm",
    "LayerNorm2d",
    "TimmBatchNormAct2d",
    "TimmGroupNormAct",
    "TimmFrozenBatchNormAct2d",
]

ConvertFn = Callable[[nn.Module], Optional[nn.Module]]

_REGISTRY: dict[type, ConvertFn] = {}
_LIBRARIES_DONE: set[str] = set()


def register_conversion(cls: type, convert_fn: ConvertFn, *, replace: bool = False) -> None:
    """Make ``convert`` turn every module of exactly class ``cls`` into ``convert_fn(module)``.

    ``convert_fn`` returns the new module (typically holding ``module``'s own parameters and buffers), or
    None to leave it (it is then reported). A class registered already (by normkit or a library) is an
    error unless ``replace=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_conversion: cls must be a torch.nn.Module subclass, got {cls!r}")
    if not callable(convert_fn):
        raise TypeError(f"register_conversion: convert_fn must be callable, got {type(convert_fn).__name__}")
    _register_installed()  # a user's registration of a library class overrides normkit's, never the reverse
    old = _REGISTRY.get(cls)
    if old is not None and old is not convert_fn and not replace:
        raise ValueError(
            f"register_conversion: {cls.__module__}.{cls.__qualname__} already has a conversion ({old!r}); "
            "pass replace=True to replace it"
        )
    _REGISTRY[cls] = convert_fn


def conversion_for(module: nn.Module) -> Optional[ConvertFn]:
    """The conversion of ``module``'s exact class, or the RMSNorm-family one for a module of that shape."""
    _register_installed()
    fn = _REGISTRY.get(type(module))
    if fn is None and _rms_form(type(module)) is not None:
        return _convert_rms
    return fn


# ---------------------------------------------------------------- moving state


def _transplant(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (built on the meta device) holding ``old``'s own parameters, buffers, children and mode."""
    for store in ("_parameters", "_buffers"):
        old_items, new_items = getattr(old, store), getattr(new, store)
        if list(old_items) != list(new_items):
            raise RuntimeError(
                f"cannot convert {type(old).__name__} to {type(new).__name__}: {store[1:]} "
                f"{list(old_items)} != {list(new_items)}"
            )
        new_items.update(old_items)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        new._modules[name] = child
    new.train(old.training)
    return new


# ---------------------------------------------------------------- transformers: the RMSNorm family


class Float32RMSNorm(norm.RMSNorm):
    """transformers' RMSNorm: ``h = x32 / sqrt(mean(x32**2, -1) + eps)`` in float32, then per ``form``:

    ``"llama"``: ``weight * h.to(x.dtype)``; ``"olmo"``: ``(weight * h).to(x.dtype)``;
    ``"float32_weight"``: ``(weight.float() * h).to(x.dtype)``; ``"t5"``: ``x * rsqrt(...)`` (x's own dtype
    times the float32 factor), cast to the weight's dtype when that is half precision, times ``weight``.
    ``variance_epsilon`` is ``eps`` (transformers' attribute name).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, form: str = "llama", device: Any = None,
                 dtype: Any = None) -> None:
        if form not in _RMS_FORMS:
            raise ValueError(f"form must be one of {sorted(_RMS_FORMS)}, got {form!r}")
        super().__init__(hidden_size, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        self.form = form

    @property
    def variance_epsilon(self) -> float:
        return self.eps  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        h = rms_norm(x.to(torch.float32), self.normalized_shape, None, self.eps)
        if self.form == "llama":
            return self.weight * h.to(x.dtype)
        if self.form == "olmo":
            return (self.weight * h).to(x.dtype)
        if self.form == "float32_weight":
            return (self.weight.to(torch.float32) * h).to(x.dtype)
        if torch.finfo(x.dtype).bits > 32:  # t5, float64 input: float64 x times the float32 factor (as transformers)
            h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form!r}"


# transformers' forward bodies, names replaced by v0 (self), v1 (input), ... in order of first appearance
_RMS_FORMS = {
    "llama": """
def f(v0, v1):
    v2 = v1.dtype
    v1 = v1.to(torch.float32)
    v3 = v1.pow(2).mean(-1, keepdim=True)
    v1 = v1 * torch.rsqrt(v3 + v0.variance_epsilon)
    return v0.weight * v1.to(v2)""",
    "olmo": """
def f(v0, v1):
    v2 = v1.dtype
    v1 = v1.to(torch.float32)
    v3 = v1.pow(2).mean(-1, keepdim=True)
    v1 = v1 * torch.rsqrt(v3 + v0.variance_epsilon)
    return (v0.weight * v1).to(v2)""",
    "float32_weight": """
def f(v0, v1):
    v2 = v1.dtype
    v1 = v1.to(torch.float32)
    v3 = v1.pow(2).mean(-1, keepdim=True)
    v1 = v1 * torch.rsqrt(v3 + v0.variance_epsilon)
    return (v0.weight.to(torch.float32) * v1).to(v2)""",
    "t5": """
def f(v0, v1):
    v2 = v1.to(torch.float32).pow(2).mean(-1, keepdim=True)
    v1 = v1 * torch.rsqrt(v2 + v0.variance_epsilon)
    if v0.weight.dtype in [torch.float16, torch.bfloat16]:
        v1 = v1.to(v0.weight.dtype)
    return v0.weight * v1""",
}
_FORMS = {ast.unparse(ast.parse(src)): name for name, src in _RMS_FORMS.items()}
_FORM_OF_CLASS: dict[type, Optional[str]] = {}


def _canonical(fn: Any) -> Optional[str]:
    """``fn``'s source with docstring, annotations and decorators dropped and local names numbered."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        return None
    names: dict[str, str] = {}

    class Rename(ast.NodeTransformer):
        def visit_arg(self, arg: ast.arg) -> ast.arg:
            arg.arg, arg.annotation = names.setdefault(arg.arg, f"v{len(names)}"), None
            return arg

        def visit_Name(self, name: ast.Name) -> ast.Name:
            if name.id in names or isinstance(name.ctx, ast.Store):
                name.id = names.setdefault(name.id, f"v{len(names)}")
            return name

    node.name, node.returns, node.decorator_list = "f", None, []
    node.body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return ast.unparse(Rename().visit(node))


def _rms_form(cls: type) -> Optional[str]:
    """The RMSNorm form of ``cls.forward`` (``_RMS_FORMS``), or None; computed once per class."""
    if cls not in _FORM_OF_CLASS:
        forward = getattr(cls, "forward", None)
        form = None
        if forward is not None and forward is not nn.Module.forward and not cls.__module__.startswith("normkit_torch"):
            form = _FORMS.get(_canonical(forward) or "")
        _FORM_OF_CLASS[cls] = form
    return _FORM_OF_CLASS[cls]


def _convert_rms(module: nn.Module) -> Optional[nn.Module]:
    weight, eps = module._parameters.get("weight"), getattr(module, "variance_epsilon", None)
    if list(module._parameters) != ["weight"] or module._buffers or module._modules or weight is None:
        return None
    if weight.dim() != 1 or not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    new = Float32RMSNorm(weight.shape[0], eps=float(eps), form=_rms_form(type(module)) or "llama", device="meta")
    return _transplant(module, new)


# ---------------------------------------------------------------- timm and torchvision


class LayerNorm2d(norm.LayerNorm):
    """Layer norm over the channels of ``(N, C, H, W)`` input (timm's ``LayerNorm2d``): permute to channels-last,
    ``layer_norm`` over C, permute back (the output keeps that permuted layout, as timm's)."""

    def forward(self, input: Tensor) -> Tensor:
        x = input.permute(0, 2, 3, 1)
        x = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ThenDropAct:
    """Mixin: the norm's forward, then the ``drop`` and ``act`` children kept from timm's module."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc]


class TimmBatchNormAct2d(_ThenDropAct, bn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: ``act(drop(batch_norm(x)))``; state_dict keys BatchNorm2d's (and ``act.*``)."""


class TimmGroupNormAct(_ThenDropAct, norm.GroupNorm):
    """timm's ``GroupNormAct``: ``act(drop(group_norm(x)))``; state_dict keys GroupNorm's."""


class TimmFrozenBatchNormAct2d(_ThenDropAct, _frozen.FrozenBatchNorm2d):
    """timm's ``FrozenBatchNormAct2d``: ``act(drop(frozen_batch_norm(x)))``; buffers FrozenBatchNorm2d's."""


def _fast_norm_declined(module: nn.Module) -> bool:
    return bool(getattr(module, "_fast_norm", False))  # timm's fast-norm (apex / autocast) path: other numerics


def _as(target: type) -> ConvertFn:
    """Conversion of a subclass of a torch.nn norm class (timm's) into ``target``, configured alike."""

    def convert(module: nn.Module) -> Optional[nn.Module]:
        if _fast_norm_declined(module):
            return None
        return _transplant(module, target(**constructor_kwargs(module), device="meta"))

    convert.__qualname__ = f"convert_to_{target.__name__}"
    return convert


def _frozen_to(target: type) -> ConvertFn:
    def convert(module: nn.Module) -> Optional[nn.Module]:
        return _transplant(module, target(module.weight.shape[0], eps=module.eps, device="meta"))

    convert.__qualname__ = f"convert_to_{target.__name__}"
    return convert


def _timm_conversions() -> dict[type, ConvertFn]:
    from timm.layers import norm as timm_norm, norm_act

    return {
        timm_norm.LayerNorm: _as(norm.LayerNorm),
        timm_norm.LayerNorm2d: _as(LayerNorm2d),
        norm_act.BatchNormAct2d: _as(TimmBatchNormAct2d),
        norm_act.GroupNormAct: _as(TimmGroupNormAct),
        norm_act.FrozenBatchNormAct2d: _frozen_to(TimmFrozenBatchNormAct2d),
    }


def _torchvision_conversions() -> dict[type, ConvertFn]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return {FrozenBatchNorm2d: _frozen_to(_frozen.FrozenBatchNorm2d)}


_LIBRARIES: dict[str, Callable[[], dict[type, ConvertFn]]] = {
    "timm": _timm_conversions,
    "torchvision.ops.misc": _torchvision_conversions,
}


def _register_installed() -> None:
    """Register the conversions of every library already imported (a model holding its modules imported it)."""
    for name, table in _LIBRARIES.items():
        if name in _LIBRARIES_DONE or name not in sys.modules:
            continue
        _LIBRARIES_DONE.add(name)
        for cls, fn in table().items():
            _REGISTRY.setdefault(cls, fn)  # a user's earlier registration wins


# ---------------------------------------------------------------- what the report names


_NORM_ATTRS = ("eps", "epsilon", "variance_epsilon")


def looks_like_norm(module: nn.Module) -> bool:
    """Whether ``module`` looks like a normalization layer: a ``running_mean`` buffer, a ``variance_epsilon``,
    or its own weight / eps with ``Norm`` in its class name, or an ``eps`` with a ``weight`` and no children."""
    if type(module).__module__.startswith("normkit_torch"):
        return False
    if "running_mean" in module._buffers or hasattr(module, "variance_epsilon"):
        return True
    own = bool(module._parameters or module._buffers) or any(isinstance(getattr(module, a, None), float)
                                                               for a in _NORM_ATTRS)
    if "Norm" in type(module).__name__ and own:
        return True
    has_weight = "weight" in module._parameters or "weight" in module._buffers
    return has_weight and not module._modules and isinstance(getattr(module, "eps", None), float)
