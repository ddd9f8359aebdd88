"""Swap torch.nn normalization modules for normkit's (``convert``) and back (``to_torch``).

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, the replacement keeps the very same
Parameter and buffer objects (an optimizer built before the swap keeps working), the device,
dtype, ``requires_grad`` and train/eval mode. Modules of exactly a mapped class are swapped. A
subclass of one (timm's ``LayerNorm2d``, a model's own ``MyBatchNorm``) may change behaviour: it
is skipped and reported (``UnconvertedNormWarning``, or ``report=True``), unless
``subclasses=True`` and it overrides none of the methods normkit's class replaces (``forward``):
then its class becomes a subclass of both (normkit's forward, every other method and attribute
its own), in place.
"""

from __future__ import annotations

from typing import Any, Union

from torch import nn

from normkit._conversion import ConversionReport, UnconvertedNormWarning
from normkit_torch import _batchnorm, _conversions, _instancenorm, _normalization, _sync  # noqa: F401 - they register
from normkit_torch._twins import TO_NORMKIT, TO_TORCH, constructor_kwargs, swap as _swap

__all__ = ["convert", "to_torch", "constructor_kwargs", "ConversionReport", "UnconvertedNormWarning"]


# ---------------------------------------------------------------- subclasses of torch.nn's classes

_MIXED: dict[tuple[type, type], type] = {}  # (normkit class, user's subclass) -> the class of both


def _torch_base(cls: type) -> Union[type, None]:
    """The mapped torch.nn class ``cls`` derives from (the nearest in its MRO), or None."""
    for base in cls.__mro__[1:]:
        if base in TO_NORMKIT:
            return base
    return None


def _replaced_methods(ours: type, base: type) -> set[str]:
    """Names of the functions and properties normkit's class defines over its torch.nn base (``forward``...)."""
    names: set[str] = set()
    for cls in ours.__mro__[: ours.__mro__.index(base)]:
        names.update(k for k, v in vars(cls).items() if callable(v) or isinstance(v, property))
    return names - {"__init__", "extra_repr"}  # ours call the next class's (torch.nn's, or the subclass's)


def _overrides(sub: type, base: type, names: set[str]) -> list[str]:
    """Which of ``names`` the classes from ``sub`` up to ``base`` (exclusive) define."""
    found: list[str] = []
    for cls in sub.__mro__[: sub.__mro__.index(base)]:
        found.extend(k for k in vars(cls) if k in names and k not in found)
    return sorted(found)


def _rebuild_mixed(ours: type, sub: type) -> nn.Module:
    cls = _mixed_class(ours, sub)
    return cls.__new__(cls)


def _reduce_mixed(self: nn.Module, protocol: int) -> tuple:
    """Pickle / deepcopy: the class is made at run time, so it is rebuilt from its two bases."""
    ours, sub = type(self).__bases__
    return _rebuild_mixed, (ours, sub), self.__dict__.copy()


def _mixed_class(ours: type, sub: type) -> type:
    """``class (ours, sub)``: normkit's forward, the subclass's every other method and attribute; made once."""
    cls = _MIXED.get((ours, sub))
    if cls is None:
        cls = type(sub.__name__, (ours, sub), {
            "__module__": sub.__module__,
            "__qualname__": sub.__qualname__,
            "__doc__": f"{sub.__qualname__} computing with normkit_torch.{ours.__name__} (made by convert).",
            "__reduce_ex__": _reduce_mixed,
        })
        _MIXED[(ours, sub)] = cls
    return cls


def _subclass_decision(module: nn.Module, subclasses: bool) -> tuple[Union[type, None], str]:
    """(the class to give ``module``, or None, and why not) for a subclass of a mapped torch.nn class."""
    sub = type(module)
    base = _torch_base(sub)
    if base is None or issubclass(sub, tuple(TO_TORCH)):  # not a norm, or already normkit's
        return None, ""
    ours = TO_NORMKIT[base]
    overridden = _overrides(sub, base, _replaced_methods(ours, base))
    if overridden:
        return None, f"subclass of torch.nn.{base.__name__} overriding {', '.join(overridden)}: left as it is"
    if not subclasses:
        return None, f"subclass of torch.nn.{base.__name__}: pass subclasses=True to convert it"
    return _mixed_class(ours, sub), ""


