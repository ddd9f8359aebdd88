"""``normkit_keras.convert`` on the models users have: keras.applications, keras-hub backbones, Sequential, subclassed.

Each model is built once per module from a small config with random weights (its normalization layers' gamma,
beta and moving statistics randomized too), in float64, and converted. Per model: every Keras normalization layer
is normkit's, nothing is left unreported, the class, configs and weights stay and no variable is shared; inference
outputs equal the unconverted model's; three float64 SGD steps of each give equal weights, moving statistics
included, and training the copy leaves the original as it was.

The reference is the unconverted Keras model computing in float64. On the jax and torch backends Keras computes
a float64 BatchNormalization or GroupNormalization in float32 (``keras.src.backend.result_type("float64",
"float32")`` is "float32" there, by ``BIT64_TO_BIT32_DTYPE``; TensorFlow keeps float64), which put the unconverted
model ~2e-7 off normkit's float64 result: not a float64 reference. So both models run under ``_keras_float64``:
Keras's own code with TensorFlow's float64 promotion on every backend (its layers then compute float64 in
float64, checked against NumPy in ``test_reference_is_float64``). Both sides, because other Keras ops of a model
(keras-hub's attention, the losses) promote through the same table: the models then differ in their
normalization layers only, which is what convert changes.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import keras
import keras_hub  # required (requirements/test.txt): a missing keras-hub fails, never skips
import numpy as np
import pytest
from keras.src.backend.common import dtypes as keras_dtypes

import normkit_keras
from normkit.plugin.kernels import use_policy
from normkit_keras import ConversionReport, UnconvertedNormWarning, convert

BACKEND = keras.backend.backend()
# module-scoped models: the tests of one model run on one xdist worker, so each model is built once
pytestmark = pytest.mark.xdist_group("keras_convert_ecosystem")

KERAS_NORMS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
    keras.layers.UnitNormalization,
)
# float64 on both sides: outputs and weights differ only by the order of float64 sums (two-pass variance, fused
# kernels) amplified by the network (measured on torch: at most 7e-14 absolute, MobileNetV2's weights after 3
# steps; 3e-13 relative on outputs); 1e-9 is far below float32 round-off (~1e-7, what the jax/torch downcast gave)
# and a wrong formula's (>1e-3)
F64 = dict(rtol=1e-9, atol=1e-10)


@contextlib.contextmanager
def _floatx64():
    """Layers, inputs and optimizer variables in float64 (the conftest's ``float64`` fixture, for module scope)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


@contextlib.contextmanager
def _keras_float64():
    """Keras's own layers computing float64 in float64 on every backend, as they do on TensorFlow: its layers cast
    inputs to ``result_type(dtype, "float32")``, which maps float64 to float32 except on TensorFlow."""
    saved = keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"]
    keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
    try:
        yield
    finally:
        keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"] = saved


def _norms(model):
    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True) if isinstance(layer, KERAS_NORMS)
    ]


def _is_normkit(layer) -> bool:
    return type(layer).__module__.startswith("normkit_keras.")


def _randomize_norms(model, rng):
    """Random gamma/beta/scale and moving statistics (positive variance), so a dropped or swapped weight shows."""
    for layer in _norms(model):
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if "variance" in variable.path:
                value = rng.uniform(0.5, 2.0, shape)
            elif "gamma" in variable.path or "scale" in variable.path:
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(0.0, 0.3, shape)
            variable.assign(value.astype(variable.dtype))


def _values(model) -> dict[str, np.ndarray]:
    """Every weight keyed by its index in ``model.weights`` and its name (the copy's layers get fresh names from
    Keras, so paths differ; the order is the model's)."""
    return {f"{i}:{v.name}": np.array(keras.ops.convert_to_numpy(v)) for i, v in enumerate(model.weights)}


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(keras.ops.convert_to_numpy(tree))


def _assert_tree_close(a, b, **tol):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
    else:
        np.testing.assert_allclose(a, b, **tol)


def _train(model, x, y, steps=3):
    # eager on TensorFlow and torch (tracing a tf.function costs more than 3 eager steps); one jitted step on jax
    # (its eager ops compile one by one on first use, slower still)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3), loss="mse", run_eagerly=BACKEND != "jax")
    for _ in range(steps):
        model.train_on_batch(x, y)


