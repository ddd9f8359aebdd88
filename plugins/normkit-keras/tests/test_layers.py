"""normkit_keras layers against keras.layers, in models, on this process's Keras backend."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import normkit_keras as nk
from conftest import BACKEND, POLICIES, f32_tol
from normkit.plugin.kernels import use_policy
from normkit.testing import reference
from normkit_keras.testing import gradients

F32 = dict(rtol=1e-4, atol=1e-5)  # two float32 implementations of the same math


def np_(a):
    return np.asarray(keras.ops.convert_to_numpy(a))


def data(shape, seed=0, offset=0.5, scale=2.0, dtype="float32"):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(dtype)


# --------------------------------------------------------------------------- the plugin's entry module


# normkit's TensorFlow namespace serves TensorFlow tensors whatever Keras's backend: its tests run in the TensorFlow stage
TENSORFLOW_STAGE = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow namespace: runs with KERAS_BACKEND=tensorflow")


def test_entry_module_imports_no_framework():
    code = (
        "import sys\n"
        "from normkit.plugin.manager import plugin_manager, frameworks\n"
        "pm = plugin_manager()\n"
        "assert pm.get_plugin('keras') is not None, pm.list_name_plugin()\n"
        "assert frameworks()['keras'] == 'normkit_keras'\n"
        "import normkit_keras\n"
        "bad = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import keras\n"  # the import hook registers every layer right after keras loads
        "for name in normkit_keras._LAYERS:\n"
        "    cls = keras.saving.get_registered_object('normkit>' + name)\n"
        "    assert cls is getattr(normkit_keras, name), name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "NORMKIT_STRICT_PLUGINS": "0"})


@TENSORFLOW_STAGE
def test_hooks_namespace_backends_harness():
    import tensorflow as tf

    import _normkit_keras_plugin as _plugin
    from normkit_keras._namespaces import keras_ops_namespace, tensorflow_namespace

    assert _plugin.normkit_array_namespace(tf.constant([1.0])) is tensorflow_namespace()
    assert _plugin.normkit_array_namespace(tf.Variable([1.0])) is tensorflow_namespace()
    assert _plugin.normkit_array_namespace(keras.KerasTensor((None, 3))) is keras_ops_namespace()
    assert _plugin.normkit_array_namespace(np.ones(3)) is None
    assert _plugin.normkit_frameworks() == {"keras": "normkit_keras"}
    specs = {s.name: s for s in _plugin.normkit_test_backends()}
    assert sorted(specs) == ["tensorflow", "tensorflow-function"]
    assert [h.name for h in _plugin.normkit_test_harnesses()] == ["keras"]
    import normkit

    for name, spec in specs.items():
        b = spec.make()
        x = data((6, 4), dtype="float64")
        out = b.call(normkit.batch_norm, (b.asarray(x), b.asarray(np.zeros(4)), b.asarray(np.ones(4))),
                     dict(training=True, axis=-1, correction=0, momentum=0.1))
        want = reference.batch_norm(x, np.zeros(4), np.ones(4), training=True, axis=-1, correction=0, momentum=0.1)
        for got, ref in zip(out, want):
            assert b.to_numpy(got).dtype == np.float64, name
            np.testing.assert_allclose(b.to_numpy(got), ref, rtol=1e-12, atol=1e-12, err_msg=name)


@TENSORFLOW_STAGE
def test_tensorflow_namespace_unknown_batch_and_keras_tensor():
    import tensorflow as tf

    import normkit

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 4], tf.float32)])
    def fn(x):
        return (normkit.group_norm(x, 2, axis=-1), normkit.layer_norm(x, axis=(1, 2)), normkit.rms_norm(x),
                normkit.batch_norm(x, tf.zeros(4), tf.ones(4), training=True, axis=-1, correction=1).running_var)

    x = data((3, 6, 4))
    gn, ln, rms, rv = fn(tf.constant(x))
    np.testing.assert_allclose(gn.numpy(), reference.group_norm(x, 2, axis=-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ln.numpy(), reference.layer_norm(x, axis=(1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rms.numpy(), reference.rms_norm(x, eps=float(np.finfo(np.float32).eps)), rtol=1e-4, atol=1e-4)
    _, _, want = reference.batch_norm(x, np.zeros(4), np.ones(4), training=True, axis=-1, correction=1)
    np.testing.assert_allclose(rv.numpy(), want, rtol=1e-4)


def test_keras_tensor_through_the_functional_api():
    """A symbolic KerasTensor goes through normkit's functions as keras.ops would take it, on every backend."""
    import normkit

    kt = keras.KerasTensor((None, 6, 4), dtype="float32")
    out = normkit.layer_norm(kt, axis=-1)
    assert isinstance(out, keras.KerasTensor) and tuple(out.shape) == (None, 6, 4) and out.dtype == "float32"


