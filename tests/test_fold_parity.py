"""fold_batch_norm in torch and in Keras agree: the same conv/dense + batch-norm weights fold to the same layer.

torch ``Conv2d`` weight ``(out, in/groups, kh, kw)`` is Keras ``Conv2D`` kernel ``(kh, kw, in/groups, out)``;
a depthwise ``Conv2d(groups=in, out=in*m)`` output channel ``i*m + j`` is Keras ``DepthwiseConv2D``
kernel ``[..., i, j]``; ``Linear`` weight ``(out, in)`` is ``Dense`` kernel ``(in, out)``. Both fold in
float64 (torch in float64 math, Keras in float64 NumPy): the folded weights agree to a few
roundings of ``w * gamma / sqrt(var + eps)``, rtol 1e-13.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from frameworks import float64, keras, nkk, nkt, torch  # noqa: F401  (float64: a fixture)

TOL = dict(rtol=1e-13, atol=1e-15)


def bn_values(c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gamma": 1 + rng.normal(size=c), "beta": rng.normal(size=c), "mean": rng.normal(size=c),
            "var": rng.uniform(0.3, 2.0, size=c)}


def torch_bn(c: int, v: dict) -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(c, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(v["gamma"]))
        bn.bias.copy_(torch.from_numpy(v["beta"]))
        bn.running_mean.copy_(torch.from_numpy(v["mean"]))
        bn.running_var.copy_(torch.from_numpy(v["var"]))
    return bn.eval()


def fold_torch(layer: torch.nn.Module, bn: torch.nn.Module, example_inputs: Any = None) -> torch.nn.Module:
    """The folded layer; a Linear needs ``example_inputs`` (its output must be proved 2-D to fold)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return nkt.fold_batch_norm(torch.nn.Sequential(layer, bn), example_inputs=example_inputs)[0]


def fold_keras(layer: keras.layers.Layer, v: dict, input_shape: tuple) -> keras.layers.Layer:
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, bn(layer(inputs)))
    for name, key in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "mean"), ("moving_variance", "var")):
        getattr(bn, name).assign(v[key])
    with warnings.catch_warnings():
        warnings.simplefilter("error", nkk.UnfoldedBatchNormWarning)
        folded = nkk.fold_batch_norm(model)
    (out,) = [l for l in folded.layers if not isinstance(l, keras.layers.InputLayer)]
    return out


@pytest.mark.usefixtures("float64")
def test_conv2d_folds_the_same():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4, 3, 3))  # torch layout
    b = rng.normal(size=6)
    v = bn_values(6, 1)
    conv_t = torch.nn.Conv2d(4, 6, 3, dtype=torch.float64)
    with torch.no_grad():
        conv_t.weight.copy_(torch.from_numpy(w))
        conv_t.bias.copy_(torch.from_numpy(b))
    conv_k = keras.layers.Conv2D(6, 3)
    conv_k.build((None, 8, 8, 4))
    conv_k.kernel.assign(w.transpose(2, 3, 1, 0))
    conv_k.bias.assign(b)
    ft, fk = fold_torch(conv_t, torch_bn(6, v)), fold_keras(conv_k, v, (8, 8, 4))
    np.testing.assert_allclose(fk.kernel.numpy(), ft.weight.detach().numpy().transpose(2, 3, 1, 0), **TOL)
    np.testing.assert_allclose(fk.bias.numpy(), ft.bias.detach().numpy(), **TOL)


@pytest.mark.usefixtures("float64")
def test_depthwise_folds_the_same():
    rng = np.random.default_rng(2)
    cin, m = 3, 2
    w = rng.normal(size=(cin * m, 1, 3, 3))
    v = bn_values(cin * m, 3)
    conv_t = torch.nn.Conv2d(cin, cin * m, 3, groups=cin, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv_t.weight.copy_(torch.from_numpy(w))
    conv_k = keras.layers.DepthwiseConv2D(3, depth_multiplier=m, use_bias=False)
    conv_k.build((None, 8, 8, cin))
    conv_k.kernel.assign(w.reshape(cin, m, 3, 3).transpose(2, 3, 0, 1))
    ft, fk = fold_torch(conv_t, torch_bn(cin * m, v)), fold_keras(conv_k, v, (8, 8, cin))
    np.testing.assert_allclose(fk.kernel.numpy(), ft.weight.detach().numpy().reshape(cin, m, 3, 3).transpose(2, 3, 0, 1), **TOL)
    np.testing.assert_allclose(fk.bias.numpy(), ft.bias.detach().numpy(), **TOL)


@pytest.mark.usefixtures("float64")
def test_dense_folds_the_same():
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(5, 7)), rng.normal(size=5)
    v = bn_values(5, 5)
    lin = torch.nn.Linear(7, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    bn = torch.nn.BatchNorm1d(5, eps=1e-3, dtype=torch.float64)
    bn.load_state_dict(torch_bn(5, v).state_dict())
    dense = keras.layers.Dense(5)
    dense.build((None, 7))
    dense.kernel.assign(w.T)
    dense.bias.assign(b)
    ft, fk = fold_torch(lin, bn.eval(), torch.zeros(2, 7, dtype=torch.float64)), fold_keras(dense, v, (7,))
    np.testing.assert_allclose(fk.kernel.numpy(), ft.weight.detach().numpy().T, **TOL)
    np.testing.assert_allclose(fk.bias.numpy(), ft.bias.detach().numpy(), **TOL)
