"""Standardize and MinMaxScale: fitted from a tensor or a DataLoader, equal to whole-data statistics."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import normkit_torch as nkt
from conftest import F64, data

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _table(n: int = 203, f: int = 4) -> torch.Tensor:
    x = data((n, f))
    return x * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=F64) + torch.tensor([0.0, 1e4, -5.0, 2.0], dtype=F64)


def _loader(x: torch.Tensor, with_labels: bool) -> DataLoader:
    ds = TensorDataset(x, torch.arange(len(x))) if with_labels else x
    return DataLoader(ds, batch_size=16, shuffle=False)  # 203 rows: unequal last batch


@pytest.mark.parametrize("source", ["tensor", "loader", "loader_xy"])
def test_standardize_fit_equals_whole_data(source):
    x = _table()
    fit_on = x if source == "tensor" else _loader(x, with_labels=source == "loader_xy")
    scaler = nkt.Standardize(4, dtype=F64).fit(fit_on)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    torch.testing.assert_close(scaler.mean, mean, **TIGHT)
    torch.testing.assert_close(scaler.std, std, rtol=1e-10, atol=0)
    assert int(scaler.count) == len(x)
    assert list(scaler.state_dict()) == ["mean", "std", "count"]
    y = scaler(x[:7])
    torch.testing.assert_close(y, (x[:7] - mean) / std, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("source", ["tensor", "loader_xy"])
def test_min_max_fit_equals_whole_data(source):
    x = _table()
    fit_on = x if source == "tensor" else _loader(x, with_labels=True)
    scaler = nkt.MinMaxScale(4, feature_range=(-1, 2), dtype=F64).fit(fit_on)
    lo, hi = x.min(0).values, x.max(0).values
    torch.testing.assert_close(scaler.data_min, lo, rtol=0, atol=0)
    torch.testing.assert_close(scaler.data_max, hi, rtol=0, atol=0)
    assert list(scaler.state_dict()) == ["data_min", "data_max", "count"]
    y = scaler(x)
    torch.testing.assert_close(y, -1 + (x - lo) / (hi - lo) * 3, **TIGHT)
    assert float(y.min()) == pytest.approx(-1, abs=1e-12) and float(y.max()) == pytest.approx(2, abs=1e-12)


def test_feature_axis_1_on_images_and_state_round_trip():
    x = data((6, 3, 4, 5))
    scaler = nkt.Standardize(3, axis=1, dtype=F64).fit(x)
    mean = x.mean((0, 2, 3))
    std = x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(scaler.mean, mean, **TIGHT)
    torch.testing.assert_close(scaler(x), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), rtol=1e-9, atol=1e-12)
    buffer = io.BytesIO()
    torch.save(scaler.state_dict(), buffer)
    buffer.seek(0)
    again = nkt.Standardize(3, axis=1, dtype=F64)
    again.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    torch.testing.assert_close(again(x), scaler(x), rtol=0, atol=0)


def test_gradient_flows_through_the_input_only():
    x = _table()
    scaler = nkt.Standardize(4, dtype=F64).fit(x.clone().requires_grad_(True))
    assert scaler.mean.grad_fn is None
    xi = x[:5].clone().requires_grad_(True)
    scaler(xi).sum().backward()
    torch.testing.assert_close(xi.grad, (1 / scaler.std).expand(5, 4), **TIGHT)


def test_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        nkt.Standardize(4)(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        nkt.MinMaxScale(4)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="num_features=3"):
        nkt.Standardize(3).fit(torch.randn(5, 4))
    with pytest.raises(ValueError, match="feature_range"):
        nkt.MinMaxScale(4, feature_range=(1, 1))
    with pytest.raises(ValueError, match="empty"):
        nkt.Standardize(4).fit([])