# --------------------------------------------------------------------------- BatchNormalization


def test_signature_config_and_weights_match_keras():
    import inspect

    extra = {"BatchNormalization": ["frozen", "virtual_batch_size"]}  # normkit's keyword-only additions
    for name in ("BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization", "UnitNormalization"):
        ours, native = getattr(nk, name), getattr(keras.layers, name)
        mine = inspect.signature(ours.__init__).parameters
        added = [p for p in mine if p not in inspect.signature(native.__init__).parameters]
        assert added == extra.get(name, []), name
        assert all(mine[p].kind is inspect.Parameter.KEYWORD_ONLY for p in added), name
        keras_part = inspect.signature(ours.__init__).replace(parameters=[v for p, v in mine.items() if p not in added])
        assert keras_part == inspect.signature(native.__init__), name  # Keras's arguments, order and defaults
        a, b = ours(), native()
        a.build((None, 4, 32)), b.build((None, 4, 32))
        ca, cb = a.get_config(), b.get_config()
        ca.pop("name"), cb.pop("name")
        assert ca == cb, name
        assert [(v.path.split("/")[-1], v.trainable, v.dtype) for v in a.weights] == \
               [(v.path.split("/")[-1], v.trainable, v.dtype) for v in b.weights], name


def test_set_weights_both_ways(policy):
    x = data((16, 5), seed=1)
    native = keras.layers.BatchNormalization(momentum=0.5)
    ours = nk.BatchNormalization(momentum=0.5)
    native(x, training=True)
    ours.build((None, 5))
    ours.set_weights(native.get_weights())
    np.testing.assert_allclose(np_(ours(x)), np_(native(x)), **F32)
    ours(data((16, 5), seed=2), training=True)
    native.set_weights(ours.get_weights())
    np.testing.assert_allclose(np_(native(x)), np_(ours(x)), **F32)


def test_training_semantics(policy):
    x = data((8, 3))
    layer = nk.BatchNormalization()
    y_default = np_(layer(x))  # training=None: inference with the initial statistics
    np.testing.assert_allclose(y_default, x / np.sqrt(1 + 1e-3), **F32)
    np.testing.assert_array_equal(np_(layer.moving_mean), 0)
    layer(x, training=True)
    np.testing.assert_allclose(np_(layer.moving_mean), 0.01 * x.mean(0), **F32)
    np.testing.assert_allclose(np_(layer.moving_variance), 0.99 + 0.01 * x.var(0), **F32)  # biased
    layer.trainable = False  # inference and frozen statistics even with training=True
    before = [np_(w) for w in layer.weights]
    y = np_(layer(x, training=True))
    np.testing.assert_allclose(y, (x - before[2]) / np.sqrt(before[3] + 1e-3), **F32)
    for b, w in zip(before, layer.weights):
        np.testing.assert_array_equal(np_(w), b)


