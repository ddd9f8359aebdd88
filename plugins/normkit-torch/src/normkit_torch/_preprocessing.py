"""Fitted data scalers as modules: z-scores (``Standardize``) and min-max scaling (``MinMaxScale``).

Both are fitted once on training data (a tensor, a NumPy array, a dask array, or an iterable of
batches such as a DataLoader yielding tensors or ``(x, y)`` tuples) with ``normkit.Moments``, whose
Chan merge makes the statistics of many batches equal to those of the whole data. A dask array is
reduced where it lives (a dask.distributed cluster when a Client is active): one graph, one compute,
``Moments.from_array`` of each chunk in float64 merged pairwise with ``Moments.merge``. The fitted
statistics are buffers: they travel with ``state_dict``, ``.to()`` and ``torch.save``.

standardize:   z = (x - mean) / std   (population std; a constant feature gives 0)
min_max_scale: y = lo + (x - data_min) / (data_max - data_min) * (hi - lo)   (a constant feature gives lo)

NaN values are left out of the fit (scikit-learn's rule); a feature with no value at all (all NaN)
gets NaN statistics, so its output is NaN, as scikit-learn's scalers give, with a RuntimeWarning.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from typing import Any, Iterable, Union

import numpy as np
import torch
from torch import Tensor, nn

from normkit import Moments
from normkit_torch import _deploy, _functional

__all__ = ["Standardize", "MinMaxScale"]


def _is_dask_array(data: Any) -> bool:
    """True for a dask array (dask is never imported here: an array of it means it is loaded)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(data, da.Array)


def _dask_moments(data: Any, axis: int, owner: str) -> Moments:
    """``Moments`` of a dask array in ONE compute: each chunk's ``Moments.from_array`` in float64, merged
    pairwise with ``Moments.merge`` (one pass over the data; workers run only normkit and NumPy)."""
    import dask

    if not np.issubdtype(data.dtype, np.floating):
        raise TypeError(f"{owner} expects floating-point data, got a dask array of dtype {data.dtype}")
    x = data.astype(np.float64).rechunk({axis % data.ndim: -1})  # every chunk holds all features
    shapes = itertools.product(*x.chunks)
    parts = [dask.delayed(Moments.from_array)(block, axis=axis)
             for block, shape in zip(x.to_delayed().ravel(), shapes) if 0 not in shape]
    if not parts:
        raise ValueError(f"{owner} got no values to reduce over (a dask array of shape {tuple(data.shape)})")
    while len(parts) > 1:
        merged = [dask.delayed(Moments.merge)(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + parts[len(merged) * 2:]
    (total,) = dask.compute(parts[0])
    return total


def _wide_batches(data: Iterable[Any], owner: str) -> Iterable[Any]:
    """Each batch's model input (a tensor or NumPy array, or the first element of a tuple/list) in float64,
    so that the merge over many batches is exact whatever the data's dtype; anything else is refused."""
    n = -1
    for n, batch in enumerate(data):
        x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) else batch
        if isinstance(x, Tensor):
            if x.is_floating_point():
                x = x.detach().to(torch.float32 if x.device.type == "mps" else torch.float64)
        elif isinstance(x, np.ndarray):
            if np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float64)
        else:
            what = f"a {type(batch).__name__} whose first element is a {type(x).__name__}" if x is not batch else \
                f"a {type(batch).__name__}"
            raise TypeError(f"{owner}.fit: batch {n} of data is {what}; expected a tensor or NumPy array of "
                            "shape (N, ..., num_features), or an (x, y) tuple of them")
        yield x
    if n < 0:
        raise ValueError(f"{owner}.fit: data yielded no batch (an empty {type(data).__name__}); expected at least one")