# ------------------------------------------------------------------------------------------ the models


def _mobilenet_v2(rng):
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    ), rng.normal(size=(8, 32, 32, 3))


def _resnet50(rng):
    return keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10), rng.normal(
        size=(8, 32, 32, 3)
    )


def _hub_resnet(rng):
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(16, 16, 3),
    )
    return model, rng.normal(size=(4, 16, 16, 3))


def _hub_bert(rng):
    model = keras_hub.models.BertBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
        dropout=0.0,
    )
    x = {
        "token_ids": rng.integers(0, 40, (3, 8)).astype("int32"),
        "segment_ids": rng.integers(0, 2, (3, 8)).astype("int32"),
        "padding_mask": np.ones((3, 8), "int32"),
    }
    return model, x


@keras.saving.register_keras_serializable(package="normkit_tests")  # convert deep-copies: classes must serialize
class _Block(keras.Model):
    """A subclassed model: conv, every Keras normalization layer, a nested Sequential holding one, its own call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(8, 3, padding="same")
        self.bn = keras.layers.BatchNormalization(momentum=0.9)
        self.gn = keras.layers.GroupNormalization(groups=4)
        self.inner = keras.Sequential([keras.layers.LayerNormalization(epsilon=1e-4)])
        self.rms = keras.layers.RMSNormalization()
        self.unit = keras.layers.UnitNormalization()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=None):
        h = self.bn(self.conv(x), training=training)
        h = self.gn(keras.ops.relu(h)) + h
        h = keras.ops.mean(h, axis=(1, 2))
        return self.head(self.unit(self.rms(self.inner(h))))


def _subclassed(rng):
    model, x = _Block(), rng.normal(size=(4, 6, 6, 3))
    model(x)
    return model, x


def _sequential(rng):
    model = keras.Sequential(
        [
            keras.Input((5, 6)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(axis=-1, center=False),
            keras.layers.LayerNormalization(axis=[1, 2], scale=False),
            keras.layers.GroupNormalization(groups=2),
            keras.layers.RMSNormalization(epsilon=1e-3),
            keras.layers.UnitNormalization(axis=[1, 2]),
            keras.layers.Dense(2),
        ]
    )
    return model, rng.normal(2.0, 3.0, size=(6, 5, 6))


# name: (builder, normalization layers converted)
BUILDERS = {
    "mobilenet_v2": (_mobilenet_v2, 52),  # every BatchNormalization of MobileNetV2
    "resnet50": (_resnet50, 53),
    "keras_hub_resnet": (_hub_resnet, 6),  # input conv, 2 per block, the second stack's shortcut
    "keras_hub_bert": (_hub_bert, 5),  # embeddings + 2 per encoder layer: clone_model reaches only the first
    "subclassed": (_subclassed, 5),
    "sequential": (_sequential, 5),
}
# convert is backend-independent structure: ResNet50 (~27 s) runs on TensorFlow only, and on jax (where every eager
# op and each jitted train step compiles on first use: MobileNetV2 ~50 s, BERT ~20 s, the keras-hub ResNet ~19 s)
# only the subclassed and Sequential models run (all five normalization layers, nested); the keras-hub backbones and
# MobileNetV2 run on TensorFlow and torch
ON_TENSORFLOW_ONLY = {"resnet50"}
NOT_ON_JAX = {"resnet50", "mobilenet_v2", "keras_hub_bert", "keras_hub_resnet"}
MODELS = [
    name
    for name in BUILDERS
    if not (BACKEND != "tensorflow" and name in ON_TENSORFLOW_ONLY or BACKEND == "jax" and name in NOT_ON_JAX)
]


@pytest.fixture(scope="module")
def built():
    """Each model built once per module (on first use): model, its converted copy, report, input, targets."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


def _build(name):
    """The model (float64, random normalization weights), its converted copy, the report, an input and targets."""
    rng = np.random.default_rng(0)
    with _floatx64():
        model, x = BUILDERS[name][0](rng)
        _randomize_norms(model, rng)
        converted, report = convert(model, report=True)
        with _keras_float64():
            out = model(x, training=False)
        y = (
            {k: rng.normal(size=tuple(v.shape)) for k, v in out.items()}
            if isinstance(out, dict)
            else rng.normal(size=tuple(out.shape))
        )
    return types.SimpleNamespace(model=model, converted=converted, report=report, x=x, y=y)


