"""Bad input gets a clear error naming the argument, the expected and the received; never a silent NaN."""

import numpy as np
import pytest

import normkit as nk
from normkit.testing import reference


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((4, 3, 5)).astype("float32")


def test_axis_out_of_range(x):
    with pytest.raises(ValueError, match=r"axis=3 is out of range for an input of rank 3"):
        nk.batch_norm(x, training=True, axis=3)
    with pytest.raises(TypeError, match="axis must be an int"):
        nk.batch_norm(x, training=True, axis=1.0)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_wrong_feature_count_is_named(x, name):
    args = dict(running_mean=np.zeros(3, "float32"), running_var=np.ones(3, "float32"))
    args[name] = np.ones(4, "float32")
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\) \(one value per feature\), got shape \(4,\)"):
        nk.batch_norm(x, training=True, **args)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_and_boolean_input_refused(dtype):
    with pytest.raises(TypeError, match=rf"x must have a real floating dtype .* got {dtype}"):
        nk.batch_norm(np.ones((4, 3), dtype=dtype), training=True)


def test_rank_one_input_refused():
    with pytest.raises(ValueError, match=r"rank >= 2\), got shape \(5,\)"):
        nk.batch_norm(np.ones(5), training=True)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive_in_training(x, eps):
    with pytest.raises(ValueError, match="eps must be > 0"):
        nk.batch_norm(x, training=True, eps=eps)


def test_inference_needs_running_statistics(x):
    with pytest.raises(ValueError, match="running_mean and running_var; both are required"):
        nk.batch_norm(x, training=False)
    with pytest.raises(ValueError, match="given together"):
        nk.batch_norm(x, np.zeros(3, "float32"), training=True)


def test_two_libraries_mixed(x):
    import torch

    with pytest.raises(TypeError, match=r"weight is a torch.Tensor but x is a numpy.ndarray"):
        nk.batch_norm(x, weight=torch.ones(3), training=True)


def test_unknown_array_type():
    class NotAnArray:
        shape = (2, 3)
        dtype = "float32"

    with pytest.raises(TypeError, match="normkit has no array namespace for .*NotAnArray"):
        nk.batch_norm(NotAnArray(), training=True)


def test_python_scalars_and_sequences_are_accepted_as_parameters(x):
    out = nk.batch_norm(x, [0.0, 0.0, 0.0], 1.0, weight=2.0, bias=[0.0, 1.0, 2.0], training=True)
    ref = nk.batch_norm(x, np.zeros(3, "float32"), np.ones(3, "float32"),
                        np.full(3, 2.0, "float32"), np.array([0.0, 1.0, 2.0], "float32"), training=True)
    np.testing.assert_array_equal(out.output, ref.output)
    np.testing.assert_array_equal(out.running_var, ref.running_var)


def test_constant_feature_gives_zero_not_nan():
    x = np.ones((8, 3), "float32")
    out = nk.batch_norm(x, np.zeros(3, "float32"), np.ones(3, "float32"), training=True)
    assert np.isfinite(out.output).all() and (out.output == 0).all()
    assert np.isfinite(out.running_var).all()


@pytest.mark.parametrize("value,got", [([[1.0, 2.0], [3.0, 4.0]], "list"), ("abc", "str"), (None, "None"),
                                       (object(), "object"), (3.0, "float")])
@pytest.mark.parametrize("fn", ["standardize", "min_max_scale", "batch_norm", "layer_norm", "from_array"])
def test_x_that_is_not_an_array_is_named_with_its_type(value, got, fn):
    """3431f07 said "normkit needs at least one array; got only Python scalars or None" for all of these."""
    f = nk.Moments.from_array if fn == "from_array" else getattr(nk, fn)
    with pytest.raises(TypeError, match=rf"^x must be an array of numpy, torch, jax, .*; got {got}$"):
        f(value)


def test_x_that_is_not_an_array_is_named_even_with_xp_given():
    from array_api_compat import numpy as xp

    with pytest.raises(TypeError, match="x must be an array, got list"):
        nk.standardize([[1.0, 2.0]], xp=xp)


def test_numpy_masked_array_is_refused_with_the_ways_to_pass_its_mask():
    """3431f07 dropped a whole feature for one masked value, e746bf1 ignored the mask: both wrong statistics."""
    x = np.ma.masked_array(np.arange(12.0).reshape(4, 3), mask=np.zeros((4, 3), bool))
    x.mask[0, 0] = True
    for call in (lambda: nk.standardize(x), lambda: nk.Moments.from_array(x), lambda: nk.batch_norm(x, training=True),
                 lambda: nk.batch_norm(np.ones((4, 3)), weight=np.ma.ones(3), training=True)):
        with pytest.raises(TypeError, match=r"is a numpy masked array .*x.filled\(np.nan\).*x.data with mask=~x.mask"):
            call()
    # what the message proposes works, and uses the mask
    z = nk.standardize(x.filled(np.nan))
    np.testing.assert_allclose(z[1:, 0], reference.standardize(x.data[1:, :1])[:, 0])
    out = nk.batch_norm(x.data, np.zeros(3), np.ones(3), training=True, mask=~x.mask, momentum=1.0)
    np.testing.assert_allclose(out.running_mean, [x.data[1:, 0].mean(), x.data[:, 1].mean(), x.data[:, 2].mean()])


def test_numpy_matrix_is_refused():
    """3431f07: TypeError: matrix.mean() got an unexpected keyword argument 'keepdims'."""
    with pytest.raises(TypeError, match=r"x is a np.matrix, .* pass np.asarray\(x\)"):
        nk.standardize(np.matrix(np.arange(12.0).reshape(4, 3)))
    with pytest.raises(TypeError, match=r"weight is a np.matrix"):
        nk.batch_norm(np.ones((4, 3)), weight=np.matrix(np.ones(3)), training=True)