def _check_finite(moments: Moments, owner: str, stats: tuple[str, ...]) -> None:
    """Refuse inf in the data (scikit-learn does): NaN is left out of a fit, an infinity would poison it."""
    observed = torch.as_tensor(moments.observed).reshape(-1) > 0
    bad = torch.zeros((), dtype=torch.bool)
    for name in stats:
        v = torch.as_tensor(getattr(moments, name))
        bad = bad | (~torch.isfinite(v) & observed)
    if bool(bad.any()):
        features = torch.nonzero(torch.broadcast_to(bad, (len(moments.mean),))).flatten().tolist()
        raise ValueError(f"{owner}.fit: feature(s) {features[:8]} of data hold inf (or values whose variance "
                         "overflows float64): expected finite values or NaN (left out of the fit)")


def _store(buffer: Tensor, value: Tensor, owner: str, name: str) -> None:
    """``buffer <- value``, refusing a finite statistic that overflows the buffer's dtype (float16: 65504)."""
    new = value.to(buffer.dtype)
    overflow = torch.isfinite(value) & ~torch.isfinite(new)
    if bool(overflow.any()):
        big = float(value[overflow].abs().max())
        raise ValueError(f"{owner}.fit: the fitted {name} ({big:.4g}) overflows the buffers' dtype {buffer.dtype}; "
                         f"expected data within its range: build {owner} with dtype=torch.float32")
    buffer.copy_(new)


def _fit_moments(data: Union[Tensor, Iterable[Any]], axis: int, num_features: int, owner: str) -> Moments:
    """Mergeable statistics of ``data`` per feature along ``axis``, with no autograd history."""
    if not (isinstance(data, (Tensor, np.ndarray)) or _is_dask_array(data) or hasattr(data, "__iter__")):
        raise TypeError(f"{owner}.fit: data must be a tensor, a NumPy or dask array, or an iterable of batches "
                        f"(a DataLoader); got {type(data).__name__}")
    with torch.no_grad():
        if isinstance(data, Tensor):
            moments = Moments.from_array(data.detach(), axis=axis)
        elif isinstance(data, np.ndarray):
            moments = Moments.from_array(data, axis=axis)
        elif _is_dask_array(data):
            moments = _dask_moments(data, axis, f"{owner}.fit")
        else:
            moments = Moments.from_batches(_wide_batches(data, owner), axis=axis)
    if isinstance(moments.mean, np.ndarray):  # fitted from NumPy or dask: statistics as tensors
        count = int(moments.count) if np.ndim(moments.count) == 0 else torch.as_tensor(moments.count)
        moments = Moments(count, *(None if v is None else torch.as_tensor(v)
                                   for v in (moments.mean, moments.m2, moments.min, moments.max)))
    if tuple(moments.mean.shape) != (num_features,):
        raise ValueError(
            f"{owner} was built for num_features={num_features} along axis={axis}, but the data has "
            f"{tuple(moments.mean.shape)[0] if moments.mean.ndim else 1} features along that axis"
        )
    return moments


def _nan_where_empty(moments: Moments, owner: str, *stats: Tensor) -> list[Tensor]:
    """``stats`` with NaN for the features the data held no value of (all NaN), warned about by name."""
    observed = torch.as_tensor(moments.observed).reshape(-1)
    empty = torch.broadcast_to(observed == 0, stats[0].shape)
    if not bool(empty.any()):
        return list(stats)
    features = torch.nonzero(empty).flatten().tolist()
    warnings.warn(f"{owner}.fit: feature(s) {features[:8]} hold no value (all NaN); their statistics are NaN and "
                  "so is their output (scikit-learn's scalers do the same)", RuntimeWarning, stacklevel=3)
    return [torch.where(empty, torch.full_like(t, float("nan")), t) for t in stats]


class _Fitted(nn.Module):
    """Shared parts: ``num_features``, ``axis``, a ``count`` buffer and the not-fitted error."""

    def __init__(self, num_features: int, axis: int) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int (the feature axis), got {axis!r}")
        self.num_features = num_features
        self.axis = axis

    def _check_fitted(self, input: Any) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} expects input to be a torch.Tensor, got {type(input).__name__}")
        if _functional.is_compiling():  # a data-dependent check would break the graph
            return
        if int(self.count) == 0:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call .fit(data) with the training data (a tensor or "
                "an iterable of batches) first, or load a state_dict saved after fitting"
            )