# ------------------------------------------------------------------------------------------ the tests


def test_reference_is_float64(float64):
    """The reference: under ``_keras_float64`` Keras's BatchNormalization and GroupNormalization compute float64
    (1e-12 from NumPy's float64), in training and inference, on every backend."""
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (4, 3, 3, 4))
    bn = keras.layers.BatchNormalization(momentum=0.5)
    gn = keras.layers.GroupNormalization(groups=2, epsilon=1e-3)
    with _keras_float64():
        y_bn, y_gn = _numpy(bn(x, training=True)), _numpy(gn(x))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y_bn, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_numpy(bn.moving_variance), 0.5 + 0.5 * var, rtol=1e-12, atol=1e-12)
    g = x.reshape(4, 3, 3, 2, 2)
    ref = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-3)
    np.testing.assert_allclose(y_gn, ref.reshape(x.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_every_norm_converted(built, name):
    """Every Keras normalization layer is normkit's, in order and class; the report names them all and leaves
    nothing; the class, each layer's config and every weight are kept; the copy shares no variable."""
    case = built(name)
    model, converted, report = case.model, case.converted, case.report
    assert type(converted) is type(model)  # a keras-hub backbone stays its class (clone_model: a plain Functional)
    native, ours = _norms(model), _norms(converted)
    assert len(ours) == len(native) == BUILDERS[name][1]
    assert [type(layer).__name__ for layer in ours] == [type(layer).__name__ for layer in native]
    assert all(_is_normkit(layer) for layer in ours), [type(layer) for layer in ours if not _is_normkit(layer)]
    assert not any(_is_normkit(layer) for layer in native), "convert changed the model it was given"
    assert isinstance(report, ConversionReport)
    assert len(report.converted) == len(native) and report.skipped == []
    for old, new in zip(native, ours):
        config_old, config_new = old.get_config(), new.get_config()
        config_old.pop("name"), config_new.pop("name")  # the copy's layers are named afresh by Keras
        assert config_old == config_new, old.name
    before, after = _values(model), _values(converted)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=path)
    ids = {id(v) for v in model.weights}
    assert not any(id(v) in ids for v in converted.weights), "the copy shares variables with the model"


@pytest.mark.parametrize("name", MODELS)
def test_eval_outputs_equal(built, name, float64):
    case = built(name)
    with _keras_float64():
        expected = _numpy(case.model(case.x, training=False))
        ours = _numpy(case.converted(case.x, training=False))
    _assert_tree_close(ours, expected, **F64)


@pytest.mark.parametrize("name", MODELS)
def test_three_float64_training_steps_equal(built, name, float64):
    """Three SGD steps of the copy leave the original as it was; three of the original then give the same weights
    and moving statistics."""
    case = built(name)
    start = _values(case.model)
    with _keras_float64():
        _train(case.converted, case.x, case.y)
    for path, value in _values(case.model).items():
        np.testing.assert_array_equal(value, start[path], err_msg=f"training the copy moved {path}")
    with _keras_float64():
        _train(case.model, case.x, case.y)
    trained, ours = _values(case.model), _values(case.converted)
    moved = [p for p in trained if not np.array_equal(trained[p], start[p])]
    if any(isinstance(layer, keras.layers.BatchNormalization) for layer in _norms(case.model)):
        assert any("moving_mean" in p for p in moved)
    for path in trained:
        np.testing.assert_allclose(ours[path], trained[path], err_msg=path, **F64)


@pytest.mark.parametrize("name", ["subclassed", "sequential"])
def test_core_policy_outputs_and_training_equal(name, float64):
    """Under the "core" kernel policy (normkit's own math, not the backend's fused ops) the converted small models
    (all five normalization layers) give Keras's eval outputs and the same weights after three training steps."""
    case = _build(name)
    with use_policy("core"), _keras_float64():
        _assert_tree_close(_numpy(case.converted(case.x, training=False)),
                           _numpy(case.model(case.x, training=False)), **F64)
        _train(case.converted, case.x, case.y)
        _train(case.model, case.x, case.y)
    trained, ours = _values(case.model), _values(case.converted)
    for path in trained:
        np.testing.assert_allclose(ours[path], trained[path], err_msg=path, **F64)


def test_specific_classes_kept(built):
    """The keras-hub backbones stay their classes and serialize from their own arguments; the subclassed model
    keeps its class and nested Sequential; a converted Sequential reloads as normkit's layers."""
    if "keras_hub_resnet" in MODELS:
        hub = built("keras_hub_resnet").converted
        assert type(hub) is keras_hub.models.ResNetBackbone and hub.get_config()["stackwise_num_filters"] == [64, 16]
    if "keras_hub_bert" in MODELS:
        assert type(built("keras_hub_bert").converted) is keras_hub.models.BertBackbone
    case = built("subclassed")
    assert type(case.converted) is _Block
    assert sorted(c for _, c, _ in case.report.converted) == sorted(
        ["BatchNormalization", "GroupNormalization", "LayerNormalization", "RMSNormalization", "UnitNormalization"]
    )
    assert isinstance(case.converted.inner.layers[0], normkit_keras.LayerNormalization)
    sequential = built("sequential").converted
    with _floatx64():
        reloaded = keras.Sequential.from_config(sequential.get_config())
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in sequential.layers]


