"""State transfer: a torch or Keras layer's NormState into Flax NNX (normkit_flax's layers and flax.nnx's) and back.

Each check compares the Flax layer's inference output with the source framework's own layer and a float64
NumPy formula, and the conventions (Flax's momentum is the weight of the old value) exactly."""

import os
import sys

if "keras" not in sys.modules:  # torch is imported anyway; Keras's JAX backend rounds float64 BN to ~1e-6 here
    os.environ["KERAS_BACKEND"] = "torch"

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import normkit
import normkit_flax
import normkit_torch


def _trained_torch_bn(dtype=torch.float64, momentum=0.1):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        for _ in range(4):
            bn(torch.randn(4, 3, 5, 5, dtype=dtype) * 3 + 2)
    return bn.eval()


def _numpy_bn(x, mean, var, w, b, eps, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda a: np.reshape(np.asarray(a, np.float64), shape)  # noqa: E731
    return (x - r(mean)) / np.sqrt(r(var) + eps) * r(w) + r(b)


@pytest.mark.parametrize("cls", [normkit_flax.BatchNorm, nnx.BatchNorm], ids=["normkit_flax", "flax.nnx"])
def test_torch_batchnorm2d_state_gives_torch_eval_outputs(cls):
    bn = _trained_torch_bn()
    layer = cls(3, param_dtype=jnp.float64, use_running_average=True, rngs=nnx.Rngs(0))
    normkit_flax.set_state(layer, normkit_torch.get_state(bn))
    assert layer.momentum == 0.9 and layer.epsilon == 1e-5  # torch's 0.1 as Flax's, exactly
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)) * 3 + 2
    want = bn(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(layer(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    ref = _numpy_bn(x, bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), 1e-5, 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)
    assert layer.mean[...].dtype == jnp.float64  # a float64 state is held exactly (Flax keeps float32 stats)


def test_from_torch_state_keeps_torch_layout_and_trains_with_flax_update():
    bn = _trained_torch_bn()
    state = normkit_torch.get_state(bn)
    layer = normkit_flax.from_state(state)  # the state's layout: features on axis 1, NCHW input
    assert isinstance(layer, normkit_flax.BatchNorm) and layer.axis == 1 and layer.use_running_average is False
    x = np.random.default_rng(2).standard_normal((3, 3, 4, 4)) * 2 - 1
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), use_running_average=True)),
                               bn(torch.from_numpy(x)).detach().numpy(), rtol=0, atol=1e-13)
    layer(jnp.asarray(x))  # one training step: Flax's update with the biased batch variance
    flat = x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(np.asarray(layer.mean[...]), 0.9 * state.running_mean + 0.1 * flat.mean(1), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(layer.var[...]), 0.9 * state.running_var + 0.1 * flat.var(1), rtol=1e-13)


def test_keras_batchnormalization_state_gives_keras_eval_outputs():
    import keras

    from normkit_keras import get_state as keras_get_state

    rng = np.random.default_rng(3)
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, dtype="float64")
    bn.build((None, 4, 4, 3))
    bn.gamma.assign(rng.uniform(0.5, 2.0, 3))
    bn.beta.assign(rng.standard_normal(3))
    for _ in range(3):
        bn(keras.ops.convert_to_tensor(rng.standard_normal((4, 4, 4, 3)) * 2 + 5, "float64"), training=True)
    layer = normkit_flax.BatchNorm(3, param_dtype=jnp.float64, use_running_average=True, rngs=nnx.Rngs(0))
    normkit_flax.set_state(layer, keras_get_state(bn))
    assert layer.momentum == 0.9 and layer.epsilon == 1e-3
    x = rng.standard_normal((2, 4, 4, 3)) * 2 + 5
    want = np.asarray(keras.ops.convert_to_numpy(bn(keras.ops.convert_to_tensor(x, "float64"), training=False)))
    assert want.dtype == np.float64
    got = np.asarray(layer(jnp.asarray(x)))
    values = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)]
    ref = _numpy_bn(x, *values, 1e-3, -1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # Keras's own float64 inference is ~1e-7 off the formula


def test_flax_to_torch_and_back_is_exact():
    layer = normkit_flax.BatchNorm(4, momentum=0.99, use_fast_variance=False, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    for _ in range(3):
        layer(jnp.asarray(rng.standard_normal((8, 4)) * 2 + 3, jnp.float32))
    state = normkit_flax.get_state(layer)
    assert state.momentum == 0.01 and state.running_var_correction == 0 and state.dtype == "float32"
    module = normkit_torch.from_state(state)
    assert module.momentum == 0.01
    module.eval()
    layer.eval()
    x = rng.standard_normal((5, 4)).astype(np.float32) * 2 + 3
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), np.asarray(layer(jnp.asarray(x))),
                               rtol=0, atol=2e-6)
    back = normkit_flax.from_state(normkit_torch.get_state(module), layout="channels_last")
    assert normkit_flax.get_state(back).differences(state) == []  # bitwise arrays, equal scalars
    assert back.momentum == 0.99