class Standardize(_Fitted):
    """Z-score per feature: ``(x - mean) / std`` with the mean and population std fitted by ``fit``.

    Buffers: ``mean`` and ``std`` of shape ``(num_features,)``, ``count`` (values per feature seen).
    ``axis`` is the feature axis of the data and of the input (-1: ``(N, F)`` tables).
    """

    def __init__(self, num_features: int, axis: int = -1, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, axis)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("mean", torch.zeros(num_features, **factory))
        self.register_buffer("std", torch.ones(num_features, **factory))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def fit(self, data: Union[Tensor, Iterable[Any]]) -> "Standardize":
        """Fit ``mean`` and ``std`` on ``data`` (replacing earlier statistics); returns self."""
        moments = _fit_moments(data, self.axis, self.num_features, type(self).__name__)
        owner = type(self).__name__
        _check_finite(moments, owner, ("mean", "m2"))
        mean, std = _nan_where_empty(moments, owner, torch.as_tensor(moments.mean), torch.as_tensor(moments.std))
        _store(self.mean, mean, owner, "mean")
        _store(self.std, std, owner, "std")
        self.count.fill_(moments.count)
        return self

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: the fitted statistics applied by torch operators
            return _deploy.scripted_standardize(input, self.mean, self.std, self.axis, self.count)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_fitted(input)
        return _functional.standardize(input, self.mean, self.std, self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, axis={self.axis}"


class MinMaxScale(_Fitted):
    """Min-max scaling per feature onto ``feature_range`` with ``data_min``/``data_max`` fitted by ``fit``.

    Buffers: ``data_min`` and ``data_max`` of shape ``(num_features,)``, ``count`` (values per feature seen).
    """

    def __init__(
        self,
        num_features: int,
        feature_range: tuple[float, float] = (0, 1),
        axis: int = -1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, axis)
        factory = {"device": device, "dtype": dtype}
        numbers = isinstance(feature_range, (tuple, list)) and len(feature_range) == 2 and all(
            isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in feature_range)
        if not numbers or not float(feature_range[0]) < float(feature_range[1]):
            raise ValueError(f"feature_range must be (min, max), two finite numbers with min < max, got {feature_range!r}")
        lo, hi = feature_range
        if not (np.isfinite(float(lo)) and np.isfinite(float(hi))):
            raise ValueError(f"feature_range must be (min, max), two finite numbers with min < max, got {feature_range!r}")
        self.feature_range = (lo, hi)
        self.register_buffer("data_min", torch.zeros(num_features, **factory))
        self.register_buffer("data_max", torch.ones(num_features, **factory))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def fit(self, data: Union[Tensor, Iterable[Any]]) -> "MinMaxScale":
        """Fit ``data_min`` and ``data_max`` on ``data`` (replacing earlier statistics); returns self."""
        moments = _fit_moments(data, self.axis, self.num_features, type(self).__name__)
        owner = type(self).__name__
        _check_finite(moments, owner, ("min", "max"))
        lo, hi = _nan_where_empty(moments, owner, torch.as_tensor(moments.min), torch.as_tensor(moments.max))
        _store(self.data_min, lo, owner, "data_min")
        _store(self.data_max, hi, owner, "data_max")
        self.count.fill_(moments.count)
        return self

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: the fitted statistics applied by torch operators
            return _deploy.scripted_min_max_scale(input, self.data_min, self.data_max, float(self.feature_range[0]),
                                                  float(self.feature_range[1]), self.axis, self.count)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_fitted(input)
        return _functional.min_max_scale(input, self.data_min, self.data_max, self.feature_range, self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, feature_range={self.feature_range}, axis={self.axis}"