def test_batch_of_one_gives_beta(policy):
    layer = nk.BatchNormalization(beta_initializer=keras.initializers.Constant(0.25))
    y = np_(layer(data((1, 4)), training=True))
    np.testing.assert_array_equal(y, np.full((1, 4), 0.25, np.float32))
    native = keras.layers.BatchNormalization(beta_initializer=keras.initializers.Constant(0.25))
    np.testing.assert_array_equal(np_(native(data((1, 4)), training=True)), y)


def test_mask_matches_keras_and_reference():
    x = data((4, 6, 3), seed=3)
    mask = np.random.default_rng(4).random((4, 6)) > 0.4
    ours, native = nk.BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    y_ours = np_(ours(x, training=True, mask=keras.ops.convert_to_tensor(mask)))
    y_native = np_(native(x, training=True, mask=keras.ops.convert_to_tensor(mask)))
    np.testing.assert_allclose(y_ours, y_native, **F32)
    np.testing.assert_allclose(np_(ours.moving_variance), np_(native.moving_variance), **F32)
    y_ref, rm, rv = reference.batch_norm(x, np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), training=True,
                                         momentum=0.5, eps=1e-3, axis=-1, correction=0, mask=mask)
    np.testing.assert_allclose(y_ours, y_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np_(ours.moving_variance), rv, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="one dimension less than the inputs"):
        ours(x, training=True, mask=keras.ops.convert_to_tensor(mask[:, :, None]))


def test_mask_and_unknown_batch_in_tf_function():
    """Inside tf.function with an unknown batch size: the core on tf tensors (every Keras backend), and on
    the TensorFlow backend the layer itself."""
    import tensorflow as tf

    import normkit

    x = data((4, 6, 3), seed=3)
    mask = np.random.default_rng(4).random((4, 6)) > 0.4
    y_ref, _, rv = reference.batch_norm(x, np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), training=True,
                                        momentum=0.5, eps=1e-3, axis=-1, correction=0, mask=mask)
    signature = [tf.TensorSpec([None, 6, 3]), tf.TensorSpec([None, 6], tf.bool)]

    @tf.function(input_signature=signature)
    def core(x, m):
        return normkit.batch_norm(x, tf.zeros(3), tf.ones(3), tf.ones(3), tf.zeros(3), training=True, momentum=0.5,
                                  eps=1e-3, axis=-1, correction=0, mask=m)

    out = core(tf.constant(x), tf.constant(mask))
    np.testing.assert_allclose(out.output.numpy(), y_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(out.running_var.numpy(), rv, rtol=2e-4, atol=2e-4)
    if BACKEND == "tensorflow":
        layer = nk.BatchNormalization(momentum=0.5)
        layer.build((None, 6, 3))
        step = tf.function(lambda x, m: layer(x, training=True, mask=m), input_signature=signature)
        np.testing.assert_allclose(step(tf.constant(x), tf.constant(mask)).numpy(), y_ref, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), rv, rtol=2e-4, atol=2e-4)