def test_batch_count_survives_a_round_trip_until_the_statistics_change():
    bn = _trained_torch_bn(torch.float32)
    layer = normkit_flax.from_state(normkit_torch.get_state(bn), layout="channels_last")
    assert normkit_flax.get_state(layer).num_batches_tracked == 4
    assert int(normkit_torch.from_state(normkit_flax.get_state(layer)).num_batches_tracked) == 4
    layer(jnp.ones((2, 3, 3, 3), jnp.float32))
    assert normkit_flax.get_state(layer).num_batches_tracked is None  # Flax counts nothing: unknown now


def _torch_family():
    torch.manual_seed(5)
    mods = [torch.nn.LayerNorm(6, eps=1e-4), torch.nn.GroupNorm(3, 6, eps=2e-5), torch.nn.RMSNorm(6, eps=1e-6),
            torch.nn.InstanceNorm1d(6, affine=True, eps=1e-3)]
    with torch.no_grad():
        for m in mods:
            m.weight.uniform_(0.5, 2.0)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_()
    return mods


@pytest.mark.parametrize("index", range(4), ids=["layer", "group", "rms", "instance"])
def test_torch_family_states_give_torch_outputs(index):
    module = _torch_family()[index].double()
    state = normkit_torch.get_state(module)
    layer = normkit_flax.from_state(state, layout="channels_last" if state.kind in ("group", "instance") else None)
    assert layer.epsilon == state.eps
    x = np.random.default_rng(6).standard_normal((2, 6, 5)) * 2 + 1  # (N, C, L) for torch
    if state.kind in ("layer", "rms"):
        x = np.random.default_rng(6).standard_normal((2, 5, 6)) * 2 + 1
        want, got = module(torch.from_numpy(x)).detach().numpy(), np.asarray(layer(jnp.asarray(x)))
    else:
        want = module(torch.from_numpy(x)).detach().numpy()
        got = np.asarray(layer(jnp.asarray(x.transpose(0, 2, 1)))).transpose(0, 2, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert normkit_torch.get_state(normkit_torch.from_state(normkit_flax.get_state(layer), input_rank=3)).differences(
        state, ignore=("feature_axis", "input_rank")) == []


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.zeta = nnx.Linear(3, 3, rngs=rngs)
        self.norm = normkit_flax.BatchNorm(3, rngs=rngs)  # definition order, not alphabetical
        self.blocks = nnx.List([nnx.LayerNorm(3, rngs=rngs)])
        self.alpha = nnx.BatchNorm(3, rngs=rngs)


def test_copy_norm_states_pairs_in_definition_order_and_refuses_a_mismatch_whole():
    torch_model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for i, m in enumerate(torch_model):
            m.weight.fill_(1.0 + i)
    net = _Net(nnx.Rngs(0))
    assert list(normkit_flax.norm_states(net)) == ["norm", "blocks.0", "alpha"]
    report = normkit_flax.copy_norm_states(torch_model, net)
    assert report.copied == [("0", "norm"), ("1", "blocks.0"), ("2", "alpha")]
    assert [float(m.scale[0]) for m in (net.norm, net.blocks[0], net.alpha)] == [1.0, 2.0, 3.0]
    assert list(normkit.norm_states(net)) == ["norm", "blocks.0", "alpha"]  # the core finds the Flax plugin
    wrong = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="kind mismatch: a batch norm state"):
        normkit_flax.copy_norm_states(wrong, net)
    assert float(net.norm.scale[0]) == 1.0  # nothing copied
    back = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3))
    normkit_torch.copy_norm_states(net, back)  # Flax -> torch through normkit.norm_states
    assert [float(m.weight[0]) for m in back] == [1.0, 2.0, 3.0]


def test_refusals_name_the_problem_and_write_nothing():
    layer = normkit_flax.BatchNorm(3, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
    big = normkit.NormState(kind="batch", shape=(3,), weight=np.full(3, 7e4), running_mean=np.zeros(3),
                            running_var=np.ones(3), momentum=0.1, running_var_correction=1, feature_axis=1)
    with pytest.raises(ValueError, match="weight in BatchNorm of dtype float16.*65504"):
        normkit_flax.set_state(layer, big)
    assert float(layer.scale[0]) == 1.0
    cumulative = big.replace(weight=np.ones(3), momentum=None)
    with pytest.raises(ValueError, match="momentum is None"):
        normkit_flax.set_state(layer, cumulative)
    with pytest.raises(ValueError, match="size mismatch.*\\(4,\\)"):
        normkit_flax.set_state(normkit_flax.BatchNorm(4, rngs=nnx.Rngs(0)), big.replace(weight=np.ones(3)))
    with pytest.raises(TypeError, match="state must be a normkit.NormState, got dict"):
        normkit_flax.set_state(layer, {})
    with pytest.raises(TypeError, match="expected a Flax NNX normalization layer.*got Linear"):
        normkit_flax.get_state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    group = normkit_torch.get_state(torch.nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="GroupNorm keeps its channels on the last axis"):
        normkit_flax.from_state(group, layout="channels_first")
