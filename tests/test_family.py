"""layer, group, instance and RMS normalization across the matrix, against the float64 reference."""

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference

TOL = {"float32": dict(rtol=1e-5, atol=2e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def _x(shape, dtype, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 3).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((2, 5, 6), -1), ((2, 3, 4, 5), (1, 2, 3)), ((2, 3, 4, 5), (-2, -1))])
def test_layer_norm(backend, dtype, shape, axis):
    x = _x(shape, dtype)
    pshape = tuple(shape[a] for a in np.atleast_1d(axis))
    w = _x(pshape, dtype, 1)
    b = _x(pshape, dtype, 2)
    y = backend.call(nk.layer_norm, (backend.asarray(x), backend.asarray(w), backend.asarray(b)), dict(axis=axis))
    np.testing.assert_allclose(backend.to_numpy(y), reference.layer_norm(x, w, b, axis=axis), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis,groups", [((2, 6, 5), 1, 3), ((2, 4, 3, 3), 1, 2), ((2, 3, 3, 6), -1, 6), ((3, 4), 1, 1)])
def test_group_norm(backend, dtype, shape, axis, groups):
    x = _x(shape, dtype)
    c = shape[axis]
    w, b = _x((c,), dtype, 1), _x((c,), dtype, 2)
    y = backend.call(nk.group_norm, (backend.asarray(x), groups, backend.asarray(w), backend.asarray(b)), dict(axis=axis))
    np.testing.assert_allclose(backend.to_numpy(y), reference.group_norm(x, groups, w, b, axis=axis), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((2, 3, 7), 1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1)])
def test_instance_norm_and_running_stats(backend, dtype, shape, axis):
    x = _x(shape, dtype)
    c = shape[axis]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    out = backend.call(nk.instance_norm, (backend.asarray(x), backend.asarray(rm), backend.asarray(rv)),
                       dict(axis=axis, momentum=0.1))
    np.testing.assert_allclose(backend.to_numpy(out.output), reference.instance_norm(x, axis=axis), **TOL[dtype])
    f = axis % x.ndim
    spatial = tuple(i for i in range(1, x.ndim) if i != f)
    per_instance_mean = x.astype(np.float64).mean(axis=spatial)
    per_instance_var = x.astype(np.float64).var(axis=spatial, ddof=1)
    np.testing.assert_allclose(backend.to_numpy(out.running_mean), 0.1 * per_instance_mean.mean(0), **TOL[dtype])
    np.testing.assert_allclose(backend.to_numpy(out.running_var), 0.9 + 0.1 * per_instance_var.mean(0), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((2, 5, 6), (-2, -1))])
def test_rms_norm(backend, dtype, shape, axis):
    x = _x(shape, dtype)
    pshape = tuple(shape[a] for a in np.atleast_1d(axis))
    w = _x(pshape, dtype, 1)
    y = backend.call(nk.rms_norm, (backend.asarray(x), backend.asarray(w)), dict(axis=axis, eps=1e-6))
    np.testing.assert_allclose(backend.to_numpy(y), reference.rms_norm(x, w, axis=axis, eps=1e-6), **TOL[dtype])


def test_rms_norm_default_eps_is_machine_epsilon():
    x = np.full((2, 3), 1e-5, "float32")
    y = nk.rms_norm(x)
    np.testing.assert_allclose(y, reference.rms_norm(x, eps=float(np.finfo(np.float32).eps)), rtol=1e-5)


def test_family_errors():
    x = np.ones((2, 6, 3))
    with pytest.raises(ValueError, match="num_groups=4 must divide the number of channels, got 6"):
        nk.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nk.layer_norm(x, np.ones(4))
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        nk.instance_norm(np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        nk.layer_norm(x, eps=-1e-5)
    with pytest.raises(ValueError, match="eps must be a non-negative number, got nan"):
        nk.group_norm(x, 3, eps=float("nan"))
    with pytest.raises(TypeError, match="eps must be a non-negative number, got str '1e-5'"):
        nk.rms_norm(x, eps="1e-5")


def test_family_accepts_eps_zero_as_torch_does():
    """torch.nn.LayerNorm/GroupNorm/InstanceNorm/RMSNorm take eps=0; so does the core."""
    x = np.random.default_rng(0).standard_normal((2, 6, 3))
    np.testing.assert_allclose(nk.layer_norm(x, eps=0.0), reference.layer_norm(x, eps=0.0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nk.group_norm(x, 3, eps=0.0), reference.group_norm(x, 3, eps=0.0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nk.rms_norm(x, eps=0.0), reference.rms_norm(x, eps=0.0), rtol=1e-10, atol=1e-12)