def test_shifted_data_stays_exact(policy):
    """float32 data with mean 1e4 and std 1: normkit matches the float64 reference on every backend."""
    x = data((64, 4), seed=5, offset=1e4, scale=1.0)
    ours = nk.BatchNormalization(momentum=0.0)
    y = np_(ours(x, training=True))
    y_ref, rm, rv = reference.batch_norm(x, np.zeros(4), np.ones(4), training=True, momentum=1.0, eps=1e-3,
                                         axis=-1, correction=0)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, **f32_tol(64, 3.0))  # centred first: float32 round-off of the 64-row sums only
    np.testing.assert_allclose(np_(ours.moving_variance), rv, **f32_tol(64))
    native = keras.layers.BatchNormalization(momentum=0.0)
    y_native = np_(native(x, training=True))
    native_var = np_(native.moving_variance)
    if BACKEND == "torch":  # Keras's one-pass variance: documents the gap normkit closes
        assert not np.isfinite(y_native).all() or not np.allclose(native_var, rv, rtol=1e-2)
    else:
        np.testing.assert_allclose(native_var, rv, rtol=1e-3)


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1}], ids=["unclipped", "clipped"])
def test_renorm_matches_keras(clipping):
    kw = dict(renorm=True, renorm_clipping=clipping, renorm_momentum=0.8, momentum=0.7)
    ours, native = nk.BatchNormalization(**kw), keras.layers.BatchNormalization(**kw)
    ours.build((None, 6, 3)), native.build((None, 6, 3))
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in native.weights]
    for step in range(3):
        x = data((4, 6, 3), seed=20 + step, offset=step)
        np.testing.assert_allclose(np_(ours(x, training=True)), np_(native(x, training=True)), **F32)
        for a, b in zip(ours.weights, native.weights):
            np.testing.assert_allclose(np_(a), np_(b), **F32, err_msg=f"step {step} {a.path}")
    x = data((4, 6, 3), seed=30)
    np.testing.assert_allclose(np_(ours(x)), np_(native(x)), **F32)
    up = data((4, 6, 3), seed=31)
    dx, dw = gradients(ours, x, up)
    dx_n, dw_n = gradients(native, x, up)
    np.testing.assert_allclose(dx, dx_n, rtol=1e-3, atol=1e-4)
    for name in dw_n:
        np.testing.assert_allclose(dw[name], dw_n[name], rtol=1e-3, atol=1e-4, err_msg=name)
    with pytest.raises(ValueError, match="rmax should be greater"):
        nk.BatchNormalization(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 1.0})


def test_mixed_float16(policy):
    keras.config.set_dtype_policy("mixed_float16")
    x = data((8, 4), seed=6)
    ours, native = nk.BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    y, y_native = ours(x, training=True), native(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert [w.dtype for w in ours.weights] == ["float32"] * 4
    np.testing.assert_allclose(np_(y).astype(np.float32), np_(y_native).astype(np.float32), atol=2e-3)  # fp16 output ulp
    for a, b in zip(ours.weights, native.weights):
        np.testing.assert_allclose(np_(a), np_(b), rtol=1e-3, atol=1e-3)  # batch stats of fp16-rounded inputs
    ln = nk.LayerNormalization()
    assert keras.backend.standardize_dtype(ln(x).dtype) == "float16" and ln.gamma.dtype == "float32"


def test_errors():
    with pytest.raises(ValueError, match="invalid keys"):
        nk.BatchNormalization(renorm=True, renorm_clipping={"bad": 1})
    if BACKEND == "tensorflow":
        layer = nk.BatchNormalization(synchronized=True)
        x = data((8, 3))
        y, y_local = layer(x, training=True), nk.BatchNormalization()(x, training=True)
        np.testing.assert_allclose(np_(y), np_(y_local), **F32)
    else:  # normkit synchronizes on every backend (test_synchronized.py); Keras's own layer refuses
        assert nk.BatchNormalization(synchronized=True).synchronized is True
        with pytest.raises(ValueError, match="only supported with the TensorFlow backend"):
            keras.layers.BatchNormalization(synchronized=True)
    with pytest.raises(ValueError, match="out of bounds"):
        nk.BatchNormalization(axis=3).compute_output_shape((None, 4))
    with pytest.raises(ValueError, match="groups"):
        nk.GroupNormalization(groups=0)
    with pytest.raises(ValueError, match="multiple"):
        nk.GroupNormalization(groups=3).build((None, 4))
    with pytest.raises(TypeError, match="axis"):
        nk.LayerNormalization(axis="x")
    layer = nk.BatchNormalization()
    layer(data((4, 3)))
    with pytest.raises(ValueError):
        layer(data((4, 5)))  # InputSpec: the feature axis is fixed at build


# --------------------------------------------------------------------------- every layer that has a kernel, under both policies


KERNEL_LAYERS = [("BatchNormalization", {}, (8, 5, 5, 6)), ("LayerNormalization", {}, (4, 7, 6)),
                 ("GroupNormalization", {"groups": 3}, (4, 5, 5, 6)), ("RMSNormalization", {}, (4, 7, 6))]


@pytest.mark.parametrize(("name", "kwargs", "shape"), KERNEL_LAYERS, ids=[l[0] for l in KERNEL_LAYERS])
def test_layer_matches_keras_under_both_policies(name, kwargs, shape, policy):
    """A fit-like training step and inference: outputs, moving statistics and gradients equal keras.layers."""
    from normkit_keras.testing import gradients, randomize_weights

    ours, native = getattr(nk, name)(**kwargs), getattr(keras.layers, name)(**kwargs)
    for layer in (ours, native):
        layer.build(shape)
        randomize_weights(layer, seed=11)
    x, up = data(shape, seed=8), data(shape, seed=9, offset=0.0, scale=1.0)
    train = {"training": True} if name == "BatchNormalization" else {}
    tol = f32_tol(int(np.prod(shape)), 4.0)
    for _ in range(2):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, **train)),
                                   keras.ops.convert_to_numpy(native(x, **train)), **tol)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(native(x)), **tol)
    for a, b in zip(ours.weights, native.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), **tol, err_msg=a.path)
    dx, dw = gradients(ours, x, up)
    dx_n, dw_n = gradients(native, x, up)
    np.testing.assert_allclose(dx, dx_n, **f32_tol(int(np.prod(shape)), np.abs(dx_n).max()))
    assert sorted(dw) == sorted(dw_n)
    for key in dw_n:
        np.testing.assert_allclose(dw[key], dw_n[key], **f32_tol(int(np.prod(shape)), np.abs(dw_n[key]).max()), err_msg=key)


