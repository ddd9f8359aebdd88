"""Ghost batch norm, ``normkit.batch_norm(virtual_batch_size=V)``, across the array matrix against the float64 reference.

``reference.ghost_batch_norm`` is the definition written plainly: a loop over the virtual batches,
each batch-normalized alone, and one running update with the whole batch's statistics. Tolerances
are the plain matrix's (tests/test_batch_norm.py): float32 sums of at most 60 values of order 1-10
err by ~sqrt(60) * 6e-8 * 10 = 5e-6; float64 by 1e-14, under 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference

# (id, shape, feature axis, virtual batch size): dense, convolutional, channels-last
LAYOUTS = [
    ("dense", (12, 5), 1, 4),
    ("conv2d", (8, 3, 4, 5), 1, 2),
    ("channels_last", (6, 4, 5, 3), -1, 3),
]
TOL = {"float32": dict(rtol=1e-5, atol=2e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    # each virtual batch gets its own offset, so a wrong grouping or a plain batch norm is far off
    offsets = np.repeat(rng.uniform(-5, 5, shape[0] // 2 + 1), 2)[: shape[0]]
    x = rng.standard_normal(shape) * 3.0 + offsets.reshape((-1,) + (1,) * (len(shape) - 1))
    params = (rng.standard_normal(c), rng.uniform(0.5, 2.0, c), rng.uniform(0.5, 1.5, c), rng.standard_normal(c))
    return (x.astype(dtype), *(p.astype(dtype) for p in params))


def _ghost(backend, x, *state, **kwargs):
    args = tuple(None if a is None else backend.asarray(a) for a in (x, *state))
    return backend.call(nk.batch_norm, args, dict(training=True, **kwargs))


# each layout in float64 (tight), and float32 where a plugin kernel could answer plain batch norm
COMBOS = [(lay, dtype) for lay in LAYOUTS for dtype in ("float64", "float32") if dtype == "float64" or lay[0] != "conv2d"]


@pytest.mark.parametrize("layout,dtype", COMBOS, ids=[f"{lay[0]}-{dtype}" for lay, dtype in COMBOS])
def test_ghost_matrix(backend, dtype, layout):
    _, shape, axis, v = layout
    x, rm, rv, w, b = _data(shape, axis, dtype)
    before = [a.copy() for a in (x, rm, rv, w, b)]
    out = _ghost(backend, x, rm, rv, w, b, momentum=0.2, eps=1e-3, axis=axis, virtual_batch_size=v)
    want = reference.ghost_batch_norm(x, rm, rv, w, b, virtual_batch_size=v, momentum=0.2, eps=1e-3, axis=axis)
    y = backend.to_numpy(out.output)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert nk.array_namespace(("y", out.output)) is nk.array_namespace(("x", backend.asarray(x)))  # same library
    np.testing.assert_allclose(y, want[0], **TOL[dtype])
    np.testing.assert_allclose(backend.to_numpy(out.running_mean), want[1], **TOL[dtype])
    np.testing.assert_allclose(backend.to_numpy(out.running_var), want[2], **TOL[dtype])
    for a, a0 in zip((x, rm, rv, w, b), before):
        np.testing.assert_array_equal(a, a0)
    # the running update is the whole batch's, not the mean of the virtual batches' variances (Keras 2's)
    plain = reference.batch_norm(x, rm, rv, training=True, momentum=0.2, axis=axis)
    np.testing.assert_allclose(want[2], plain[2], rtol=1e-12)


def test_ghost_without_running_stats_and_with_a_mask(backend):
    x, rm, rv, w, b = _data((8, 3, 4), 1, "float64", seed=1)
    out = _ghost(backend, x, None, None, w, None, virtual_batch_size=2)
    assert out.running_mean is None and out.running_var is None
    np.testing.assert_allclose(backend.to_numpy(out.output),
                               reference.ghost_batch_norm(x, weight=w, virtual_batch_size=2)[0], **TOL["float64"])
    mask = np.random.default_rng(2).uniform(size=(8, 4)) > 0.3
    mask[:, 0] = True  # every virtual batch counts values in every feature
    out = _ghost(backend, x, rm, rv, w, b, virtual_batch_size=4, mask=backend.asarray(mask), correction=0)
    want = reference.ghost_batch_norm(x, rm, rv, w, b, virtual_batch_size=4, mask=mask, correction=0)
    for got, exp in zip(out, want):
        np.testing.assert_allclose(backend.to_numpy(got), exp, **TOL["float64"])


def test_one_virtual_batch_is_plain_batch_norm(backend):
    """virtual_batch_size == batch size: bit for bit plain batch norm where the batch size is known when called
    (the same path, kernels included); inside tf.function the batch is unknown, the ghost path runs: round-off."""
    x, rm, rv, w, b = _data((8, 3, 4), 1, "float32")
    ghost = _ghost(backend, x, rm, rv, w, b, virtual_batch_size=8)
    plain = _ghost(backend, x, rm, rv, w, b)
    for g, p in zip(ghost, plain):
        if backend.name == "tensorflow-function":
            np.testing.assert_allclose(backend.to_numpy(g), backend.to_numpy(p), **TOL["float32"])
        else:
            np.testing.assert_array_equal(backend.to_numpy(g), backend.to_numpy(p))


def test_inference_ignores_virtual_batches():
    """Inference does not split the batch (as Keras 2): any batch size, running statistics only."""
    x, rm, rv, w, b = _data((7, 3), 1, "float64")
    got = nk.batch_norm(x, rm, rv, w, b, training=False, virtual_batch_size=4)
    want = nk.batch_norm(x, rm, rv, w, b, training=False)
    np.testing.assert_array_equal(got.output, want.output)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(virtual_batch_size=5), ValueError, r"virtual_batch_size=5 must divide the batch size .* batch of 12 samples"),
    (dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be a positive int .* got 0"),
    (dict(virtual_batch_size=2.0), TypeError, "virtual_batch_size must be an int .* got float 2.0"),
    (dict(virtual_batch_size=True), TypeError, "virtual_batch_size must be an int .* got bool"),
    (dict(virtual_batch_size=4, axis=0), ValueError, "feature axis cannot be 0"),
    (dict(virtual_batch_size=1), ValueError, r"more than 1 value per channel .* virtual batch of 1"),
])
def test_bad_virtual_batch_size(kwargs, error, match):
    x = np.ones((12, 3))
    with pytest.raises(error, match=match):
        nk.batch_norm(x, np.zeros(3), np.ones(3), training=True, **kwargs)


def test_single_value_virtual_batches_allowed_give_bias():
    """Keras's rule for one value per feature (allow_single_value): the output is beta; the running statistics still
    take the whole batch's."""
    x, rm, rv, w, b = _data((6, 3), 1, "float64")
    out = nk.batch_norm(x, rm, rv, w, b, training=True, virtual_batch_size=1, allow_single_value=True, correction=0)
    np.testing.assert_array_equal(out.output, np.broadcast_to(b, x.shape))
    np.testing.assert_allclose(out.running_var, reference.batch_norm(x, rm, rv, training=True, correction=0)[2],
                               **TOL["float64"])


