"""``NormState``: one normalization layer's state, free of any framework's conventions.

A plugin reads a layer into a ``NormState`` (``get_state``), writes one into a layer (``set_state``)
or builds a layer from one (``from_state``), translating its framework's conventions at that edge:
torch's momentum is the state's, Keras's is ``1 - momentum``; both frameworks' ``running_var`` is
the population-variance estimate the inference formula uses, so it is copied unchanged.
``StateCopyReport`` pairs the normalization layers of two models for the plugins' whole-model copy;
``norm_states`` reads every layer's state of a model of any framework that has a normkit plugin.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["NormState", "StateCopyReport", "KINDS", "norm_states"]

KINDS = ("batch", "layer", "group", "instance", "rms")
_DTYPES = ("float16", "float32", "float64", "bfloat16")
_ARRAYS = ("weight", "bias", "running_mean", "running_var")
_RUNNING_KINDS = ("batch", "instance")
_FEATURE_KINDS = ("batch", "group", "instance")
# the smallest magnitude that rounds to inf in each dtype (largest finite value plus half an ulp), and that value
_OVERFLOW = {"float16": 2.0**15 * (2 - 2.0**-11), "bfloat16": 2.0**127 * (2 - 2.0**-8), "float32": 2.0**127 * (2 - 2.0**-24)}
_LARGEST = {"float16": 65504.0, "bfloat16": 2.0**127 * (2 - 2.0**-7), "float32": float(np.finfo(np.float32).max)}


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"NormState.{name} must be a sequence of ints, got {value!r}") from None
    if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in value):
        raise TypeError(f"NormState.{name} must hold ints, got {value!r}")
    return out


@dataclass(frozen=True, eq=False)
class NormState:
    """The state of one normalization layer, with every convention stated (validated on construction).

    kind: ``"batch"``, ``"layer"``, ``"group"``, ``"instance"`` or ``"rms"``.
    shape: shape of the per-feature arrays: ``(C,)`` for batch, group and instance norm; the
        normalized shape for layer and RMS norm (torch's ``normalized_shape``).
    weight: the scale (torch ``weight``, Keras ``gamma``, Keras RMS ``scale``); None: not scaled.
    bias: the offset (torch ``bias``, Keras ``beta``); None: not centred. Never set for rms.
    running_mean, running_var: batch/instance running statistics, both or neither (None: the
        layer normalizes with the batch's statistics at inference too). ``running_var`` is the
        population-variance estimate used as ``(x - mean) / sqrt(running_var + eps)`` at inference,
        in both frameworks; only how it is *updated* differs (``running_var_correction``).
        Arrays are read-only NumPy copies in the source's dtype (``dtype``; bfloat16 is widened
        to float32 exactly), so ``to_dict``/``from_dict`` and a copy across frameworks are bitwise.
    eps: the epsilon the source adds to the variance, kept as is (torch RMSNorm's ``eps=None`` is
        recorded as the machine epsilon it resolves to).
    momentum: weight of the new batch in the running update (torch's convention; Keras's momentum
        is ``1 - momentum``, converted in decimal so 0.1 <-> 0.9 and 0.01 <-> 0.99 exactly).
        None: the cumulative average over ``num_batches_tracked`` batches (torch BatchNorm
        ``momentum=None``), or the layer keeps no running statistics (momentum has no effect).
    running_var_correction: how the source *updates* ``running_var``: 1 with the unbiased batch
        variance (torch), 0 with the biased one (Keras); None without running statistics.
    num_batches_tracked: batches the running statistics have seen (torch's counter); None if unknown or none.
    num_groups: group norm's number of groups (``C`` divisible by it); None for other kinds.
    feature_axis: batch/group/instance: the axis of the features in the layer's input, 1 for
        channels-first (torch), -1 for channels-last (Keras's default); other axes negative
        where the input rank is known. None for layer and rms.
    normalized_axes: layer/rms: the axes normalized over, sorted, negative (counted from the end)
        where the input rank is known; None for other kinds.
    input_rank: rank of the input the layer was built for (BatchNorm2d: 4); None where it takes several.
    dtype: the source's parameter dtype name (float16, float32, float64 or bfloat16).
    source: the class the state was read from (information only: not compared, not validated).
    """

    kind: str
    shape: tuple[int, ...]
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    running_mean: Optional[np.ndarray] = None
    running_var: Optional[np.ndarray] = None
    eps: float = 1e-5
    momentum: Optional[float] = None
    running_var_correction: Optional[int] = None
    num_batches_tracked: Optional[int] = None
    num_groups: Optional[int] = None
    feature_axis: Optional[int] = None
    normalized_axes: Optional[tuple[int, ...]] = None
    input_rank: Optional[int] = None
    dtype: str = "float32"
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"NormState.kind must be one of {KINDS}, got {self.kind!r}")
        set_ = object.__setattr__
        shape = _int_tuple("shape", self.shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"NormState.shape must be non-empty positive sizes, got {self.shape!r}")
        set_(self, "shape", shape)
        if self.dtype not in _DTYPES:
            raise ValueError(f"NormState.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in _ARRAYS:
            set_(self, name, self._array(name, getattr(self, name)))
        self._check_scalars()
        self._check_running()
        self._check_axes()

    def _array(self, name: str, value: Any) -> Optional[np.ndarray]:
        """A read-only copy of ``value`` in the state's storage dtype, with the state's shape."""
        if value is None:
            return None
        storage = np.dtype("float32" if self.dtype == "bfloat16" else self.dtype)
        a = np.asarray(value)
        if a.dtype.kind != "f":
            raise TypeError(f"NormState.{name} must be a floating array, got dtype {a.dtype}")
        if a.dtype != storage and not np.array_equal(a.astype(storage).astype(a.dtype), a, equal_nan=True):
            raise ValueError(f"NormState.{name}: values of dtype {a.dtype} are not exact in dtype={self.dtype!r}")
        if a.shape != self.shape:
            raise ValueError(f"NormState.{name} must have shape {self.shape}, got {a.shape}")
        bad = ~np.isfinite(a)
        if bad.any():
            where = np.argwhere(bad)[:3].tolist()
            raise ValueError(
                f"NormState.{name} must be finite, got {int(bad.sum())} non-finite value(s) "
                f"({', '.join(f'{a[tuple(i)]} at {tuple(i)}' for i in where)}{', ...' if bad.sum() > 3 else ''}): "
                "a diverged layer's state cannot be transferred"
            )
        a = np.array(a, dtype=storage, copy=True)
        a.flags.writeable = False
        return a

    def _check_scalars(self) -> None:
        eps = self.eps
        if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not 0.0 <= float(eps) < float("inf"):
            raise ValueError(f"NormState.eps must be a finite float >= 0, got {eps!r}")
        object.__setattr__(self, "eps", float(eps))
        for name in ("num_batches_tracked", "num_groups", "input_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise ValueError(f"NormState.{name} must be None or an int >= 0, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, int(v))
        if self.kind == "rms" and self.bias is not None:
            raise ValueError("NormState.bias must be None for kind 'rms' (RMS norm has no offset)")
        if self.kind == "group":
            g, c = self.num_groups, self.shape[0]
            if not g or len(self.shape) != 1 or c % g:
                raise ValueError(f"NormState.num_groups must divide the {self.shape} channels, got {g!r}")
        elif self.num_groups is not None:
            raise ValueError(f"NormState.num_groups must be None for kind {self.kind!r}, got {self.num_groups!r}")

    def _check_running(self) -> None:
        has_mean, has_var = self.running_mean is not None, self.running_var is not None
        if has_mean != has_var:
            raise ValueError("NormState.running_mean and running_var must be given together (or neither)")
        if has_mean and self.kind not in _RUNNING_KINDS:
            raise ValueError(f"NormState of kind {self.kind!r} has no running statistics, got running_mean")
        m = self.momentum
        if not has_mean:
            if m is not None or self.running_var_correction is not None:
                raise ValueError(
                    "NormState.momentum and running_var_correction must be None without running statistics, "
                    f"got momentum={m!r}, running_var_correction={self.running_var_correction!r}"
                )
            return
        if m is not None:
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Real) or not 0.0 <= float(m) <= 1.0:
                raise ValueError(f"NormState.momentum must be None or a float in [0, 1], got {m!r}")
            object.__setattr__(self, "momentum", float(m))
        if self.running_var_correction not in (0, 1):
            raise ValueError(
                f"NormState.running_var_correction must be 0 (biased) or 1 (unbiased), got {self.running_var_correction!r}"
            )
        if not bool(np.all(self.running_var >= 0)):
            raise ValueError(f"NormState.running_var holds negative values (it must be a variance), got {self.running_var.min()!r}")

    def _check_axes(self) -> None:
        rank = self.input_rank
        if self.kind in _FEATURE_KINDS:
            a = self.feature_axis
            if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
                raise ValueError(f"NormState.feature_axis must be an int for kind {self.kind!r}, got {a!r}")
            object.__setattr__(self, "feature_axis", int(a))
            if len(self.shape) != 1:
                raise ValueError(f"NormState.shape must be (C,) for kind {self.kind!r}, got {self.shape}")
            if self.normalized_axes is not None:
                raise ValueError(f"NormState.normalized_axes must be None for kind {self.kind!r}")
            if rank is not None and not -rank <= a < rank:
                raise ValueError(f"NormState.feature_axis {a} is out of range for input_rank {rank}")
            return
        if self.feature_axis is not None:
            raise ValueError(f"NormState.feature_axis must be None for kind {self.kind!r}, got {self.feature_axis!r}")
        axes = self.normalized_axes
        if axes is None:
            raise ValueError(f"NormState.normalized_axes is required for kind {self.kind!r}")
        axes = _int_tuple("normalized_axes", axes)
        if len(axes) != len(self.shape) or list(axes) != sorted(set(axes)):
            raise ValueError(
                f"NormState.normalized_axes must be {len(self.shape)} sorted distinct axes (one per dimension of "
                f"shape {self.shape}), got {self.normalized_axes!r}"
            )
        if rank is not None and any(not -rank <= a < rank for a in axes):
            raise ValueError(f"NormState.normalized_axes {axes} are out of range for input_rank {rank}")
        object.__setattr__(self, "normalized_axes", axes)

    def require_fits(self, dtype: str, target: str) -> None:
        """Refuse to store this state in ``dtype`` (a name: ``"float16"``, ...) where a value would become inf.

        ``target`` names the layer in the error. A value at or above the dtype's overflow threshold (its largest
        finite value plus half an ulp: 65520 for float16) rounds to inf; smaller ones round to a finite number.
        """
        limit = _OVERFLOW.get(dtype)
        if limit is None:
            return
        for name in _ARRAYS:
            a = getattr(self, name)
            if a is None or a.size == 0:
                continue
            big = float(np.max(np.abs(a)))
            if big >= limit:
                raise ValueError(
                    f"cannot store the state's {name} in {target} of dtype {dtype}: it holds {big!r}, above {dtype}'s "
                    f"largest finite value {_LARGEST[dtype]!r} (it would become inf); keep the layer in float32 "
                    "(or bfloat16, largest 3.39e38)"
                )

    # --- derived flags -------------------------------------------------------------------------------
    @property
    def scaled(self) -> bool:
        """True when the layer multiplies by a learned per-feature scale (``weight``)."""
        return self.weight is not None

    @property
    def centered(self) -> bool:
        """True when the layer adds a learned per-feature offset (``bias``)."""
        return self.bias is not None

    @property
    def affine(self) -> bool:
        """torch's ``affine``/``elementwise_affine``: scaled or centred (torch makes both or, with bias=False, a weight)."""
        return self.scaled or self.centered

    @property
    def track_running_stats(self) -> bool:
        """True when the layer keeps running statistics (and normalizes with them at inference)."""
        return self.running_mean is not None

    @property
    def trailing_axes(self) -> Optional[tuple[int, ...]]:
        """layer/rms: ``normalized_axes`` counted from the end (None where a positive axis and no rank)."""
        axes = self.normalized_axes
        if axes is None:
            return None
        if self.input_rank is not None:
            return tuple(a - self.input_rank if a >= 0 else a for a in axes)
        return axes if all(a < 0 for a in axes) else None

    # --- conversions ---------------------------------------------------------------------------------
    @staticmethod
    def complement(momentum: float) -> float:
        """``1 - momentum`` computed in decimal on the shortest repr: 0.1 <-> 0.9, 0.99 <-> 0.01 exactly.

        Binary ``1 - m`` is not an involution (``1 - (1 - 0.1) == 0.09999999999999998``); this is,
        for every momentum written with up to 15 significant digits.
        """
        return float(Decimal(1) - Decimal(repr(float(momentum))))

    def replace(self, **changes: Any) -> "NormState":
        """A copy with ``changes`` applied and validated (``dataclasses.replace``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise TypeError(f"NormState has no field(s) {unknown}; fields: {list(values)}")
        values.update(changes)
        return NormState(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: arrays as nested lists of Python floats (exact for every dtype), tuples as lists."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NormState":
        """The inverse of ``to_dict`` (bitwise); unknown keys and missing required ones are errors."""
        if not isinstance(data, Mapping):
            raise TypeError(f"NormState.from_dict expects a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"NormState.from_dict: unknown key(s) {unknown}; expected keys from {names}")
        missing = [n for n in names if n not in data and n != "source"]
        if missing:
            raise ValueError(f"NormState.from_dict: missing key(s) {missing} (to_dict writes every field)")
        values = dict(data)
        dtype = values["dtype"]
        storage = "float32" if dtype == "bfloat16" else dtype
        for name in _ARRAYS:
            if values.get(name) is not None and dtype in _DTYPES:
                values[name] = np.asarray(values[name], dtype=np.float64).astype(storage)
        for name in ("shape", "normalized_axes"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    # --- comparison ----------------------------------------------------------------------------------
    def differences(self, other: "NormState", ignore: Sequence[str] = ()) -> list[str]:
        """Names of the compared fields that differ (arrays bitwise), skipping ``ignore``."""
        out = []
        for f in fields(self):
            if not f.compare or f.name in ignore:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                same = (
                    isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                    and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                )
            else:
                same = type(a) is type(b) and a == b
            if not same:
                out.append(f.name)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormState):
            return NotImplemented
        return not self.differences(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = f"<{v.dtype} {v.shape}>"
            elif v is None or (f.name == "source" and not v):
                continue
            else:
                v = repr(v)
            parts.append(f"{f.name}={v}")
        return f"NormState({', '.join(parts)})"


@dataclass
class StateCopyReport:
    """What a whole-model copy of normalization states did: pairs copied, pairs refused, layers left over.

    ``pairs`` are ``(source name, target name)`` in copy order; ``mismatched`` holds
    ``(source, target, reason)`` for pairs that cannot be copied (kind or size); ``unmatched_source``
    and ``unmatched_target`` the layers no pair took. ``ok`` is True when nothing was refused or left.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    copied: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)
    unmatched_source: list[str] = field(default_factory=list)
    unmatched_target: list[str] = field(default_factory=list)

    @classmethod
    def plan(
        cls, source: Sequence[str], target: Sequence[str], mapping: Optional[Mapping[str, str]] = None
    ) -> "StateCopyReport":
        """Pair ``source`` with ``target`` names: in order, or by ``mapping`` {source name: target name}."""
        report = cls()
        if mapping is None:
            n = min(len(source), len(target))
            report.pairs = list(zip(source[:n], target[:n]))
            report.unmatched_source, report.unmatched_target = list(source[n:]), list(target[n:])
            return report
        targets = list(mapping.values())
        repeated = sorted({t for t in targets if targets.count(t) > 1})
        if repeated:
            raise ValueError(f"mapping sends several source layers to the same target layer(s) {repeated}")
        for s, t in mapping.items():
            if s not in source:
                raise KeyError(f"mapping names source layer {s!r}, which is not one of {list(source)}")
            if t not in target:
                raise KeyError(f"mapping names target layer {t!r}, which is not one of {list(target)}")
        report.pairs = [(s, mapping[s]) for s in source if s in mapping]
        taken = set(mapping.values())
        report.unmatched_source = [s for s in source if s not in mapping]
        report.unmatched_target = [t for t in target if t not in taken]
        return report

    @classmethod
    def carry_out(
        cls, states: Mapping[str, "NormState"], layers: Mapping[str, Any], writes: Callable[[Any, "NormState"], Callable[[], None]],
        mapping: Optional[Mapping[str, str]] = None, *, strict: bool = True,
    ) -> "StateCopyReport":
        """Plan the pairs, check each (``writes(layer, state)`` returns the write, or raises ValueError/TypeError
        naming the mismatch), then write: all or nothing when ``strict`` (ValueError with the report)."""
        report = cls.plan(list(states), list(layers), mapping)
        checked = []
        for s, t in report.pairs:
            try:
                checked.append((s, t, writes(layers[t], states[s])))
            except (ValueError, TypeError) as exc:
                report.mismatched.append((s, t, str(exc)))
        if strict and not report.ok:
            raise ValueError(f"normalization states do not match (nothing copied):\n{report}")
        for s, t, write in checked:
            write()
            report.copied.append((s, t))
        return report

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.unmatched_source or self.unmatched_target)

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} of {len(self.pairs)} normalization layer pairs"]
        lines += [f"  {s} -> {t}: {why}" for s, t, why in self.mismatched]
        if self.unmatched_source:
            lines.append(f"  source layers without a target: {self.unmatched_source}")
        if self.unmatched_target:
            lines.append(f"  target layers without a source: {self.unmatched_target}")
        return "\n".join(lines)


def norm_states(source: Any) -> dict[str, NormState]:
    """``{name: NormState}`` of every normalization layer of ``source``, in definition order.

    ``source`` is a model of any framework with a normkit plugin (read by that plugin's ``norm_states``:
    the plugin of the most derived class's library, so a Keras model on the torch backend is Keras's), a
    mapping ``{name: NormState}``, or a sequence of ``NormState`` (named ``"0"``, ``"1"``, ...).
    """
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Sequence) and not isinstance(source, str) and all(isinstance(s, NormState) for s in source):
        return {str(i): s for i, s in enumerate(source)}
    from normkit.plugin.manager import framework, frameworks

    known = frameworks()  # only a library that defines one of source's classes is imported
    for cls in type(source).__mro__:
        root = cls.__module__.split(".")[0]
        for name, module in known.items():
            if root in (name, module.split(".")[0]):
                reader = getattr(framework(name), "norm_states", None)
                if reader is not None:
                    return reader(source)
    raise TypeError(f"cannot read normalization states from {type(source).__name__}: not a model of a framework "
                    f"with a normkit plugin ({sorted(known)}), a mapping or a sequence of NormState")