# --------------------------------------------------------------------------- the seed article's models


def dense_model(bn):
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="relu"), bn(),
        keras.layers.Dense(32, activation="relu"), bn(),
        keras.layers.Dense(2, activation="softmax"),
    ])


def conv_model(bn, size=12):
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(32, (3, 3))(inputs)
    h = bn()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))


def _fit_both(make, x, y, jit_compile):
    native = make(keras.layers.BatchNormalization)
    ours = make(nk.BatchNormalization)
    ours.set_weights(native.get_weights())
    for m, jit in ((native, False), (ours, jit_compile)):  # the native reference runs uncompiled
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", jit_compile=jit)
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return native, ours


# torch.compile takes ~40 s per model on 2 CPU cores: on torch only the dense model is compiled
# under jit_compile the TensorFlow kernels decline (the core computes), so both policies are one path there
_SEED_CASES = ([(m, False, p) for m in ("dense", "conv") for p in POLICIES] + [("dense", True, "auto")]
               + ([("conv", True, "auto")] if BACKEND != "torch" else []))


@pytest.mark.parametrize(("model", "jit_compile", "kernel_policy"), _SEED_CASES,
                         ids=[f"{m}-{'jit' if j else 'nojit'}-{p}" for m, j, p in _SEED_CASES])
def test_seed_models_train_like_keras(model, jit_compile, kernel_policy):
    if model == "dense":
        make, x = dense_model, data((16, 5), seed=7)  # 2 steps
    else:
        make, x = conv_model, data((16, 12, 12, 3), seed=7)
    y = (np.random.default_rng(8).random(16) > 0.5).astype("int32")
    with use_policy(kernel_policy):
        native, ours = _fit_both(make, x, y, jit_compile)
        assert any(isinstance(l, nk.BatchNormalization) for l in ours.layers)
        for a, b in zip(ours.weights, native.weights):
            np.testing.assert_allclose(np_(a), np_(b), rtol=1e-4, atol=1e-5, err_msg=a.path)
        np.testing.assert_allclose(ours.predict(x, batch_size=8, verbose=0), native.predict(x, batch_size=8, verbose=0), **F32)
        np.testing.assert_allclose(ours.evaluate(x, y, batch_size=8, verbose=0), native.evaluate(x, y, batch_size=8, verbose=0), rtol=1e-4)
        bn = [l for l in ours.layers if isinstance(l, nk.BatchNormalization)][0]
        assert not np.allclose(np_(bn.moving_mean), 0)  # fit trained the statistics