# ---------------------------------------------------------------- the walk

_DECLINED = "its conversion declined it (timm's fast_norm path, or a configuration normkit's class cannot hold)"
_UNKNOWN = "looks like a normalization layer that normkit cannot convert: normkit_torch.register_conversion adds one"


def _replace(module: nn.Module, mapping: dict[type, type], seen: dict[int, nn.Module], path: str,
             subclasses: Union[bool, None], report: ConversionReport) -> nn.Module:
    """``module`` with every module of a ``mapping`` class swapped; ``subclasses`` None: no subclass handling
    (``to_torch``: a converted subclass gets its own class back)."""
    if id(module) in seen:
        return seen[id(module)]
    name = path or "(root)"
    target = mapping.get(type(module))
    if mapping is TO_TORCH and getattr(module, "virtual_batch_size", None) is not None:
        target = None  # ghost batch norm: torch.nn has none, the module stays (as BatchNorm does)
    library = _conversions.conversion_for(module) if mapping is TO_NORMKIT and target is None else None
    out = module
    if target is not None:
        out = _swap(module, target)
        report.converted.append((name, type(module).__name__, target.__name__))
    elif library is not None:  # a model library's class (register_conversion), or transformers' RMSNorm shape
        out = library(module) or module
        if out is module:
            report.skipped.append((name, type(module).__name__, _DECLINED))
        else:
            report.converted.append((name, type(module).__name__, type(out).__name__))
    elif subclasses is None:
        if type(module) in _MIXED.values():
            module.__class__ = type(module).__bases__[1]
            report.converted.append((name, type(module).__name__, type(module).__name__))
    elif isinstance(module, tuple(TO_NORMKIT)):
        mixed, reason = _subclass_decision(module, subclasses)
        if mixed is not None:
            old = type(module).__name__
            module.__class__ = mixed
            report.converted.append((name, old, f"{mixed.__mro__[1].__name__} + {old}"))
        elif reason:
            report.skipped.append((name, type(module).__name__, reason))
    elif _conversions.looks_like_norm(module):
        report.skipped.append((name, type(module).__name__, _UNKNOWN))
    if out is module:
        for child_name, child in list(module._modules.items()):
            if child is not None:
                child_path = f"{path}.{child_name}" if path else child_name
                module._modules[child_name] = _replace(child, mapping, seen, child_path, subclasses, report)
    seen[id(module)] = out
    return out


def convert(module: nn.Module, *, subclasses: bool = False, report: bool = False) -> Any:
    """Replace every torch.nn normalization module in ``module`` by its normkit twin, in place; return the model.

    Swapped: BatchNorm1d/2d/3d, SyncBatchNorm (-> ``normkit_torch.SyncBatchNorm``, same process
    group, synchronized on any backend), InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm and the
    Lazy variants; the model libraries' norm layers when imported (``normkit_torch._conversions``:
    transformers' RMSNorm family by the shape of its forward, timm's LayerNorm, LayerNorm2d, BatchNormAct2d,
    GroupNormAct, FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d) and what ``register_conversion`` adds.
    Any other module that looks like a normalization layer is reported. As with ``convert_sync_batchnorm``, a root that is itself a normalization
    module cannot be swapped in place: use the returned module.

    A subclass of one of those classes is skipped and named in an ``UnconvertedNormWarning``; with
    ``subclasses=True`` one that does not override ``forward`` is converted in place (its class
    becomes a subclass of normkit's and its own: attributes, other methods and ``isinstance`` kept).
    ``report=True`` returns ``(model, ConversionReport)`` instead of warning.
    """
    summary = ConversionReport([], [])
    out = _replace(module, TO_NORMKIT, {}, "", bool(subclasses), summary)
    return summary.finish(out, report=report, noun="module")


def to_torch(module: nn.Module) -> nn.Module:
    """Replace every normkit module in ``module`` by its torch.nn twin, in place; return the model.

    ``normkit_torch.SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm`` (same process group); a
    subclass converted with ``subclasses=True`` gets its own class back. ``normkit_torch.BatchNorm``
    (any rank, local statistics) and a batch norm with ``virtual_batch_size`` (ghost batch norm) have no
    torch twin and are left as they are.
    """
    return _replace(module, TO_TORCH, {}, "", None, ConversionReport([], []))
