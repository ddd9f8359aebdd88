"""The float64 reference gradients (used where a native layer cannot judge) agree with torch autograd."""

import numpy as np
import torch
import torch.nn.functional as F

from normkit.testing import reference

RNG = np.random.default_rng(0)


def _t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def _close(got, want):
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_batch_and_layer_norm_gradients():
    x, dy, w = RNG.standard_normal((4, 3, 5)), RNG.standard_normal((4, 3, 5)), RNG.uniform(0.5, 1.5, 3)
    xt, wt, bt = _t(x), _t(w), _t(np.zeros(3))
    (F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-3) * torch.tensor(dy)).sum().backward()
    got = reference.batch_norm_grad(x, dy, w, axis=1, eps=1e-3)
    for g, t in zip(got, (xt.grad, wt.grad, bt.grad)):
        _close(g, t)
    w2 = RNG.uniform(0.5, 1.5, (3, 5))
    xt, wt, bt = _t(x), _t(w2), _t(np.zeros((3, 5)))
    (F.layer_norm(xt, (3, 5), wt, bt, eps=1e-3) * torch.tensor(dy)).sum().backward()
    got = reference.layer_norm_grad(x, dy, w2, axis=(1, 2), eps=1e-3)
    for g, t in zip(got, (xt.grad, wt.grad, bt.grad)):
        _close(g, t)


def test_group_and_rms_norm_gradients():
    x, dy = RNG.standard_normal((2, 6, 4, 3)), RNG.standard_normal((2, 6, 4, 3))
    w = RNG.uniform(0.5, 1.5, 6)
    xt, wt, bt = _t(x), _t(w), _t(np.zeros(6))
    (F.group_norm(xt, 3, wt, bt, eps=1e-3) * torch.tensor(dy)).sum().backward()
    got = reference.group_norm_grad(x, dy, 3, w, axis=1, eps=1e-3)
    for g, t in zip(got, (xt.grad, wt.grad, bt.grad)):
        _close(g, t)
    # channels-last group norm is the same math with the channel axis moved
    got_last = reference.group_norm_grad(np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1), 3, w, axis=-1, eps=1e-3)
    np.testing.assert_allclose(np.moveaxis(got_last[0], -1, 1), got[0], rtol=1e-12, atol=1e-14)
    w3 = RNG.uniform(0.5, 1.5, 3)
    xt, wt = _t(x), _t(w3)
    (F.rms_norm(xt, (3,), wt, eps=1e-6) * torch.tensor(dy)).sum().backward()
    got = reference.rms_norm_grad(x, dy, w3, axis=-1, eps=1e-6)
    for g, t in zip(got, (xt.grad, wt.grad)):
        _close(g, t)