def test_trainable_false_in_fit_freezes_statistics(policy):
    model = dense_model(nk.BatchNormalization)
    bns = [l for l in model.layers if isinstance(l, nk.BatchNormalization)]
    for l in bns:
        l.trainable = False
    before = [np_(w) for l in bns for w in l.weights]
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(data((16, 5)), np.zeros(16, "int32"), batch_size=8, verbose=0)
    for b, w in zip(before, [w for l in bns for w in l.weights]):
        np.testing.assert_array_equal(np_(w), b)


def test_subclassed_and_functional_models():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)
            self.bn = nk.BatchNormalization()
            self.ln = nk.LayerNormalization()

        def call(self, x, training=None):
            return self.ln(self.bn(self.dense(x), training=training))

    net = Net()
    x = data((8, 3))
    net.compile(optimizer="sgd", loss="mse")
    net.fit(x, np.zeros((8, 4), "float32"), verbose=0)
    assert not np.allclose(np_(net.bn.moving_mean), 0)
    inputs = keras.Input((6, 4))
    out = nk.GroupNormalization(groups=2)(nk.RMSNormalization()(nk.UnitNormalization()(inputs)))
    model = keras.Model(inputs, out)
    assert tuple(model.output.shape) == (None, 6, 4)


# --------------------------------------------------------------------------- family layers and preprocessing


def test_family_layers_in_keras_conventions():
    x = data((3, 5, 4), seed=9)
    np.testing.assert_allclose(np_(nk.UnitNormalization(axis=[1, 2])(x)), np_(keras.layers.UnitNormalization(axis=[1, 2])(x)), **F32)
    np.testing.assert_allclose(np_(nk.UnitNormalization()(np.zeros((2, 3), "float32"))), 0)
    with pytest.warns(UserWarning, match="deprecated"):
        ours = nk.LayerNormalization(rms_scaling=True)
    with pytest.warns(UserWarning, match="deprecated"):
        native = keras.layers.LayerNormalization(rms_scaling=True)
    np.testing.assert_allclose(np_(ours(x)), np_(native(x)), **F32)
    assert [w.path.split("/")[-1] for w in ours.weights] == ["gamma"]
    g = nk.GroupNormalization(groups=-1)
    g(x)
    assert g.groups == 4 and g.get_config()["groups"] == 4


