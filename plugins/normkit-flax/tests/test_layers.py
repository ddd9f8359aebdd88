"""normkit_flax's layers against their flax.nnx twins and a float64 NumPy reference."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normkit_flax
from normkit.plugin.kernels import use_policy
from normkit.testing import reference

NAMES = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
EXTRA = {"GroupNorm": {"num_groups": 2}}
SHAPE = (6, 5, 4)  # (batch, length, features)


def pair(name, **kw):
    kw = {**EXTRA.get(name, {}), **kw}
    return getattr(normkit_flax, name)(4, rngs=nnx.Rngs(0), **kw), getattr(nnx, name)(4, rngs=nnx.Rngs(0), **kw)


def randomize(a, b, seed=1):
    """The same random scale/bias (and statistics) in both layers."""
    rng = np.random.default_rng(seed)
    for name in ("scale", "bias", "mean"):
        if getattr(a, name, None) is not None:
            v = jnp.asarray(rng.standard_normal(4).astype("float32"))
            getattr(a, name)[...] = v
            getattr(b, name)[...] = v
    if getattr(a, "var", None) is not None:
        v = jnp.asarray(rng.uniform(0.5, 2, 4).astype("float32"))
        a.var[...] = v
        b.var[...] = v


def data(shape=SHAPE, offset=0.5, seed=0, dtype="float32"):
    return jnp.asarray((np.random.default_rng(seed).standard_normal(shape) * 2 + offset).astype(dtype))


def ref64(name, x, layer, mask=None):
    """Float64 output of the layer in training mode (batch statistics), from normkit.testing.reference."""
    x = np.asarray(x, np.float64)
    w = None if layer.scale is None else np.asarray(layer.scale[...], np.float64)
    b = None if getattr(layer, "bias", None) is None else np.asarray(layer.bias[...], np.float64)
    eps = layer.epsilon
    if mask is not None:  # masked statistics by hand: weighted mean/var over the reduced axes
        m = np.broadcast_to(np.asarray(mask, np.float64), x.shape)
        axes = {"BatchNorm": (0, 1), "InstanceNorm": (1,)}[name]
        mu = (x * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
        var = (((x - mu) ** 2) * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
        y = (x - mu) / np.sqrt(var + eps)
        return y * (1 if w is None else w) + (0 if b is None else b)
    if name == "BatchNorm":
        return reference.batch_norm(x, None, None, w, b, training=True, eps=eps, axis=-1)[0]
    if name == "LayerNorm":
        return reference.layer_norm(x, w, b, axis=-1, eps=eps)
    if name == "RMSNorm":
        return reference.rms_norm(x, w, axis=-1, eps=eps)
    if name == "GroupNorm":
        return reference.group_norm(x, 2, w, b, axis=-1, eps=eps)
    return reference.instance_norm(x, w, b, axis=-1, eps=eps)


@pytest.mark.parametrize("name", NAMES)
def test_signature_variables_and_modes_are_flaxs(name):
    ours, twin = pair(name)
    assert isinstance(ours, type(twin))
    assert inspect.signature(type(ours).__init__) == inspect.signature(type(twin).__init__)
    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(type(ours).__call__) == params(type(twin).__call__)
    s_ours, s_twin = nnx.state(ours), nnx.state(twin)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_twin)
    for a, b in zip(jax.tree.leaves(s_ours, is_leaf=lambda v: isinstance(v, nnx.Variable)),
                    jax.tree.leaves(s_twin, is_leaf=lambda v: isinstance(v, nnx.Variable))):
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a[...], b[...])
    assert len(nnx.state(ours, nnx.Param)) == len(nnx.state(twin, nnx.Param)) >= 1


@pytest.mark.parametrize("policy", ["auto", "core"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_matches_twin_and_float64_reference(name, fast, policy):
    ours, twin = pair(name, use_fast_variance=fast)
    randomize(ours, twin)
    with use_policy(policy):
        for step in range(2):
            x = data(seed=step)
            y, y_twin = np.asarray(ours(x)), np.asarray(twin(x))
            assert y.dtype == y_twin.dtype == np.float32
            np.testing.assert_allclose(y, y_twin, rtol=1e-5, atol=2e-5, err_msg=f"{name} step {step} vs flax.nnx")
            np.testing.assert_allclose(y, ref64(name, x, ours), rtol=1e-5, atol=2e-5, err_msg="vs float64")
            if name == "BatchNorm":
                for v in ("mean", "var"):
                    np.testing.assert_allclose(getattr(ours, v)[...], getattr(twin, v)[...], rtol=1e-6, atol=1e-6)
        if name == "BatchNorm":
            ours.eval(), twin.eval()
            x = data(seed=5)
            np.testing.assert_allclose(ours(x), twin(x), rtol=1e-5, atol=2e-5, err_msg="eval")
            mean = np.asarray(ours.mean[...])
            ours(x)
            np.testing.assert_array_equal(ours.mean[...], mean)  # eval leaves the statistics
            np.testing.assert_allclose(ours(x, use_running_average=False), twin(x, use_running_average=False),
                                       rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["BatchNorm", "InstanceNorm"])
def test_mask_leaves_positions_out(name):
    """Masked positions are excluded from the statistics (Flax's where=), exactly as a float64 weighted mean."""
    ours, twin = pair(name, use_fast_variance=False)
    randomize(ours, twin)
    x = data()
    mask = jnp.asarray(np.random.default_rng(3).random(SHAPE[:2] + (1,)) > 0.3).at[:, 0].set(True)
    y = np.asarray(ours(x, mask=mask))
    np.testing.assert_allclose(y, ref64(name, x, ours, mask), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y, twin(x, mask=mask), rtol=1e-5, atol=2e-5)
    if name == "BatchNorm":
        np.testing.assert_allclose(ours.var[...], twin.var[...], rtol=1e-6)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm"])
def test_exact_at_mean_1e4_where_fast_variance_is_not(name):
    """float32 data at mean 1e4, std 1: normkit's statistics give the float64 output to 1e-4; Flax's
    one-pass fast variance is off by far more (and normkit under policy core even with use_fast_variance)."""
    shape = (64, 4, 4) if name != "BatchNorm" else (256, 4)
    x = jnp.asarray((np.random.default_rng(0).standard_normal(shape) + 1e4).astype("float32"))
    for fast, policy in ((False, "auto"), (True, "core")):
        ours, twin = pair(name, use_fast_variance=fast)
        with use_policy(policy):
            y = np.asarray(ours(x))
        err = np.max(np.abs(y - ref64(name, x, ours)))
        assert err < 1e-4, (fast, policy, err)
    flax_err = np.max(np.abs(np.asarray(pair(name)[1](x)) - ref64(name, x, ours)))
    assert flax_err > 1e-2, flax_err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_statistics_in_float32(dtype):
    ours, twin = pair("BatchNorm", use_fast_variance=False, dtype=dtype, param_dtype=dtype)
    x = data(dtype=dtype, offset=3.0)
    y, y_twin = ours(x), twin(x)
    assert y.dtype == y_twin.dtype == jnp.dtype(dtype)
    assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float32
    ref = ref64("BatchNorm", x, ours)
    tol = float(jnp.finfo(dtype).eps) * 8
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(ours.var[...], twin.var[...], rtol=1e-5)
    ln, ln_twin = pair("LayerNorm", use_fast_variance=False)
    xh = data(dtype=dtype)
    assert ln(xh).dtype == ln_twin(xh).dtype  # Flax promotes half input with float32 params to float32


def test_missing_mode_is_an_error_naming_the_argument():
    ours = normkit_flax.BatchNorm(4, use_running_average=None, use_fast_variance=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        ours(data())
    nnx.view(ours, use_running_average=True)(data())  # nnx.view sets the mode, as for Flax's layer
