"""normkit_keras.get_state / set_state / from_state / copy_norm_states on normkit's and keras.layers' layers,
and whole-model copies to and from torch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import normkit_keras as nkk
from normkit import NormState

# torch and normkit_torch are imported inside the tests that port to or from torch: imported at collection,
# torch would make every Keras test's gc.collect (the conftest's clear_session) about 30% slower.

# (class name, constructor kwargs, build shape, expected kind, feature axis or normalized axes)
LAYERS = [
    ("BatchNormalization", {}, (None, 5, 6, 3), "batch", -1),
    ("BatchNormalization", {"axis": 1, "momentum": 0.9, "epsilon": 1e-5}, (None, 3, 7), "batch", 1),
    ("BatchNormalization", {"axis": 3, "center": False}, (None, 5, 6, 3), "batch", -1),
    ("BatchNormalization", {"scale": False, "center": False}, (None, 4), "batch", 1),
    ("LayerNormalization", {}, (None, 6, 5), "layer", (-1,)),
    ("LayerNormalization", {"axis": [1, 2], "center": False}, (None, 5, 6, 3), "layer", (-3, -2)),
    ("GroupNormalization", {"groups": 2}, (None, 5, 6, 4), "group", -1),
    ("GroupNormalization", {"groups": 3, "axis": 1, "scale": False}, (None, 6, 5), "group", 1),
    ("GroupNormalization", {"groups": -1}, (None, 7, 3), "instance", -1),
    ("RMSNormalization", {"epsilon": 1e-5}, (None, 4, 6), "rms", (-1,)),
]
IDS = [f"{name}-{kwargs}" for name, kwargs, *_ in LAYERS]


def randomized(module, name, kwargs, shape, dtype="float32"):
    layer = getattr(module, name)(dtype=dtype, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(0)
    for v in layer.weights:
        base = 1.0 if v.path.split("/")[-1] in ("gamma", "scale", "moving_variance") else 0.0
        value = base + (np.abs if "variance" in v.path else np.asarray)(0.5 * rng.standard_normal(v.shape))
        v.assign(value.astype(dtype))
    return layer


def numpy(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_get_state_reads_every_field():
    # one test over every layer (each Keras test pays the conftest's clear_session): ids in the messages
    for (name, kwargs, shape, kind, axes), id in zip(LAYERS, IDS):
        for native in (False, True):
            check_get_state(name, kwargs, shape, kind, axes, native, f"{id} native={native}")


def check_get_state(name, kwargs, shape, kind, axes, native, id):
    layer = randomized(keras.layers if native else nkk, name, kwargs, shape)
    s = nkk.get_state(layer)
    assert s.kind == kind and s.input_rank == len(shape) and s.dtype == "float32", id
    assert s.source == ("keras.layers." if native else "normkit_keras.") + name, id
    weight = layer.scale if kind == "rms" else layer.gamma
    assert (s.weight is None) == (weight is None) and (weight is None or bitwise(s.weight, numpy(weight))), id
    beta = getattr(layer, "beta", None)
    assert (s.bias is None) == (beta is None) and (beta is None or bitwise(s.bias, numpy(beta))), id
    assert s.eps == layer.epsilon, id
    if kind == "batch":
        assert bitwise(s.running_mean, numpy(layer.moving_mean)), id
        assert bitwise(s.running_var, numpy(layer.moving_variance)), id
        assert s.momentum == NormState.complement(layer.momentum) and s.running_var_correction == 0, id
        assert s.num_batches_tracked is None, id  # Keras does not count batches
    else:
        assert not s.track_running_stats and s.momentum is None, id
    if kind in ("batch", "group", "instance"):
        assert s.feature_axis == axes and s.normalized_axes is None, id
    else:
        assert s.normalized_axes == axes, id
    assert s.num_groups == (kwargs["groups"] if kind == "group" else None), id


def test_from_state_round_trips_exactly():
    seen = set()
    for (name, kwargs, shape, _, _), id in zip(LAYERS, IDS):
        for native in (False, True):
            # outputs compared once per class: each new shape costs a JAX compilation (~0.5 s)
            outputs = not native and name not in seen
            seen.add(name)
            check_round_trip(name, kwargs, shape, native, f"{id} native={native}", outputs)


def check_round_trip(name, kwargs, shape, native, id, outputs):
    layer = randomized(keras.layers if native else nkk, name, kwargs, shape)
    s = nkk.get_state(layer)
    again = nkk.from_state(s)
    assert type(again) is getattr(nkk, name) and again.built, id
    assert nkk.get_state(again) == s, id
    assert [numpy(v).tobytes() for v in again.weights] == [numpy(v).tobytes() for v in layer.weights], id
    config = again.get_config()
    for key, value in kwargs.items():
        if key not in ("axis", "groups"):  # the axis comes back in its canonical form (3 -> -1), groups -1 as C
            assert config[key] == value, (id, key)
    if not outputs:
        return
    # the normkit twin built by hand with the same config and weights computes bit for bit the same
    twin = getattr(nkk, name)(**kwargs)
    twin.build(shape)
    twin.set_weights(layer.get_weights())
    x = np.random.default_rng(1).standard_normal((2,) + shape[1:]).astype("float32")
    assert bitwise(numpy(again(x, training=False)), numpy(twin(x, training=False))), id


def test_unbuilt_renorm_and_rms_scaling_are_refused():
    with pytest.raises(ValueError, match="is not built: call layer.build"):
        nkk.get_state(keras.layers.BatchNormalization())
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, 3))
    with pytest.raises(ValueError, match="renorm=True"):
        nkk.get_state(renorm)
    with pytest.raises(TypeError, match="expected a Keras normalization layer .* got Dense"):
        nkk.get_state(keras.layers.Dense(2))


def torch_modules():
    """torch and normkit_torch, imported on first use (see the note at the imports)."""
    import torch

    import normkit_torch

    return torch, normkit_torch


def torch_bn_state(**kwargs):
    torch, nkt = torch_modules()
    m = torch.nn.BatchNorm2d(3, **kwargs)
    with torch.no_grad():
        m(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1)
        m(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 1)
    return nkt.get_state(m)


def test_set_state_translates_momentum_and_keeps_eps():
    s = torch_bn_state(momentum=0.1, eps=1e-5)
    layer = keras.layers.BatchNormalization()  # Keras's momentum 0.99, epsilon 1e-3
    layer.build((None, 4, 4, 3))
    nkk.set_state(layer, s)
    assert layer.momentum == 0.9 and layer.epsilon == 1e-5
    assert bitwise(numpy(layer.moving_variance), s.running_var)  # the population-variance estimate, unchanged
    assert layer.get_config()["momentum"] == 0.9 and layer.get_config()["epsilon"] == 1e-5


def test_batch_count_is_remembered_until_the_statistics_move():
    s = torch_bn_state()
    assert s.num_batches_tracked == 2
    layer = nkk.from_state(s, layout="channels_last")
    assert nkk.get_state(layer).num_batches_tracked == 2
    layer(np.ones((2, 4, 4, 3), "float32"), training=False)
    assert nkk.get_state(layer).num_batches_tracked == 2  # inference moves nothing
    layer(np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype("float32"), training=True)
    assert nkk.get_state(layer).num_batches_tracked is None  # Keras trained on: the count is no longer known


REFUSED = [  # (a state Keras cannot hold, the reason given)
    (dict(track_running_stats=False), "Keras's BatchNormalization always uses its moving statistics"),
    (dict(momentum=None), "momentum is None .*cumulative average"),
    ("instance", "no instance normalization with running statistics"),
]


def test_what_keras_cannot_hold_is_refused_and_nothing_is_written():
    layer = randomized(nkk, "BatchNormalization", {}, (None, 4, 4, 3))
    instance = randomized(nkk, "GroupNormalization", {"groups": -1}, (None, 4, 4, 3))
    before = [numpy(v).copy() for v in layer.weights + instance.weights]
    for how, message in REFUSED:
        state = torch_bn_state().replace(kind="instance") if how == "instance" else torch_bn_state(**how)
        with pytest.raises(ValueError, match=message):
            nkk.set_state(instance if state.kind == "instance" else layer, state)
        with pytest.raises(ValueError, match=message):
            nkk.from_state(state, layout="channels_last")
    assert all(bitwise(numpy(v), b) for v, b in zip(layer.weights + instance.weights, before))


MISMATCHES = [  # (target layer, layer whose state is written into it, the error)
    (("GroupNormalization", {"groups": 2}, (None, 5, 8)), ("GroupNormalization", {"groups": 4}, (None, 5, 8)),
     "num_groups mismatch: the state has 4"),
    (("GroupNormalization", {"groups": 2}, (None, 5, 4)), ("GroupNormalization", {"groups": -1}, (None, 5, 4)),
     "an instance norm state needs one channel per group; .* has groups=2"),
    (("BatchNormalization", {}, (None, 5)), ("BatchNormalization", {}, (None, 4)), r"size mismatch: .*\(4,\).*\(5,\)"),
    (("LayerNormalization", {}, (None, 5, 4)), ("LayerNormalization", {"axis": 1}, (None, 4, 5)), "normalizes axes"),
    (("LayerNormalization", {}, (None, 4)), ("RMSNormalization", {}, (None, 4)), "kind mismatch: a rms norm state"),
    (("BatchNormalization", {"center": False}, (None, 4)), ("BatchNormalization", {}, (None, 4)),
     r"has no bias \(center=False\), but the state's bias is not all 0"),
]


def test_set_state_mismatch_writes_nothing():
    for target, source, message in MISMATCHES:
        dst = randomized(nkk, *target)
        before = [numpy(v).copy() for v in dst.weights]
        with pytest.raises(ValueError, match=message):
            nkk.set_state(dst, nkk.get_state(randomized(keras.layers, *source)))
        assert all(bitwise(numpy(v), b) for v, b in zip(dst.weights, before)), message


def test_identity_fills_what_the_state_lacks():
    torch, nkt = torch_modules()
    rms = nkk.from_state(nkt.get_state(torch.nn.RMSNorm(4, elementwise_affine=False, eps=1e-6)))
    assert bitwise(numpy(rms.scale), np.ones(4, "float32"))  # Keras's RMSNormalization always has a scale
    ln = randomized(nkk, "LayerNormalization", {}, (None, 4))
    nkk.set_state(ln, nkt.get_state(torch.nn.LayerNorm(4, bias=False)))
    assert bitwise(numpy(ln.beta), np.zeros(4, "float32"))


def test_from_state_layout_rank_and_overrides():
    s = torch_bn_state()  # channels-first, rank 4
    assert nkk.from_state(s).axis == 1  # the state's own layout by default
    assert nkk.from_state(s, layout="channels_last").axis == -1
    assert nkk.from_state(s, axis=3).axis == 3
    with pytest.raises(ValueError, match="give layout= or axis=, not both"):
        nkk.from_state(s, layout="channels_last", axis=-1)
    assert not nkk.from_state(s.replace(input_rank=None)).built  # built by its first call (test_from_state_builds_...)
    layer = nkk.from_state(s.replace(input_rank=None), input_shape=(None, 7, 3), axis=-1, momentum=0.95, epsilon=0.01,
                           dtype="float64")
    assert (layer.momentum, layer.epsilon, layer.dtype) == (0.95, 0.01, "float64")
    assert nkk.get_state(layer).momentum == 0.05 and nkk.get_state(layer).input_rank == 3


def test_continuing_training_differs_by_the_bessel_factor_only():
    """The documented consequence: from one state, a torch step and a Keras step on the same batch give
    running variances that differ by exactly m * var_B / (n - 1) (torch folds var_B * n / (n - 1))."""
    torch, nkt = torch_modules()
    s = torch_bn_state()
    t, k = nkt.from_state(s).double(), nkk.from_state(s, layout="channels_last", dtype="float64")
    x = np.random.default_rng(3).standard_normal((4, 3, 5, 5)) * 2 + 1
    with torch.no_grad():
        t(torch.from_numpy(x))
    k(np.moveaxis(x, 1, -1), training=True)
    n = x.size // 3
    var_b = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(t.running_var.numpy() - numpy(k.moving_variance), s.momentum * var_b / (n - 1),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(t.running_mean.numpy(), numpy(k.moving_mean), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- whole models


def torch_net():
    torch, nkt = torch_modules()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 6, 3, padding=1),
        torch.nn.GroupNorm(3, 6), torch.nn.Flatten(), torch.nn.Linear(6 * 16, 8), torch.nn.LayerNorm(8),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape))
        net(torch.randn(8, 1, 4, 4))
    return net


def keras_net(norms=(nkk.BatchNormalization, nkk.GroupNormalization, nkk.LayerNormalization)):
    """torch_net's twin, channels-last; the normalization layers are built one by one (no symbolic pass over
    the model, which traces every layer: seconds on JAX), the others are not needed built."""
    bn, gn, ln = norms
    norm_layers = [bn(), gn(groups=3), ln()]
    for layer, shape in zip(norm_layers, [(None, 4, 4, 4), (None, 4, 4, 6), (None, 8)]):
        layer.build(shape)
    return keras.Sequential([
        keras.layers.Conv2D(4, 3, padding="same"), norm_layers[0], keras.layers.Conv2D(6, 3, padding="same"),
        norm_layers[1], keras.layers.Flatten(), keras.layers.Dense(8), norm_layers[2],
    ])


@pytest.mark.parametrize("norms", ["normkit", "keras.layers"])
def test_copy_between_torch_and_keras_models(norms):
    torch, nkt = torch_modules()
    module = nkk if norms == "normkit" else keras.layers
    net, model = torch_net(), keras_net((module.BatchNormalization, module.GroupNormalization, module.LayerNormalization))
    report = nkk.copy_norm_states(net, model)  # a torch model as the source: read through normkit_torch
    assert report.ok and [s for s, _ in report.copied] == ["1", "3", "6"]
    ported = nkk.norm_states(model)
    for a, b in zip(nkt.norm_states(net).values(), ported.values()):
        assert not b.differences(a, ignore=("running_var_correction", "feature_axis", "input_rank"))
    back = torch_net()
    with torch.no_grad():
        for name, m in back.named_modules():
            if name in ("1", "3", "6"):  # every normalization parameter and statistic overwritten
                for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
                    t.fill_(0.5)
    assert nkt.norm_states(back) != nkt.norm_states(net)
    assert nkt.copy_norm_states(model, back).ok  # and a Keras model as the source of a torch one
    assert nkt.norm_states(back) == nkt.norm_states(net)


def test_copy_into_keras_reports_mismatches_by_path():
    torch, nkt = torch_modules()
    net, model = torch_net(), keras_net((nkk.BatchNormalization, nkk.GroupNormalization, nkk.BatchNormalization))
    before = [numpy(v).copy() for v in model.weights]
    with pytest.raises(ValueError, match=r"(?s)nothing copied.*6 -> .*batch_normalization.*kind mismatch"):
        nkk.copy_norm_states(net, model)
    assert all(bitwise(numpy(v), b) for v, b in zip(model.weights, before))
    report = nkk.copy_norm_states(net, model, strict=False)
    assert len(report.copied) == 2 and len(report.mismatched) == 1
    paths = list(nkk.norm_states(model))
    report = nkk.copy_norm_states(net, model, mapping={"1": paths[0]}, strict=False)
    assert report.copied == [("1", paths[0])] and report.unmatched_source == ["3", "6"]
    assert report.unmatched_target == paths[1:]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_from_state_builds_on_first_call_without_an_input_rank(layout):
    """A torch BatchNorm1d state (no input rank: (N, C) and (N, C, L) both fit) gives an unbuilt layer that
    writes the state when its first call builds it, as every Keras layer builds: inference equals torch's.
    Before: ValueError 'pass input_rank= or input_shape='."""
    torch, nkt = torch_modules()
    m = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        m(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2)
        m.weight.add_(0.5)
        m.bias.sub_(0.25)
    m.eval()
    s = nkt.get_state(m)
    assert s.input_rank is None and s.feature_axis == 1
    if layout == "channels_last":  # as Keras states are: features last
        s = s.replace(feature_axis=-1)
    x = np.random.default_rng(1).standard_normal((5, 3, 4)) * 3 + 2
    expected = m(torch.from_numpy(x)).detach().numpy()
    keras_x = x if layout == "channels_first" else np.moveaxis(x, 1, -1)
    layer = nkk.from_state(s, dtype="float64")
    assert not layer.built and layer.axis == (1 if layout == "channels_first" else -1)
    y = numpy(layer(keras_x, training=False))
    assert layer.built
    np.testing.assert_allclose(y if layout == "channels_first" else np.moveaxis(y, -1, 1), expected, rtol=1e-12, atol=1e-12)
    got = nkk.get_state(layer)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert bitwise(getattr(got, name), getattr(s, name)), name
    assert got.momentum == s.momentum and got.eps == s.eps
    # a 2-D input builds it just as well; the wrong channel count is refused when the layer builds
    y2 = numpy(nkk.from_state(s, dtype="float64")(keras_x[:, :, 0] if layout == "channels_first" else keras_x[:, 0, :]))
    assert np.isfinite(y2).all() and y2.shape == (5, 3)
    with pytest.raises(ValueError, match=r"size mismatch: the state's per-feature shape is \(3,\)"):
        nkk.from_state(s, dtype="float64")(np.ones((2, 5)) if layout == "channels_first" else np.ones((2, 4, 5)))


def test_set_state_refuses_values_that_overflow_float16():
    """A float32 state whose running variance exceeds float16's 65504 would be stored as inf in a float16 layer:
    refused, naming the statistic, the value and float16's largest value; nothing is written. Below the
    threshold the value is stored finite (65519 rounds to 65504)."""
    s = NormState(kind="batch", shape=(2,), running_mean=np.zeros(2, "float32"),
                  running_var=np.array([1.0, 7.82e4], "float32"), momentum=0.01, running_var_correction=0,
                  feature_axis=-1, input_rank=2)
    layer = nkk.BatchNormalization(dtype="float16")
    layer.build((None, 2))
    with pytest.raises(ValueError, match=r"running_var in BatchNormalization .* float16: it holds 78200.0, above "
                                         r"float16's largest finite value 65504.0 \(it would become inf\)"):
        nkk.set_state(layer, s)
    assert bitwise(numpy(layer.moving_variance), np.ones(2, "float16"))  # nothing written
    with pytest.raises(ValueError, match="float16's largest finite value 65504"):
        nkk.from_state(s, dtype="float16")
    nkk.set_state(layer, s.replace(running_var=np.array([1.0, 65519.0], "float32")))
    assert numpy(layer.moving_variance).tolist() == [1.0, 65504.0]
    assert np.isfinite(numpy(nkk.from_state(s, dtype="float32").moving_variance)).all()
