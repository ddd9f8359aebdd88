"""recalibrate, freeze, fold_batch_norm against float64 NumPy (and flax.nnx's own BatchNorm in the models)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normkit_flax


class _Net(nnx.Module):
    """Linear -> BatchNorm -> relu -> Linear -> (flax.nnx) BatchNorm, features last."""

    def __init__(self, rngs, dtype=jnp.float64):
        self.lin1 = nnx.Linear(4, 5, param_dtype=dtype, rngs=rngs)
        self.bn1 = normkit_flax.BatchNorm(5, param_dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(5, 3, param_dtype=dtype, rngs=rngs)
        self.bn2 = nnx.BatchNorm(3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.lin2(nnx.relu(self.bn1(self.lin1(x)))))


def _batches(n=5, offset=1e4, dtype=np.float64):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((rng.integers(3, 9), 4)) + offset, dtype) for _ in range(n)]


def _numpy_forward(net, x, stats):
    """The float64 eval forward with the given (mean, var) per BatchNorm; returns each BatchNorm's input too."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    def bn(layer, h, st):
        return (h - st[0]) / np.sqrt(st[1] + layer.epsilon) * p(layer.scale) + p(layer.bias)
    h1 = x @ p(net.lin1.kernel) + p(net.lin1.bias)
    h2 = np.maximum(bn(net.bn1, h1, stats[0]), 0) @ p(net.lin2.kernel) + p(net.lin2.bias)
    return h1, h2