def test_standardize_and_min_max_scale_adapt():
    import tensorflow as tf

    x = data((300, 4), seed=10, offset=3.0)
    x[:, 2] = 7.0  # a constant feature
    st = nk.Standardize()
    st.adapt(tf.data.Dataset.from_tensor_slices(x).batch(64))
    np.testing.assert_allclose(np_(st.adapt_mean), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np_(st.adapt_variance), x.astype(np.float64).var(0), rtol=1e-5, atol=1e-6)
    z = np_(st(x))
    np.testing.assert_allclose(z, reference.standardize(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(z[:, 2], 0)
    st2 = nk.Standardize()
    st2.adapt(x)
    np.testing.assert_allclose(np_(st2.mean), np_(st.mean), rtol=1e-6)
    mm = nk.MinMaxScale(feature_range=(-1, 1))
    mm.adapt([x[:100], x[100:]])
    np.testing.assert_allclose(np_(mm(x)), reference.min_max_scale(x, feature_range=(-1, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_range"):
        nk.MinMaxScale(feature_range=(1, 0))


def test_gradients_flow_through_batch_statistics(policy):
    x = data((6, 3), seed=12)
    up = data((6, 3), seed=13)
    ours, native = nk.BatchNormalization(), keras.layers.BatchNormalization()
    ours.build((None, 3)), native.build((None, 3))
    dx, dw = gradients(ours, x, up)
    dx_n, dw_n = gradients(native, x, up)
    np.testing.assert_allclose(dx, dx_n, rtol=1e-3, atol=1e-4)
    assert np.abs(dx.sum(0)).max() < 1e-4  # the batch mean's gradient removes the column mean
    assert sorted(dw) == ["beta", "gamma"]


# --------------------------------------------------------------------------- drop-in beyond the forward pass (#13)

TWINS = {"BatchNormalization": {}, "LayerNormalization": {}, "GroupNormalization": {"groups": 2},
         "RMSNormalization": {}, "UnitNormalization": {}}


def test_layers_are_instances_of_their_keras_twins():
    for name, kwargs in TWINS.items():
        layer = getattr(nk, name)(**kwargs)
        assert isinstance(layer, getattr(keras.layers, name)), name
        assert keras.saving.get_registered_name(type(layer)) == f"normkit>{name}"  # names of 0.1 files


def _swap_batch_norms(model):
    """The model with every keras.layers.BatchNormalization replaced by normkit's (same config and weights)."""
    def clone(layer):
        cls = nk.BatchNormalization if type(layer) is keras.layers.BatchNormalization else type(layer)
        return cls.from_config(layer.get_config())

    swapped = keras.models.clone_model(model, clone_function=clone)
    swapped.set_weights(model.get_weights())
    return swapped


@pytest.mark.skipif(BACKEND == "jax", reason="eager JAX compiles each of MobileNetV2's ops on first use (~30 s); freezing "
                    "is backend-independent Keras code, run here on TensorFlow and torch and by test_freeze.py on jax")
def test_freeze_every_batch_normalization_in_mobilenet_v2():
    """The usual fine-tuning loop (isinstance(layer, keras.layers.BatchNormalization) -> trainable=False) finds
    all 52 of MobileNetV2's, now normkit's, and frozen they run in inference mode with fixed statistics."""
    native = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4)
    model = _swap_batch_norms(native)
    x = data((2, 32, 32, 3), seed=14)
    # inference: the same model (in training, batch statistics of 2 samples at 1x1 amplify round-off chaotically)
    np.testing.assert_allclose(np_(model(x)), np_(native(x)), **f32_tol(32 * 32 * 3 * 9))
    frozen = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            frozen += 1
    assert frozen == 52 and all(type(l) is nk.BatchNormalization for l in model.layers
                                if isinstance(l, keras.layers.BatchNormalization))
    before = [np_(w) for w in model.non_trainable_weights]
    y = np_(model(x, training=True))
    for b, w in zip(before, model.non_trainable_weights):
        np.testing.assert_array_equal(np_(w), b)
    np.testing.assert_allclose(y, np_(model(x, training=False)), rtol=0, atol=0)  # frozen: inference mode


@pytest.mark.parametrize("name", list(TWINS))
def test_integer_inputs_run_in_the_compute_dtype(name):
    """Keras's layers cast integers to float32 and run; so do normkit's (the core itself refuses integers)."""
    x = np.arange(2 * 3 * 4, dtype="int32").reshape(2, 3, 4)
    layer = getattr(nk, name)(**TWINS[name])
    call = {"training": True} if name == "BatchNormalization" else {}
    y = layer(x, **call)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    if name == "BatchNormalization":  # Keras's own casts to float32 too: equal outputs
        native = keras.layers.BatchNormalization()
        np.testing.assert_allclose(np_(y), np_(native(x, training=True)), **f32_tol(6, 2.0))
    else:  # Keras's round the normalized values back to int32 first; normkit gives those of the float32 input
        np.testing.assert_allclose(np_(y), np_(layer(x.astype("float32"))), rtol=0, atol=0)


def test_standardize_given_statistics_and_invert():
    """``mean=`` / ``variance=`` / ``invert=True`` as keras.layers.Normalization takes them."""
    x = data((5, 3), seed=15)
    mean, variance = [0.5, -1.0, 2.0], [4.0, 0.25, 1.0]
    ours, native = nk.Standardize(mean=mean, variance=variance), keras.layers.Normalization(mean=mean, variance=variance)
    np.testing.assert_allclose(np_(ours(x)), np_(native(x)), **f32_tol(1, 4.0))
    np.testing.assert_allclose(np_(ours(x)), (x - np.array(mean)) / np.sqrt(variance), **f32_tol(1, 4.0))
    back = nk.Standardize(mean=mean, variance=variance, invert=True)
    native_back = keras.layers.Normalization(mean=mean, variance=variance, invert=True)
    np.testing.assert_allclose(np_(back(ours(x))), x, **f32_tol(1, 4.0))
    np.testing.assert_allclose(np_(back(x)), np_(native_back(x)), **f32_tol(1, 4.0))
    scalar = nk.Standardize(mean=3.0, variance=4.0)
    np.testing.assert_allclose(np_(scalar(x)), (x - 3.0) / 2.0, **f32_tol(1, 4.0))
    assert nk.Standardize.from_config(ours.get_config()).get_config() == ours.get_config()
    adapted = nk.Standardize(invert=True)
    adapted.adapt(x)
    np.testing.assert_allclose(np_(adapted(np.zeros((1, 3), "float32"))), x.astype("float64").mean(0, keepdims=True),
                               **f32_tol(5, 4.0))
    for bad, match in (({"mean": 1.0}, "both `mean` and `variance` must be set"),
                       ({"mean": [1.0, 2.0], "variance": [1.0]}, "must have the same shape"),
                       ({"mean": [[1.0]], "variance": [[1.0]]}, "must be less than or equal to the number of axes")):
        with pytest.raises(ValueError, match=match):
            nk.Standardize(**bad)
        with pytest.raises(ValueError, match=match):
            keras.layers.Normalization(**bad)


def test_min_max_scale_invert():
    x = data((40, 3), seed=16)
    x[:, 1] = 2.5  # a constant feature maps to lo, and back to its value
    forward, backward = nk.MinMaxScale(feature_range=(-1, 1)), nk.MinMaxScale(feature_range=(-1, 1), invert=True)
    forward.adapt(x)
    backward.adapt(x)
    np.testing.assert_allclose(np_(backward(forward(x))), x, **f32_tol(1, 4.0))
    np.testing.assert_array_equal(np_(forward(x))[:, 1], -1.0)


def test_adapt_on_a_batched_dataset_of_scalars_raises_like_keras():
    """A dataset of scalars batched by 8 has no known feature axis: Keras raises, and so does Standardize,
    instead of learning a statistic per position in the batch."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(np.arange(40.0, dtype="float32")).batch(8)
    message = "All `axis` values to be kept must have a known shape"
    with pytest.raises(ValueError, match=message):
        keras.layers.Normalization().adapt(dataset)
    for layer in (nk.Standardize(), nk.MinMaxScale()):
        with pytest.raises(ValueError, match=message):
            layer.adapt(dataset)
    scalar = nk.Standardize(axis=None)  # the way to one statistic, as in Keras
    scalar.adapt(dataset)
    np.testing.assert_allclose(np_(scalar.mean), 19.5)
    np.testing.assert_allclose(np_(scalar.variance), np.arange(40.0).var(), rtol=1e-6)
    std = np.arange(40.0).std()  # and the layer of one statistic then standardizes (it raised on TensorFlow in 0.1)
    np.testing.assert_allclose(np_(scalar(np.array([[19.5, 19.5 + std]], "float32"))), [[0.0, 1.0]], atol=1e-6)
    lo_hi = nk.MinMaxScale(axis=None)
    lo_hi.adapt(dataset)
    np.testing.assert_allclose(np_(lo_hi(np.array([[0.0, 39.0, 19.5]], "float32"))), [[0.0, 1.0, 0.5]], atol=1e-6)
    with pytest.raises(ValueError, match="All `axis` values must be in the range"):
        nk.Standardize().adapt(tf.data.Dataset.from_tensor_slices(np.arange(4.0, dtype="float32")))