def test_half_precision_is_reduced_in_float32():
    x, rm, rv, w, b = _data((8, 4, 5), 1, "float32")
    x16 = (x * 10 + 300).astype(np.float16)
    out = nk.batch_norm(x16, rm, rv, w, b, training=True, virtual_batch_size=4)
    assert out.output.dtype == np.float16 and out.running_mean.dtype == np.float32
    want = reference.ghost_batch_norm(x16, rm, rv, w, b, virtual_batch_size=4)
    np.testing.assert_allclose(out.output.astype(np.float64), want[0], rtol=1e-2, atol=4e-3)  # float16 output
    np.testing.assert_allclose(out.running_mean, want[1], rtol=1e-5)


def test_kernels_get_virtual_batch_size_only_when_it_splits_a_training_batch(monkeypatch):
    import normkit._batch_norm as bn

    calls = []
    monkeypatch.setattr(bn, "call_kernel", lambda *a, **k: calls.append(k.get("virtual_batch_size")) or NotImplemented)
    x = np.ones((8, 3)) + np.arange(8)[:, None]
    nk.batch_norm(x, training=True, virtual_batch_size=4)
    nk.batch_norm(x, training=True, virtual_batch_size=8)
    nk.batch_norm(x, np.zeros(3), np.ones(3), training=False, virtual_batch_size=4)
    assert calls == [4, None, None]
