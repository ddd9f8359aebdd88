"""The fused kernels ``normkit_kernel`` offers: chosen once per layer, equal to the core path, exact on shifted data."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import normkit_keras as nk
from normkit.plugin.manager import kernel as resolve
from normkit.testing import reference
from normkit_keras import _kernels, _plugin
from normkit_keras._backend import backend_namespace

from conftest import BACKEND

F32 = dict(rtol=1e-4, atol=1e-5)  # two float32 implementations of the same math
TF = BACKEND == "tensorflow"
needs_tf = pytest.mark.skipif(not TF, reason="the fused kernels exist on the TensorFlow backend only")


def data(shape, seed=0, offset=0.5, scale=2.0, dtype="float32"):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(dtype)


@pytest.fixture
def policy():
    """Restores the kernel policy after the test."""
    before = nk.get_kernel_policy()
    yield
    nk.set_kernel_policy(before)


def test_policy_api(policy):
    assert nk.get_kernel_policy() in ("auto", "core")
    nk.set_kernel_policy("auto")
    assert nk.set_kernel_policy("core") == "auto"
    assert nk.get_kernel_policy() == "core" and not _kernels.kernels_enabled()
    with pytest.raises(ValueError, match="kernel policy"):
        nk.set_kernel_policy("fast")
    code = "import normkit_keras as nk; print(nk.get_kernel_policy())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "NORMKIT_KERAS_KERNELS": "core"}).stdout.strip()
    assert out == "core"


def test_layout_keys():
    assert _kernels.layout_of(2, -1) == "nc" and _kernels.layout_of(2, 1) == "nc"
    assert _kernels.layout_of(3, -1) == "nlc" and _kernels.layout_of(4, 3) == "nhwc"
    assert _kernels.layout_of(5, -1) == "ndhwc"
    assert _kernels.layout_of(4, 1) == "other" and _kernels.layout_of(1, 0) == "other"


def test_hook_decision_table():
    xp = backend_namespace()
    for layout in ("nc", "nlc", "nhwc"):
        got = resolve("batch_norm_train", xp, "tf", getattr(xp, "float32"), layout)
        assert got is (_kernels.tensorflow_fused_batch_norm_train if TF else None), layout
        assert resolve("batch_norm_train", xp, "xla", getattr(xp, "float32"), layout) is None
    for dtype in ("float64", "float16", "bfloat16"):
        assert resolve("batch_norm_train", xp, "tf", getattr(xp, dtype), "nhwc") is None
    for layout in ("ndhwc", "other"):
        assert resolve("batch_norm_train", xp, "tf", getattr(xp, "float32"), layout) is None
    assert resolve("batch_norm_eval", xp, "tf", getattr(xp, "float32"), "nhwc") is None
    assert _plugin.normkit_kernel("batch_norm_train", np, "tf", np.float32, "nhwc") is None


def _train_step(layer, x, dy, mode):
    """(y, moving_mean, moving_variance, dx, dgamma, dbeta) of one training step on TensorFlow."""
    import tensorflow as tf

    variables = [v.value for v in layer.trainable_variables]

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return [y, *tape.gradient(y, [x, *variables], output_gradients=dy)]

    if mode == "graph":
        step = tf.function(step)
    elif mode == "xla":
        step = tf.function(step, jit_compile=True)
    elif mode == "unknown-batch":
        step = tf.function(step, input_signature=[tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)])
    out = step(tf.constant(x))
    return [out[0].numpy(), layer.moving_mean.numpy(), layer.moving_variance.numpy(), *[g.numpy() for g in out[1:]]]


SHAPES = [(64, 4), (8, 6, 3), (4, 5, 5, 3), (2, 7, 6, 16), (1, 3), (1, 1, 1, 5)]
MODES = ["eager", "graph", "xla", "unknown-batch"]


@needs_tf
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_kernel_equals_core(shape, mode, affine, policy):
    """Every kernel choice gives the core path's output, statistics and gradients (float32 tolerance)."""
    x = data(shape, seed=1)
    dy = np.cos(np.arange(x.size, dtype="float32")).reshape(shape)
    kwargs = dict(momentum=0.5, center=affine, scale=affine, beta_initializer="ones" if affine else "zeros",
                  gamma_initializer=keras.initializers.Constant(1.5) if affine else "ones")
    results = {}
    for name in ("auto", "core"):
        nk.set_kernel_policy(name)
        layer = nk.BatchNormalization(**kwargs)
        layer.build(shape)
        results[name] = _train_step(layer, x, dy, mode)
        chosen = layer.__dict__.get("_normkit_kernels")
        if name == "auto":  # under XLA the table offers nothing: the core
            expected = None if mode == "xla" else _kernels.tensorflow_fused_batch_norm_train
            assert list(chosen.values()) == [expected], chosen
        else:
            assert chosen is None
    for what, a, b in zip(["y", "moving_mean", "moving_variance", "dx", "dgamma", "dbeta"], results["auto"], results["core"]):
        np.testing.assert_allclose(a, b, **F32, err_msg=what)
    if np.prod(shape[:-1]) == 1:  # a batch of one gives beta
        np.testing.assert_allclose(results["auto"][0], np.ones(shape) if affine else np.zeros(shape), atol=1e-6)


