"""Fitted data scalers as modules: z-scores (``Standardize``) and min-max scaling (``MinMaxScale``).

Both are fitted once on training data (a tensor, a NumPy array, a dask array, or an iterable of
batches such as a DataLoader yielding tensors or ``(x, y)`` tuples) with ``normkit.Moments``, whose
Chan merge makes the statistics of many batches equal to those of the whole data. A dask array is
reduced where it lives (a dask.distributed cluster when a Client is active): one graph, one compute,
``Moments.from_array`` of each chunk in float64 merged pairwise with ``Moments.merge``. The fitted
statistics are buffers: they travel with ``state_dict``, ``.to()`` and ``torch.save``.

standardize:   z = (x - mean) / std   (population std; a constant feature gives 0)
min_max_scale: y = lo + (x - data_min) / (data_max - data_min) * (hi - lo)   (a constant feature gives lo)
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Iterable, Union

import numpy as np
import torch
from normkit import Moments
from torch import Tensor, nn

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


def _fit_moments(data: Union[Tensor, Iterable[Any]], axis: int, num_features: int, owner: str) -> Moments:
    """Mergeable statistics of ``data`` per feature along ``axis``, with no autograd history."""
    with torch.no_grad():
        if isinstance(data, Tensor):
            moments = Moments.from_array(data.detach(), axis=axis)
        elif isinstance(data, np.ndarray):
            moments = Moments.from_array(data, axis=axis)
        elif _is_dask_array(data):
            moments = _dask_moments(data, axis, f"{owner}.fit")
        else:
            moments = Moments.from_batches(data, axis=axis)
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

    def _check_fitted(self) -> None:
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
        self.mean.copy_(moments.mean)
        self.std.copy_(moments.std)
        self.count.fill_(moments.count)
        return self

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: the fitted statistics applied by torch operators
            return _deploy.scripted_standardize(input, self.mean, self.std, self.axis, self.count)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_fitted()
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
        lo, hi = feature_range
        if not float(lo) < float(hi):
            raise ValueError(f"feature_range must be (min, max) with min < max, got {tuple(feature_range)}")
        self.feature_range = (lo, hi)
        self.register_buffer("data_min", torch.zeros(num_features, **factory))
        self.register_buffer("data_max", torch.ones(num_features, **factory))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def fit(self, data: Union[Tensor, Iterable[Any]]) -> "MinMaxScale":
        """Fit ``data_min`` and ``data_max`` on ``data`` (replacing earlier statistics); returns self."""
        moments = _fit_moments(data, self.axis, self.num_features, type(self).__name__)
        self.data_min.copy_(moments.min)
        self.data_max.copy_(moments.max)
        self.count.fill_(moments.count)
        return self

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: the fitted statistics applied by torch operators
            return _deploy.scripted_min_max_scale(input, self.data_min, self.data_max, float(self.feature_range[0]),
                                                  float(self.feature_range[1]), self.axis, self.count)
        if _deploy.is_traced(input):  # torch.fx: a leaf
            return _deploy.traced_call(self, input)
        self._check_fitted()
        return _functional.min_max_scale(input, self.data_min, self.data_max, self.feature_range, self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, feature_range={self.feature_range}, axis={self.axis}"
