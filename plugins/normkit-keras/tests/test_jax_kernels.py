"""The JAX kernels ``normkit_kernel`` offers for float32 ``jax.numpy`` arrays on the CPU (what Keras on JAX computes
with): equal to the core and to the float64 reference, eagerly and under ``jax.jit``, exact at offset 1e4.

Collected in the JAX run only (conftest): the kernels serve jax arrays whatever the Keras backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _normkit_keras_plugin as _plugin
import normkit
from conftest import BACKEND, f32_tol
from normkit.plugin.kernels import use_policy
from normkit.testing import reference
from normkit_keras import _jax_kernels

assert BACKEND == "jax", "conftest collects this module in the JAX run only"
F32 = jnp.dtype("float32")  # the dtype the functional API passes (x.dtype)


def data(shape, seed=0, offset=0.5, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype("float32")


def test_hook_answers_from_the_table():
    with use_policy("auto"):
        for op in ("batch_norm", "layer_norm", "group_norm", "rms_norm"):
            kernel = getattr(_jax_kernels, op)
            assert _plugin.normkit_kernel(op, jnp, jax.devices("cpu")[0], F32, "any") is kernel, op
            assert _plugin.normkit_kernel(op, jnp, None, F32, "any") is kernel, op  # traced by jax.jit
            assert _plugin.normkit_kernel(op, jnp, "gpu", F32, "any") is None, op  # not measured there
            assert _plugin.normkit_kernel(op, jnp, None, jnp.dtype("float64"), "any") is None, op
        assert _plugin.normkit_kernel("instance_norm", jnp, None, F32, "any") is None
    with use_policy("core"):
        assert _plugin.normkit_kernel("group_norm", jnp, None, F32, "any") is None


def _bn(x, w, b):
    c = x.shape[-1]
    out = normkit.batch_norm(x, jnp.linspace(0.0, 1.0, c), jnp.linspace(2.0, 3.0, c), w, b, training=True,
                             momentum=0.3, eps=1e-3, axis=-1, correction=1)
    return out.output, out.running_mean, out.running_var


OPS = {
    "batch_norm": _bn,
    "layer_norm": lambda x, w, b: normkit.layer_norm(x, w, b, axis=-1, eps=1e-3),
    "group_norm": lambda x, w, b: normkit.group_norm(x, 2, w, b, axis=-1, eps=1e-3),
    "rms_norm": lambda x, w, b: normkit.rms_norm(x, w, axis=-1, eps=1e-6),
}


def _reference(op, x, w, b):
    c = x.shape[-1]
    if op == "batch_norm":
        return reference.batch_norm(x, np.linspace(0.0, 1.0, c), np.linspace(2.0, 3.0, c), w, b, training=True,
                                    momentum=0.3, eps=1e-3, axis=-1, correction=1)
    if op == "layer_norm":
        return (reference.layer_norm(x, w, b, axis=-1, eps=1e-3),)
    if op == "group_norm":
        return (reference.group_norm(x, 2, w, b, axis=-1, eps=1e-3),)
    return (reference.rms_norm(x, w, axis=-1, eps=1e-6),)


def _reference_grads(op, x, dy, w):
    if op == "batch_norm":
        return reference.batch_norm_grad(x, dy, w, axis=-1, eps=1e-3)
    if op == "layer_norm":
        return reference.layer_norm_grad(x, dy, w, axis=-1, eps=1e-3)
    if op == "group_norm":
        return reference.group_norm_grad(x, dy, 2, w, axis=-1, eps=1e-3)
    return reference.rms_norm_grad(x, dy, w, axis=-1, eps=1e-6)


def _run(op, x, w, b, dy, jit):
    def outputs(x, w, b):
        out = OPS[op](x, w, b)
        return out if isinstance(out, tuple) else (out,)

    def loss(x, w, b):
        return jnp.sum(outputs(x, w, b)[0] * dy)

    grad = jax.grad(loss, argnums=(0, 1, 2) if op != "rms_norm" else (0, 1))
    if jit:  # fresh functions per policy: jax.jit caches traces per function, and the policy is read while tracing
        outputs, grad = jax.jit(outputs), jax.jit(grad)
    return [np.asarray(t) for t in outputs(x, w, b)], [np.asarray(g) for g in grad(x, w, b)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("shape", "offset"), [((64, 8), 0.5), ((4, 5, 6, 8), 1e4)], ids=["64x8", "4x5x6x8-offset1e4"])
@pytest.mark.parametrize("op", list(OPS))
def test_kernel_equals_core_and_reference(op, shape, offset, jit):
    """Outputs, running statistics and gradients: kernel == core == float64 reference, within float32 round-off."""
    x, dy = data(shape, seed=1, offset=offset), data(shape, seed=2, offset=0.0, scale=1.0)
    w, b = data(shape[-1:], seed=3, offset=1.0, scale=0.5), data(shape[-1:], seed=4)
    args = tuple(map(jnp.asarray, (x, w, b)))
    with use_policy("auto"):
        auto = _run(op, *args, jnp.asarray(dy), jit)
    with use_policy("core"):
        core = _run(op, *args, jnp.asarray(dy), jit)
    x64, w64, b64 = x.astype("float64"), w.astype("float64"), b.astype("float64")
    want = (list(_reference(op, x64, w64, b64)), list(_reference_grads(op, x64, dy.astype("float64"), w64)))
    if op == "rms_norm":
        want = (want[0], want[1][:2])
    n = x.size
    for part in (0, 1):
        for i, (a, c, r) in enumerate(zip(auto[part], core[part], want[part])):
            what = f"{op} {'gradient' if part else 'output'} {i}"
            np.testing.assert_allclose(a, r, **f32_tol(n, np.abs(r).max()), err_msg=f"{what}: kernel vs float64")
            np.testing.assert_allclose(c, r, **f32_tol(n, np.abs(r).max()), err_msg=f"{what}: core vs float64")


def test_kernels_decline_outside_their_contract():
    x = jnp.asarray(data((4, 6, 4)))
    w, b = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)  # float32: the JAX run enables float64
    assert _jax_kernels.batch_norm(x, None, None, w.astype(jnp.float64), b, training=True, axis=2,
                                   momentum=0.1, eps=1e-3, mask=None, correction=1, allow_single_value=False,
                                   num_batches=None) is NotImplemented
    common = dict(momentum=0.1, eps=1e-3, mask=None, correction=1, allow_single_value=False, num_batches=None)
    assert _jax_kernels.batch_norm(x, None, None, w, b, training=True, axis=2, **common) is not NotImplemented
    assert _jax_kernels.batch_norm(x, None, None, w, b, training=False, axis=2, **common) is NotImplemented
    assert _jax_kernels.batch_norm(x, None, None, w, b, training=True, axis=1, **common) is NotImplemented
    assert _jax_kernels.batch_norm(x, None, None, w, b, training=True, axis=2,
                                   **{**common, "mask": jnp.ones((4, 6), bool)}) is NotImplemented
    assert _jax_kernels.batch_norm(x[:1, :1], None, None, w, b, training=True, axis=2, **common) is NotImplemented
    assert _jax_kernels.batch_norm(x, None, None, [1.0] * 4, b, training=True, axis=2, **common) is NotImplemented
    assert _jax_kernels.layer_norm(x, None, None, axis=(1,), eps=1e-3) is NotImplemented
    assert _jax_kernels.group_norm(x, 2, w, b, axis=1, eps=1e-3) is NotImplemented
    assert _jax_kernels.rms_norm(x, jnp.ones(3, jnp.float32), axis=(2,), eps=1e-6) is NotImplemented
    assert _jax_kernels.rms_norm(x.astype(jnp.float64), None, axis=(2,), eps=1e-6) is NotImplemented
