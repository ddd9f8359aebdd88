"""Statistics under axis_name: the exact count-weighted merge of the shards (masks = uneven shards), where
Flax's lax.pmean of per-shard means weights every shard equally."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import normkit_flax


def _run(cls, x, mask):
    layer = cls(3, axis_name="shard", use_fast_variance=False, rngs=nnx.Rngs(0))

    @nnx.vmap(in_axes=(None, 0, 0), out_axes=0, axis_name="shard")
    def step(model, xs, ms):
        return model(xs, mask=ms)

    y = step(layer, x, mask)
    return np.asarray(y), np.asarray(layer.mean[...]), np.asarray(layer.var[...])


def test_masked_uneven_shards_merge_exactly_where_flax_pmean_does_not():
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.standard_normal((2, 8, 3)) * 2 + np.array([[[0.0]], [[3.0]]])).astype("float32"))
    counts = (8, 3)  # shard 1 has 3 real samples, 5 padded
    mask = jnp.asarray(np.arange(8)[None, :, None] < np.array(counts)[:, None, None])
    y, mean, var = _run(normkit_flax.BatchNorm, x, mask)
    real = np.concatenate([np.asarray(x[0], np.float64), np.asarray(x[1, :3], np.float64)])
    mu, v = real.mean(0), real.var(0)
    np.testing.assert_allclose(mean, 0.01 * mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, 0.99 + 0.01 * v, rtol=1e-6)
    want = (np.asarray(x, np.float64) - mu) / np.sqrt(v + 1e-5)
    np.testing.assert_allclose(y[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1, :3], want[1, :3], rtol=1e-5, atol=1e-5)
    _, flax_mean, _ = _run(nnx.BatchNorm, x, mask)
    assert np.max(np.abs(flax_mean - 0.01 * mu)) > 1e-3  # equal weights per shard: wrong with uneven shards