def test_recalibrate_gives_exact_population_statistics_in_order():
    net = _Net(nnx.Rngs(0))
    net.train()
    batches = _batches()
    normkit_flax.recalibrate(net, [(b, None) for b in batches])
    x = np.concatenate([np.asarray(b) for b in batches])
    h1 = x @ np.asarray(net.lin1.kernel[...]) + np.asarray(net.lin1.bias[...])
    st1 = (h1.mean(0), h1.var(0))  # biased: Flax's convention
    _, h2 = _numpy_forward(net, x, [st1])  # bn2 sees bn1's recalibrated output
    np.testing.assert_allclose(np.asarray(net.bn1.mean[...]), st1[0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(net.bn1.var[...]), st1[1], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(net.bn2.mean[...]), h2.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(net.bn2.var[...]), h2.var(0), rtol=1e-9)
    assert net.bn1.use_running_average is False and net.bn2.use_running_average is False  # modes restored
    assert type(net.bn1) is normkit_flax.BatchNorm and type(net.bn2) is nnx.BatchNorm
    assert net.bn2.mean[...].dtype == jnp.float64  # a float64 model's statistics kept in float64


def test_recalibrate_merges_in_float64_for_a_float32_model():
    net = _Net(nnx.Rngs(1), dtype=jnp.float32)
    batches = [jnp.asarray(b, jnp.float32) for b in _batches(20)]
    normkit_flax.recalibrate(net, batches)
    h1 = np.concatenate([np.asarray(net.lin1(b), np.float64) for b in batches])
    np.testing.assert_allclose(np.asarray(net.bn1.var[...]), h1.var(0), rtol=1e-5)  # float32 storage, exact merge


def test_recalibrate_refuses_bad_input_by_name_and_changes_nothing():
    net = _Net(nnx.Rngs(2))
    before = np.asarray(net.bn1.mean[...]).copy(), np.asarray(net.bn2.var[...]).copy()
    with pytest.raises(ValueError, match="recalibrate got no batch"):
        normkit_flax.recalibrate(net, [])
    bad = _batches(3)
    bad[2] = bad[2].at[0, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="inputs of bn1 hold NaN or inf in feature"):
        normkit_flax.recalibrate(net, bad)
    np.testing.assert_array_equal(np.asarray(net.bn1.mean[...]), before[0])
    np.testing.assert_array_equal(np.asarray(net.bn2.var[...]), before[1])
    with pytest.raises(TypeError, match="got a single array"):
        normkit_flax.recalibrate(net, _batches(1)[0])
    with pytest.raises(ValueError, match="num_batches must be a positive int or None, got 0"):
        normkit_flax.recalibrate(net, _batches(1), num_batches=0)
    with pytest.raises(TypeError, match="expects a flax.nnx.Module, got list"):
        normkit_flax.recalibrate([], _batches(1))
    assert type(net.bn1) is normkit_flax.BatchNorm  # the capture is gone after an error too


def test_freeze_keeps_batch_norms_in_inference_whatever_the_mode():
    net = _Net(nnx.Rngs(3))
    normkit_flax.recalibrate(net, _batches(3, offset=2.0))
    mean = np.asarray(net.bn1.mean[...]).copy()
    frozen = normkit_flax.freeze(net)
    assert frozen is net and isinstance(net.bn1, normkit_flax.FrozenBatchNorm)
    assert isinstance(net.bn2, normkit_flax.FrozenBatchNorm)
    net.train()
    x = _batches(1, offset=2.0)[0]
    y = np.asarray(net(x))
    np.testing.assert_array_equal(np.asarray(net.bn1.mean[...]), mean)  # no update in train mode
    st1 = (mean, np.asarray(net.bn1.var[...]))
    _, h2 = _numpy_forward(net, np.asarray(x), [st1])
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    want = (h2 - p(net.bn2.mean)) / np.sqrt(p(net.bn2.var) + 1e-5) * p(net.bn2.scale) + p(net.bn2.bias)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    h = jnp.asarray(np.random.default_rng(6).standard_normal((6, 5)) * 3)
    np.testing.assert_array_equal(np.asarray(net.bn1(h, use_running_average=False)),  # the call's flag too
                                  np.asarray(net.bn1(h, use_running_average=True)))
    params = nnx.state(net, nnx.Param)
    assert "scale" in params["bn1"]  # the same Variables: an optimizer still sees the affine parameters


def test_fold_batch_norm_conv_and_linear_in_sequential():
    rngs = nnx.Rngs(4)
    f64 = dict(param_dtype=jnp.float64)
    model = nnx.Sequential(
        nnx.Conv(3, 4, (3, 3), **f64, rngs=rngs), nnx.BatchNorm(4, **f64, rngs=rngs), nnx.relu,
        nnx.Conv(4, 4, (3, 3), use_bias=False, feature_group_count=2, **f64, rngs=rngs),
        normkit_flax.BatchNorm(4, use_scale=False, **f64, rngs=rngs),
        lambda h: h.reshape(h.shape[0], -1),
        nnx.Linear(4 * 8 * 8, 5, **f64, rngs=rngs), normkit_flax.BatchNorm(5, **f64, rngs=rngs))
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if isinstance(layer, nnx.BatchNorm):
            layer.mean[...] = jnp.asarray(rng.standard_normal(layer.mean.shape))
            layer.var[...] = jnp.asarray(rng.uniform(0.5, 3.0, layer.var.shape))
            if layer.scale is not None:
                layer.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, layer.scale.shape))
            layer.bias[...] = jnp.asarray(rng.standard_normal(layer.bias.shape))
    model.eval()
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)))
    want = np.asarray(model(x))
    folded = normkit_flax.fold_batch_norm(model)
    assert [type(l).__name__ for l in folded.layers if isinstance(l, nnx.Module)] == ["Conv", "Conv", "Linear"]
    assert len(model.layers) == 8  # the input model is unchanged
    np.testing.assert_allclose(np.asarray(folded(x)), want, rtol=0, atol=1e-10)
    bad = nnx.Sequential(nnx.Linear(3, 3, rngs=rngs), nnx.BatchNorm(3, axis=0, rngs=rngs))
    with pytest.raises(ValueError, match="must normalize the last axis"):
        normkit_flax.fold_batch_norm(bad)
