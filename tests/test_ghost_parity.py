"""Ghost batch norm: normkit_torch and normkit_keras agree step for step on the same data, in float64.

``normkit_torch.BatchNorm2d(virtual_batch_size=V)`` on NCHW and ``normkit_keras.BatchNormalization(
virtual_batch_size=V)`` on the same data in NHWC, Keras's momentum mapped to torch's direction
(``1 - momentum``), same epsilon, gamma and beta: the outputs and the gradients (input, gamma, beta)
agree, and so do the moving statistics, up to each framework's variance convention: torch folds
the unbiased whole-batch variance, Keras the biased one, so after k steps from the same start v0,
``running_var - m**k v0 == n / (n - 1) * (moving_variance - m**k v0)`` with n values per feature
(m = Keras's momentum). Keras runs on TensorFlow (the core test process's backend).

Tolerance: the same float64 formulas in a different order, values of order 1-10: rtol 1e-11 /
atol 1e-12 is over 100x the round-off (a few 1e-16 per step).
"""

from __future__ import annotations

import numpy as np
import pytest

from frameworks import NOT_TENSORFLOW, TENSORFLOW, float64, nkk, nkt, torch  # noqa: F401  (float64: a fixture)

if not TENSORFLOW:  # pragma: no cover - the core process runs TensorFlow
    pytest.skip(NOT_TENSORFLOW, allow_module_level=True)

import tensorflow as tf  # noqa: E402

TOL = dict(rtol=1e-11, atol=1e-12)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1)


@pytest.mark.usefixtures("float64")
def test_torch_and_keras_ghost_batch_norm_agree():
    n, c, h, w, v, k_momentum, eps = 6, 3, 4, 5, 2, 0.7, 1e-3
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    layer = nkk.BatchNormalization(virtual_batch_size=v, momentum=k_momentum, epsilon=eps)
    layer.build((None, h, w, c))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    module = nkt.BatchNorm2d(c, virtual_batch_size=v, momentum=1 - k_momentum, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
        module.bias.copy_(torch.from_numpy(beta))
    steps = 3
    for _ in range(steps):
        x = rng.standard_normal((n, c, h, w)) * 3 + rng.uniform(-5, 5, (n, 1, 1, 1))  # each sample its offset
        up = rng.standard_normal((n, c, h, w))
        xk = tf.constant(nhwc(x))
        with tf.GradientTape() as tape:
            tape.watch(xk)
            y_keras = layer(xk, training=True)
            loss = tf.reduce_sum(y_keras * tf.constant(nhwc(up)))
        dx_keras, dgamma, dbeta = tape.gradient(loss, [xk, layer.gamma.value, layer.beta.value])
        xt = torch.from_numpy(x).requires_grad_()
        y = module(xt)
        (y * torch.from_numpy(up)).sum().backward()
        np.testing.assert_allclose(nhwc(y.detach().numpy()), y_keras.numpy(), **TOL)
        np.testing.assert_allclose(nhwc(xt.grad.numpy()), dx_keras.numpy(), **TOL)
        np.testing.assert_allclose(module.weight.grad.numpy(), dgamma.numpy(), **TOL)
        np.testing.assert_allclose(module.bias.grad.numpy(), dbeta.numpy(), **TOL)
        module.weight.grad = module.bias.grad = None
    np.testing.assert_allclose(module.running_mean.numpy(), layer.moving_mean.numpy(), **TOL)
    start = k_momentum**steps * 1.0  # both start from variance 1
    per_feature = n * h * w
    np.testing.assert_allclose(module.running_var.numpy() - start,
                               per_feature / (per_feature - 1) * (layer.moving_variance.numpy() - start), **TOL)
