"""normkit_torch.BatchRenorm* equals keras.layers.BatchNormalization(renorm=True) step for step, in float64.

Same data (NCHW for torch, NHWC for Keras), same gamma/beta, Keras's momenta mapped to torch's
direction (``momentum = 1 - keras_momentum``, ``renorm_momentum = 1 - keras_renorm_momentum``);
over several training steps the outputs, the gradients (input, gamma, beta) and every statistic
(moving_mean/variance/stddev, renorm_mean/stddev <-> running_mean/var/std, renorm_mean/std) agree,
then the inference outputs. Keras computes BatchNormalization in float64 only on TensorFlow (on
jax and torch its ``result_type(x, "float32")`` gives float32), so this runs on TensorFlow, the
core test process's Keras backend.

Tolerance: both compute the same float64 formulas in a different order; each step adds a few
roundings (1.1e-16 relative) on values of order 1..100, and the EMAs carry them along: rtol 1e-11
and atol 1e-12 leave over 100x margin over the measured 2e-15.
"""

from __future__ import annotations

import numpy as np
import pytest

from frameworks import NOT_TENSORFLOW, TENSORFLOW, float64, keras, nkt, torch  # noqa: F401  (float64: a fixture)

if not TENSORFLOW:  # pragma: no cover - the core process runs TensorFlow
    pytest.skip(NOT_TENSORFLOW, allow_module_level=True)

import tensorflow as tf  # noqa: E402

TOL = dict(rtol=1e-11, atol=1e-12)
STATS = [("moving_mean", "running_mean"), ("moving_variance", "running_var"), ("moving_stddev", "running_std"),
         ("renorm_mean", "renorm_mean"), ("renorm_stddev", "renorm_std")]
CASES = {
    "clipped": dict(clipping={"rmax": 1.4, "rmin": 0.75, "dmax": 0.5}, affine=True, shape=(6, 4, 5, 3)),
    "unclipped": dict(clipping={}, affine=True, shape=(6, 4, 5, 3)),
    "rmax-only-no-affine-1d": dict(clipping={"rmax": 1.2}, affine=False, shape=(16, 3)),
}


def channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, 1) if a.ndim > 2 else a


def channels_last(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if a.ndim > 2 else a


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.usefixtures("float64")
def test_batch_renorm_equals_keras_renorm(case):
    spec = CASES[case]
    c, eps, k_momentum, k_renorm_momentum = spec["shape"][-1], 1e-3, 0.9, 0.7
    rng = np.random.default_rng(0)
    layer = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=dict(spec["clipping"]), momentum=k_momentum, renorm_momentum=k_renorm_momentum,
        epsilon=eps, center=spec["affine"], scale=spec["affine"],
    )
    layer.build((None,) + spec["shape"][1:])
    module = {2: nkt.BatchRenorm1d, 4: nkt.BatchRenorm2d}[len(spec["shape"])](
        c, eps=eps, momentum=1 - k_momentum, renorm_momentum=1 - k_renorm_momentum, affine=spec["affine"],
        dtype=torch.float64, **spec["clipping"],
    )
    if spec["affine"]:
        gamma, beta = 1 + rng.normal(size=c), rng.normal(size=c)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gamma))
            module.bias.copy_(torch.from_numpy(beta))
    r_outside = False
    for step in range(5):
        x = rng.normal(size=spec["shape"]) * (1 + step) + 2.0 * step
        upstream = rng.normal(size=spec["shape"])
        # keras: would r have left [rmin, rmax] unclipped? (then clipping is what is being compared)
        var_b = x.reshape(-1, c).var(0)
        r = np.sqrt(var_b + eps) / np.maximum(layer.renorm_stddev.numpy(), np.sqrt(eps))
        r_outside |= bool(np.any(r > spec["clipping"].get("rmax", np.inf)) or np.any(r < spec["clipping"].get("rmin", -np.inf)))
        xk = tf.constant(x)
        weights = [layer.gamma, layer.beta] if spec["affine"] else []
        with tf.GradientTape() as tape:
            tape.watch(xk)
            yk = layer(xk, training=True)
            loss_k = tf.reduce_sum(yk * upstream)
        grads_k = tape.gradient(loss_k, [xk] + weights)
        xt = torch.tensor(channels_first(x), requires_grad=True)
        yt = module(xt)
        (yt * torch.from_numpy(channels_first(upstream))).sum().backward()
        np.testing.assert_allclose(channels_last(yt.detach().numpy()), yk.numpy(), **TOL, err_msg=f"output, step {step}")
        np.testing.assert_allclose(channels_last(xt.grad.numpy()), grads_k[0].numpy(), **TOL, err_msg="input gradient")
        if spec["affine"]:
            np.testing.assert_allclose(module.weight.grad.numpy(), grads_k[1].numpy(), **TOL, err_msg="gamma gradient")
            np.testing.assert_allclose(module.bias.grad.numpy(), grads_k[2].numpy(), **TOL, err_msg="beta gradient")
            module.zero_grad()
        for k_name, t_name in STATS:
            np.testing.assert_allclose(getattr(module, t_name).numpy(), getattr(layer, k_name).numpy(), **TOL,
                                       err_msg=f"{t_name} vs {k_name}, step {step}")
    if spec["clipping"]:
        assert r_outside  # the data drove r past a bound: clipping is exercised
    module.eval()
    x = rng.normal(size=spec["shape"]) * 3 + 4
    np.testing.assert_allclose(channels_last(module(torch.from_numpy(channels_first(x))).detach().numpy()),
                               layer(x, training=False).numpy(), **TOL, err_msg="inference")