@needs_tf
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("shape", [(64, 4), (4096, 8), (8, 16, 12), (8, 14, 14, 16)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_shifted_data_matches_float64(shape, mode, policy):
    """Mean 1e4, std 1 in float32: the kernel stays within the conformance tolerance of the float64 reference.

    TF's fused kernel alone is off by up to 2e-2 here (NaN under XLA); the shift keeps it under 1e-4.
    """
    import tensorflow as tf

    x = data(shape, seed=5, offset=1e4, scale=1.0)
    kernel = _kernels.tensorflow_fused_batch_norm_train  # called directly: the layer takes the core under XLA
    fn = {"eager": kernel, "graph": tf.function(kernel), "xla": tf.function(kernel, jit_compile=True)}[mode]
    y, mean, var = [t.numpy() for t in fn(tf.constant(x), None, None, 1e-3)]
    y_ref, rm, rv = reference.batch_norm(x, np.zeros(shape[-1]), np.ones(shape[-1]), training=True, momentum=1.0,
                                         eps=1e-3, axis=-1, correction=0)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(mean, rm, rtol=1e-6)
    np.testing.assert_allclose(var, rv, rtol=1e-4)


@needs_tf
def test_kernel_variance_is_biased(policy):
    """The moving variance gets the biased batch variance (FusedBatchNormV3 reports the unbiased one)."""
    nk.set_kernel_policy("auto")
    x = data((6, 3), seed=2)
    layer = nk.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    assert layer.__dict__["_normkit_kernels"]
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.astype("float64").var(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype("float64").mean(0), rtol=1e-5, atol=1e-6)


@needs_tf
def test_kernel_in_mixed_float16_equals_core(policy):
    """float16 input computed as float32 (the layer's compute dtype) goes through the float32 kernel."""
    keras.config.set_dtype_policy("mixed_float16")
    x = data((16, 4, 4, 8), seed=3).astype("float16")
    out = {}
    for name in ("auto", "core"):
        nk.set_kernel_policy(name)
        layer = nk.BatchNormalization(momentum=0.5)
        y = layer(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        out[name] = (y.numpy().astype("float32"), layer.moving_mean.numpy(), layer.moving_variance.numpy())
        assert bool(layer.__dict__.get("_normkit_kernels")) == (name == "auto")
    np.testing.assert_allclose(out["auto"][0], out["core"][0], rtol=1e-3, atol=1e-3)
    for a, b in zip(out["auto"][1:], out["core"][1:]):
        np.testing.assert_allclose(a, b, **F32)


def test_float64_uses_core_and_matches_keras(float64, policy):
    """No fused kernel for float64 (TF has none): the core path, equal to keras.layers in float64."""
    nk.set_kernel_policy("auto")
    x = data((16, 3, 3, 4), seed=4, dtype="float64")
    ours, native = nk.BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    y = keras.ops.convert_to_numpy(ours(x, training=True))
    y_ref, rm, rv = reference.batch_norm(x, np.zeros(4), np.ones(4), training=True, momentum=0.5, eps=1e-3,
                                         axis=-1, correction=0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours.moving_variance), rv, rtol=1e-9, atol=1e-10)
    if TF:  # keras.layers computes float64 in float64 on TensorFlow (not on JAX / torch: documented in test_layers)
        y_native = keras.ops.convert_to_numpy(native(x, training=True))
        np.testing.assert_allclose(y, y_native, rtol=1e-9, atol=1e-10)
        for a, b in zip(ours.weights, native.weights):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-9, atol=1e-10)
    assert not any(ours.__dict__.get("_normkit_kernels", {}).values())


@pytest.mark.parametrize("shape", [(64, 4), (4, 5, 5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_keras_float32(shape, policy):
    """With the default policy the layer still matches keras.layers.BatchNormalization (float32 tolerance)."""
    nk.set_kernel_policy("auto")
    x = data(shape, seed=6)
    ours, native = nk.BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    for _ in range(2):
        y = keras.ops.convert_to_numpy(ours(x, training=True))
        y_native = keras.ops.convert_to_numpy(native(x, training=True))
    np.testing.assert_allclose(y, y_native, **F32)
    for a, b in zip(ours.weights, native.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), **F32)
    assert bool(ours.__dict__.get("_normkit_kernels")) == TF


@needs_tf
def test_mask_renorm_inference_and_frozen_stay_on_core(policy):
    nk.set_kernel_policy("auto")
    x = data((4, 6, 3), seed=7)
    mask = np.arange(6)[None, :] < np.array([6, 4, 2, 5])[:, None]
    for layer, kwargs in ((nk.BatchNormalization(), dict(training=True, mask=mask)),
                          (nk.BatchNormalization(renorm=True), dict(training=True)),
                          (nk.BatchNormalization(), dict(training=False))):
        layer(x, **kwargs)
        assert not layer.__dict__.get("_normkit_kernels"), layer
    frozen = nk.BatchNormalization()
    frozen.build(x.shape)
    frozen.trainable = False
    before = [w.numpy() for w in frozen.weights]
    frozen(x, training=True)
    assert not frozen.__dict__.get("_normkit_kernels")
    for b, w in zip(before, frozen.weights):
        np.testing.assert_array_equal(w.numpy(), b)


@needs_tf
def test_kernel_chosen_once_per_layer(policy, monkeypatch):
    """The hook is asked once per (dtype, layout), not per call or per trace."""
    nk.set_kernel_policy("auto")
    import normkit.plugin.manager as manager

    calls = []
    original = manager.kernel

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(manager, "kernel", counting)
    layer = nk.BatchNormalization()
    for _ in range(3):
        layer(data((8, 4), seed=8), training=True)
    layer(data((16, 4), seed=8), training=True)
    assert len(calls) == 1
    import tensorflow as tf

    tf.function(lambda x: layer(x, training=True))(tf.constant(data((8, 4))))
    assert len(calls) == 1