@keras.saving.register_keras_serializable(package="normkit_tests")
class _MyNorm(keras.layers.Layer):
    def call(self, x):
        return x - keras.ops.mean(x, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="normkit_tests")
class _MyBatchNorm(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask) * 2.0


def test_left_layers_are_named():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            _MyNorm(name="centre"),
            _MyBatchNorm(name="twice"),
            keras.layers.Normalization(mean=0.0, variance=1.0, name="standard"),
            keras.layers.LayerNormalization(name="ln"),
        ]
    )
    converted, report = convert(model, report=True)
    assert [path for path, _, _ in report.converted] == ["ln"]
    skipped = {path: (cls, reason) for path, cls, reason in report.skipped}
    assert set(skipped) == {"centre", "twice", "standard"}
    assert (
        skipped["twice"][0] == "_MyBatchNorm" and "subclass of keras.layers.BatchNormalization" in skipped["twice"][1]
    )
    assert type(converted.get_layer("twice")) is _MyBatchNorm
    with pytest.warns(UnconvertedNormWarning, match=r"left 3 .*centre.*twice.*standard") as caught:
        convert(model)
    ours = [w for w in caught if issubclass(w.category, UnconvertedNormWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__  # one warning, pointing at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnconvertedNormWarning)
        convert(keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization()]))  # nothing left: silent


def test_keras_hub_rms_layer_converted_in_float32():
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm

    model = keras.Sequential([keras.Input((5, 8)), LlamaLayerNorm(epsilon=1e-5, name="rms")])
    model.get_layer("rms").scale.assign(np.linspace(0.5, 1.5, 8).astype("float32"))
    converted, report = convert(model, report=True)
    assert report.converted == [("rms", "LlamaLayerNorm", "normkit_keras.RMSNormalization")]
    layer = converted.get_layer("rms")
    assert isinstance(layer, normkit_keras.RMSNormalization) and layer.epsilon == 1e-5
    x = np.random.default_rng(1).normal(3.0, 2.0, (4, 5, 8)).astype("float32")
    # both compute in float32, one reduction of 8 terms and 3 operations: within 1e-6 (8 float32 eps) of each
    # other and of the float64 formula
    np.testing.assert_allclose(_numpy(converted(x)), _numpy(model(x)), rtol=1e-6, atol=1e-6)
    ref = x / np.sqrt(np.mean(x.astype("float64") ** 2, axis=-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 8)
    np.testing.assert_allclose(_numpy(converted(x)), ref, rtol=1e-6, atol=1e-6)
    half = keras.Sequential([keras.Input((8,)), LlamaLayerNorm(dtype="mixed_bfloat16", name="rms")])
    _, report = convert(half, report=True)
    assert report.converted == [] and [p for p, _, _ in report.skipped] == ["rms"]


def test_bad_input_named():
    with pytest.raises(TypeError, match="convert expects a keras.Model or keras Layer, got ndarray"):
        convert(np.zeros(3))
