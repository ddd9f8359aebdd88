"""Standardize/MinMaxScale.adapt on a dask array, reduced on a dask.distributed LocalCluster (two worker processes).

One cluster for the module. Each adapt is compared with the float64 NumPy statistics of the same data
and with adapting from the NumPy array; the task stream shows one chunk reduction per chunk, run on
the workers (one pass, one compute). The statistics are computed in float64 and rounded once into the
float32 weights: at most 2**-24 relative, so rtol 2**-23.
"""

from __future__ import annotations

import dask.array as da
import distributed
import numpy as np
import pytest

from normkit_keras import MinMaxScale, Standardize

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

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


def _table(n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 4)) * np.array([1.0, 10.0, 0.1, 3.0]) + np.array([0.0, 1e4, -5.0, 2.0])


def _chunked(x: np.ndarray) -> da.Array:
    return da.from_array(x, chunks=(1999, 2))  # uneven last chunk, features split across chunks


def _weights(layer) -> dict[str, np.ndarray]:
    return {w.name: np.asarray(w.numpy()) for w in layer.weights}


def test_standardize_adapt_from_dask_equals_float64_numpy(client):
    x = _table()
    layer = Standardize()
    with distributed.get_task_stream(client) as tasks:
        layer.adapt(_chunked(x))
    got = _weights(layer)
    np.testing.assert_allclose(got["mean"], x.mean(0), **FLOAT32)
    np.testing.assert_allclose(got["variance"], x.var(0), **FLOAT32)
    from_numpy = Standardize()
    from_numpy.adapt(x)
    for name, value in _weights(from_numpy).items():
        np.testing.assert_allclose(got[name], value, **FLOAT32)
    names = [t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in tasks.data]
    assert len([n for n in names if n.startswith("from_array")]) == -(-len(x) // 1999)  # one pass
    workers = {t["worker"] for t in tasks.data}
    assert workers and workers <= set(client.scheduler_info()["workers"])  # ran on the cluster
    x32 = x[:5].astype(np.float32)  # float32 x - mean is exact near 1e4 (Sterbenz); one division: rtol 1e-6
    z = np.asarray(layer(x32))
    np.testing.assert_allclose(z, (x32 - got["mean"].astype(np.float64)) / np.sqrt(got["variance"]), rtol=1e-6, atol=1e-6)


def test_min_max_scale_adapt_from_dask_is_exact_and_nan_follows_numpy_adapt(client):
    x = _table()
    layer = MinMaxScale(feature_range=(-1.0, 1.0))
    layer.adapt(_chunked(x))
    got = _weights(layer)
    np.testing.assert_array_equal(got["data_min"], x.min(0).astype(np.float32))
    np.testing.assert_array_equal(got["data_max"], x.max(0).astype(np.float32))
    x[[3, 2500, 19_999], 1] = np.nan  # the cluster adapt equals adapting from NumPy (the core's NaN rule)
    for make in (Standardize, MinMaxScale):
        got, want = make(), make()
        got.adapt(_chunked(x))
        want.adapt(x)
        for name, value in _weights(want).items():
            np.testing.assert_allclose(_weights(got)[name], value, equal_nan=True, **FLOAT32)


def test_axis_none_and_feature_count_mismatch(client):
    x = _table()
    layer = Standardize(axis=None)  # one statistic of every value
    layer.adapt(_chunked(x))
    got = _weights(layer)
    assert got["mean"].shape == ()
    np.testing.assert_allclose(got["mean"], x.mean(), **FLOAT32)
    np.testing.assert_allclose(got["variance"], x.var(), **FLOAT32)
    layer = Standardize()
    layer.build((None, 3))
    with pytest.raises(ValueError, match="feature axis -1 has 4 entries; the layer has 3"):
        layer.adapt(_chunked(x))
