"""The TensorFlow kernels ``normkit_kernel`` offers: equal to the core, exact on shifted data, declining outside contract.

Collected in the TensorFlow run only (conftest): the kernels serve ``tf.Tensor`` whatever the Keras
backend, so the jax and torch runs would repeat the same calls. The functional API (``normkit.batch_norm`` / ``layer_norm`` / ``group_norm`` on ``tf.Tensor``) and the
layers reach the same kernels; every comparison here runs the same call under the policy "auto"
(kernels) and "core" (normkit's own math) and checks both against the float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import _normkit_keras_plugin as _plugin
import normkit
import normkit_keras as nk
from conftest import BACKEND, f32_tol
from normkit.plugin.kernels import use_policy
from normkit.testing import reference
from normkit_keras import _kernels
from normkit_keras._backend import backend_namespace

assert BACKEND == "tensorflow", "conftest collects this module in the TensorFlow run only"
TF = True


def data(shape, seed=0, offset=0.5, scale=2.0, dtype="float32"):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(dtype)


def test_policy_api():
    before = nk.get_kernel_policy()
    try:
        nk.set_kernel_policy("auto")
        assert nk.set_kernel_policy("core") == "auto" and nk.get_kernel_policy() == "core"
        with use_policy("auto"):
            assert nk.get_kernel_policy() == "auto"
        assert nk.get_kernel_policy() == "core"
        with pytest.raises(ValueError, match="kernel policy"):
            nk.set_kernel_policy("fast")
    finally:
        nk.set_kernel_policy(before)
    code = "import normkit_keras as nk; print(nk.get_kernel_policy())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "NORMKIT_KERAS_KERNELS": "core"}).stdout.strip()
    assert out == "core"


def test_hook_answers_from_the_table():
    """The hook offers the TensorFlow kernels for float32 TensorFlow tensors on any device, and nothing else."""
    xp = backend_namespace()
    ops = {"batch_norm": _kernels.batch_norm, "layer_norm": _kernels.layer_norm, "group_norm": _kernels.group_norm}
    with use_policy("auto"):
        for op, kernel in ops.items():
            for device in ("/job:localhost/replica:0/task:0/device:CPU:0", None, "gpu"):
                got = _plugin.normkit_kernel(op, xp, device, getattr(xp, "float32"), "any")
                assert got is (kernel if TF else None), (op, device)
            for dtype in ("float64", "float16", "bfloat16"):
                assert _plugin.normkit_kernel(op, xp, None, getattr(xp, dtype), "any") is None
        assert _plugin.normkit_kernel("rms_norm", xp, None, getattr(xp, "float32"), "any") is None
        assert _plugin.normkit_kernel("batch_norm", np, "cpu", np.float32, "any") is None
    with use_policy("core"):
        assert _plugin.normkit_kernel("batch_norm", xp, None, getattr(xp, "float32"), "any") is None


# --------------------------------------------------------------------------- the functional API on tf.Tensor

OPS = {
    "batch_norm-train": (lambda x, w, b: normkit.batch_norm(x, _rm(x), _rv(x), w, b, training=True, momentum=0.3,
                                                            eps=1e-3, axis=-1, correction=1)),
    "batch_norm-eval": (lambda x, w, b: normkit.batch_norm(x, _rm(x), _rv(x), w, b, training=False, eps=1e-3,
                                                           axis=-1).output),
    "layer_norm": (lambda x, w, b: normkit.layer_norm(x, w, b, axis=-1, eps=1e-3)),
    "group_norm": (lambda x, w, b: normkit.group_norm(x, 2, w, b, axis=-1, eps=1e-3)),
}


def _rm(x):
    import tensorflow as tf

    return tf.constant(np.linspace(-1, 1, x.shape[-1]).astype("float32") + 0.5)


def _rv(x):
    import tensorflow as tf

    return tf.constant(np.linspace(2, 5, x.shape[-1]).astype("float32"))


def _reference(op, x, w, b):
    if op == "batch_norm-train":
        return reference.batch_norm(x, _rm(x).numpy(), _rv(x).numpy(), w, b, training=True, momentum=0.3, eps=1e-3,
                                    axis=-1, correction=1)
    if op == "batch_norm-eval":
        return reference.batch_norm(x, _rm(x).numpy(), _rv(x).numpy(), w, b, training=False, eps=1e-3, axis=-1)[0]
    if op == "layer_norm":
        return reference.layer_norm(x, w, b, axis=-1, eps=1e-3)
    return reference.group_norm(x, 2, w, b, axis=-1, eps=1e-3)


def _run(op, x, w, b, dy, mode):
    """(outputs..., dx, dw, db) of ``op`` on TensorFlow in ``mode``: eager, tf.function with an unknown batch, XLA."""
    import tensorflow as tf

    def step(x, w, b):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            out = OPS[op](x, w, b)
            y = out[0] if isinstance(out, tuple) else out
        grads = tape.gradient(y, [x, w, b], output_gradients=dy)
        rest = list(out[1:]) if isinstance(out, tuple) else []
        return [y, *rest, *grads]

    if mode == "xla":
        step = tf.function(step, jit_compile=True)
    elif mode == "unknown-batch":
        spec = tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)
        step = tf.function(step, input_signature=[spec, tf.TensorSpec(w.shape), tf.TensorSpec(b.shape)])
    return [t.numpy() for t in step(tf.constant(x), tf.constant(w), tf.constant(b))]


SHAPES = [(64, 4), (4, 5, 5, 4)]


@pytest.mark.parametrize("mode", ["eager", "unknown-batch", "xla"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_functional_kernel_equals_core_and_reference(op, shape, mode):
    """Outputs, running statistics and gradients: kernel == core == float64 reference (float32 round-off)."""
    x, dy = data(shape, seed=1), data(shape, seed=2, offset=0.0, scale=1.0)
    w, b = data(shape[-1:], seed=3, offset=1.0, scale=0.5), data(shape[-1:], seed=4)
    with use_policy("auto"):
        auto = _run(op, x, w, b, dy, mode)
    with use_policy("core"):
        core = _run(op, x, w, b, dy, mode)
    want = _reference(op, x.astype("float64"), w.astype("float64"), b.astype("float64"))
    want = list(want) if isinstance(want, tuple) else [want]
    n = x.size
    for i, (a, c) in enumerate(zip(auto, core)):
        np.testing.assert_allclose(a, c, **f32_tol(n, np.abs(c).max()), err_msg=f"{op} {mode} output {i}: kernel vs core")
    for i, (a, r) in enumerate(zip(auto, want)):
        np.testing.assert_allclose(a, r, **f32_tol(n, np.abs(r).max()), err_msg=f"{op} {mode} output {i} vs float64")


@pytest.mark.parametrize("op", ["batch_norm-train", "layer_norm", "group_norm"])
def test_functional_kernel_exact_at_offset_1e4(op):
    """float32 data at mean 1e4, std 1: each kernel stays within float32 round-off of the float64 reference.

    (Unshifted, TensorFlow's fused batch norm is 1.2e-2 off here; moments + batch_normalization 1.3e-3.)
    """
    import tensorflow as tf

    shape = (4096, 8) if op.startswith("batch_norm") else (16, 14, 14, 8)
    x = data(shape, seed=5, offset=1e4, scale=1.0)
    w, b = data((8,), seed=3, offset=1.0, scale=0.5), data((8,), seed=4)
    with use_policy("auto"):
        got = OPS[op](tf.constant(x), tf.constant(w), tf.constant(b))
    got = got[0] if isinstance(got, tuple) else got
    want = _reference(op, x.astype("float64"), w.astype("float64"), b.astype("float64"))
    want = want[0] if isinstance(want, tuple) else want
    assert np.isfinite(got.numpy()).all()
    np.testing.assert_allclose(got.numpy(), want, **f32_tol(shape[-1] * 8, np.abs(want).max()))


def test_batch_norm_eval_kernel_centres_at_offset():
    """Inference with running statistics at 1e4: the fused kernel centres first (Keras's x * inv + shift is 2.7e-3 off)."""
    import tensorflow as tf

    x = data((256, 8), seed=6, offset=1e4, scale=1.0)
    rm, rv = (x.mean(0) + 0.1).astype("float32"), x.var(0).astype("float32") + 0.5
    w, b = data((8,), seed=3, offset=1.0, scale=0.5), data((8,), seed=4)
    with use_policy("auto"):
        got = normkit.batch_norm(tf.constant(x), tf.constant(rm), tf.constant(rv), tf.constant(w), tf.constant(b),
                                 training=False, eps=1e-3, axis=-1).output.numpy()
    want = reference.batch_norm(x.astype("float64"), rm, rv, w, b, training=False, eps=1e-3, axis=-1)[0]
    np.testing.assert_allclose(got, want, **f32_tol(8, np.abs(want).max()))


def test_kernels_decline_outside_their_contract():
    """Masks, channels-first axes, non-trailing layer axes, tiny eps, Python lists and float64: NotImplemented."""
    import tensorflow as tf

    x = tf.constant(data((4, 6, 4)))
    w, b = tf.ones(4), tf.zeros(4)
    common = dict(training=True, momentum=0.1, eps=1e-3, mask=None, correction=1, allow_single_value=False, num_batches=None)
    assert _kernels.batch_norm(x, None, None, w, b, axis=2, **common) is not NotImplemented
    assert _kernels.batch_norm(x, None, None, w, b, axis=1, **common) is NotImplemented
    assert _kernels.batch_norm(x, None, None, w, b, axis=2, **{**common, "mask": tf.ones((4, 6), tf.bool)}) is NotImplemented
    assert _kernels.batch_norm(x, None, None, w, b, axis=2, **{**common, "eps": 1e-6}) is NotImplemented
    assert _kernels.batch_norm(x, None, None, [1.0] * 4, b, axis=2, **common) is NotImplemented
    assert _kernels.batch_norm(tf.constant(data((1, 4))), None, None, w, b, axis=1, **common) is NotImplemented
    assert _kernels.batch_norm(tf.cast(x, tf.float64), None, None, None, None, axis=2, **common) is NotImplemented
    assert _kernels.layer_norm(x, None, None, axis=(2,), eps=1e-3) is not NotImplemented
    assert _kernels.layer_norm(x, None, None, axis=(1,), eps=1e-3) is NotImplemented
    assert _kernels.layer_norm(x, tf.ones(3), None, axis=(2,), eps=1e-3) is NotImplemented
    assert _kernels.group_norm(x, 2, w, b, axis=2, eps=1e-3) is not NotImplemented
    assert _kernels.group_norm(x, 2, None, None, axis=1, eps=1e-3) is NotImplemented
    # the core then computes: the same call still answers, with the core's errors
    with use_policy("auto"), pytest.raises(ValueError, match="more than 1 value per channel"):
        normkit.batch_norm(tf.constant(data((1, 4))), None, None, training=True, axis=-1)


def test_batch_norm_kernel_running_statistics():
    """The fused kernel's statistics become Moments; the running update is the core's (correction, momentum=None)."""
    import tensorflow as tf

    x = data((6, 5, 3), seed=7)
    rm, rv = np.full(3, 0.5, "float32"), np.full(3, 2.0, "float32")
    for correction, momentum, nb in ((0, 0.25, None), (1, 0.25, None), (1, None, 3)):
        with use_policy("auto"):
            out = normkit.batch_norm(tf.constant(x), tf.constant(rm), tf.constant(rv), training=True, axis=-1,
                                     momentum=momentum, correction=correction, num_batches=nb, eps=1e-3)
        _, want_m, want_v = reference.batch_norm(x.astype("float64"), rm, rv, training=True, axis=-1,
                                                 momentum=momentum if momentum is not None else 1 / nb,
                                                 correction=correction, eps=1e-3)
        np.testing.assert_allclose(out.running_mean.numpy(), want_m, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.running_var.numpy(), want_v, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the layers in a compiled fit step


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_layers_in_a_compiled_fit_step(jit_compile, policy):
    """Inside model.fit's tf.function (and under XLA, where the kernels decline) the layers train like Keras's."""
    def model(module):
        inputs = keras.Input((6, 6, 4))
        h = module.BatchNormalization(momentum=0.5)(keras.layers.Conv2D(6, 3)(inputs))
        h = module.GroupNormalization(groups=3)(h)
        h = module.LayerNormalization()(keras.layers.Flatten()(h))
        return keras.Model(inputs, keras.layers.Dense(2)(h))

    native, ours = model(keras.layers), model(nk)
    ours.set_weights(native.get_weights())
    x, y = data((16, 6, 6, 4), seed=10), data((16, 2), seed=11)
    for m, jit in ((native, False), (ours, jit_compile)):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=jit)
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(ours.weights, native.weights):
        want = b.numpy()
        np.testing.assert_allclose(a.numpy(), want, **f32_tol(x.size, np.abs(want).max()), err_msg=a.path)
