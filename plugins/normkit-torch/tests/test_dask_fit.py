"""Standardize/MinMaxScale.fit on a dask array, reduced on a dask.distributed LocalCluster (two worker processes).

One cluster for the module. Each fit is compared with the float64 NumPy statistics of the same data
and with fitting from the NumPy array; the task stream shows one chunk reduction per chunk, run on
the workers (one pass, one compute).
"""

from __future__ import annotations

import dask.array as da
import distributed
import numpy as np
import pytest
import torch

import normkit_torch as nkt

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

F64 = torch.float64
# float64 data reduced in float64: per-chunk two-pass sums of 2000 values and 10 Chan merges err by a few
# hundred eps relative to values whose spread is 1e-4 of their size (offset 1e4, std 1): 1e-12 is a 10x margin
TIGHT = dict(rtol=1e-12, atol=1e-12)
# float32 buffers: the float64 result is rounded to float32 once, at most 2**-24 relative
FLOAT32 = dict(rtol=2.0**-23, atol=0.0)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
                                       silence_logs=40)
    client = distributed.Client(cluster, timeout="30s")
    try:
        yield client
    finally:
        client.close(timeout=10)
        cluster.close(timeout=10)


def _table(n: int = 20_000, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)) * np.array([1.0, 10.0, 0.1, 3.0]) + np.array([0.0, 1e4, -5.0, 2.0])
    return x.astype(dtype)


def _chunked(x: np.ndarray) -> "da.Array":
    return da.from_array(x, chunks=(1999, 2))  # uneven last chunk, features split across chunks


def test_standardize_fit_from_dask_equals_float64_numpy(client):
    x = _table()
    with distributed.get_task_stream(client) as tasks:
        scaler = nkt.Standardize(4, dtype=F64).fit(_chunked(x))
    torch.testing.assert_close(scaler.mean, torch.from_numpy(x.mean(0)), **TIGHT)
    torch.testing.assert_close(scaler.std, torch.from_numpy(x.std(0)), **TIGHT)
    from_numpy = nkt.Standardize(4, dtype=F64).fit(x)
    for name in ("mean", "std", "count"):
        torch.testing.assert_close(getattr(scaler, name), getattr(from_numpy, name), **TIGHT)
    names = [t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in tasks.data]
    reductions = [name for name in names if name.startswith("from_array")]
    assert len(reductions) == -(-len(x) // 1999)  # one per row chunk: one pass over the data
    workers = {t["worker"] for t in tasks.data}
    assert workers and workers <= set(client.scheduler_info()["workers"])  # ran on the cluster


def test_float32_data_far_from_zero_fits_float32_buffers_to_rounding(client):
    x = _table(dtype=np.float32)
    ref = x.astype(np.float64)
    scaler = nkt.Standardize(4).fit(_chunked(x))
    torch.testing.assert_close(scaler.mean, torch.from_numpy(ref.mean(0)).float(), **FLOAT32)
    torch.testing.assert_close(scaler.std, torch.from_numpy(ref.std(0)).float(), **FLOAT32)


def test_min_max_scale_fit_from_dask_is_exact(client):
    x = _table()
    scaler = nkt.MinMaxScale(4, feature_range=(-1, 1), dtype=F64).fit(_chunked(x))
    assert torch.equal(scaler.data_min, torch.from_numpy(x.min(0)))
    assert torch.equal(scaler.data_max, torch.from_numpy(x.max(0)))
    assert torch.equal(scaler.count, nkt.MinMaxScale(4, dtype=F64).fit(x).count)


def test_nan_follows_the_core_rule(client):
    """NaN in one feature: the cluster fit equals the core's statistics of the whole NumPy array."""
    x = _table(n=5000)
    x[[3, 2500, 4999], 1] = np.nan
    for cls in (nkt.Standardize, nkt.MinMaxScale):
        got, want = cls(4, dtype=F64).fit(_chunked(x)), cls(4, dtype=F64).fit(x)
        for name, value in want.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], value, equal_nan=True, **TIGHT)


def test_errors_name_the_problem(client):
    with pytest.raises(TypeError, match="floating-point data, got a dask array of dtype int64"):
        nkt.Standardize(4).fit(da.ones((10, 4), dtype=np.int64, chunks=5))
    with pytest.raises(ValueError, match="num_features=3"):
        nkt.Standardize(3).fit(_chunked(_table(n=50)))
    with pytest.raises(ValueError, match="no values"):
        nkt.Standardize(4).fit(da.ones((0, 4), chunks=5))
