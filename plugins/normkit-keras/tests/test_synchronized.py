"""BatchNormalization(synchronized=True) on every Keras backend against ONE replica on the concatenated batch.

In this process, every backend: without replicas (no strategy, one device, no process group) it is
plain batch norm, bit for bit; its config saves and loads. With replicas, one spawned run per backend
(bounded in time, killed at the deadline), in that backend's run only:
- tensorflow: MirroredStrategy on two logical CPUs (``synchronized_replicas.py``);
- jax: two host devices: ``model.fit`` and a stateless step under ``DataParallel``, the layer inside
  ``shard_map`` (``synchronized_jax_worker.py``);
- torch: two gloo processes, a ``DistributedDataParallel`` Keras model among the cases
  (``synchronized_torch_worker.py``).

Tolerances, float64: every statistic sums at most 40 values of size below 10, each sum off by at
most 40 * 1.1e-16 relative; normalizing multiplies that by |x - mean| / std < 10, and the merge, the
gradients and two SGD steps add a few roundings more: under 1e-13, so rtol 1e-10 / atol 1e-12
leaves a margin of 100 or more while local statistics are off by 1e-2 or more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import normkit_keras as nk
from conftest import f32_tol
from normkit.testing import reference
from normkit_keras.testing import gradients

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time under xdist

BACKEND = keras.backend.backend()
HERE = Path(__file__).parent
TIGHT = dict(rtol=1e-10, atol=1e-12)
DEADLINE_S = 120.0  # a spawned run: about 6 s idle, 30 s on a loaded 2-core machine


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def run_bounded(args: list[str], env: dict, cwd: Path, log: Path) -> tuple[int | None, str]:
    """Run ``args`` (killed at the deadline); returns (exit code or None when killed, the log's tail)."""
    with open(log, "w+") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            code = proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        out.seek(0)
        return code, out.read()[-4000:]


# ------------------------------------------------------------------------------------ every backend, in process


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}],
                         ids=["plain", "renorm"])
def test_without_replicas_synchronized_is_plain_batch_norm(policy, kwargs):
    """No strategy (TF), one device and no distribution (JAX), no process group (torch): nothing to merge, so
    synchronized=True computes exactly synchronized=False: outputs, gradients, moving statistics."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 4, 3)) * 2 + 1).astype("float32")
    up = rng.normal(size=x.shape).astype("float32")
    mask = rng.uniform(size=x.shape[:-1]) > 0.3
    layers = [nk.BatchNormalization(synchronized=s, momentum=0.5, **kwargs) for s in (True, False)]
    for layer in layers:
        layer.build((None, 4, 3))
    weights = [w + rng.uniform(0.0, 0.5, size=w.shape).astype("float32") for w in layers[0].get_weights()]
    for layer in layers:
        layer.set_weights(weights)
    sync, local = [(np_(l(x, training=True, mask=mask)), [np_(w) for w in l.weights]) for l in layers]
    np.testing.assert_array_equal(sync[0], local[0])
    for a, b in zip(sync[1], local[1]):
        np.testing.assert_array_equal(a, b)
    (dx_s, dw_s), (dx_l, dw_l) = [gradients(l, x, up) for l in layers]
    np.testing.assert_array_equal(dx_s, dx_l)
    assert sorted(dw_s) == sorted(dw_l) == ["beta", "gamma"]
    for name in dw_s:
        np.testing.assert_array_equal(dw_s[name], dw_l[name])


def test_synchronized_config_saves_and_loads(tmp_path):
    """A model saved with synchronized=True loads on every backend (Keras's own layer refuses True off TensorFlow)."""
    layer = nk.BatchNormalization(synchronized=True, momentum=0.9)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), layer])
    layer.moving_mean.assign(np.array([0.5, -1.0, 2.0]))
    assert layer.get_config()["synchronized"] is True
    model.save(tmp_path / "synchronized.keras")
    loaded = keras.saving.load_model(tmp_path / "synchronized.keras")
    again = loaded.layers[-1]
    assert type(again) is nk.BatchNormalization and again.synchronized is True and again.momentum == 0.9
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.testing.assert_array_equal(np_(loaded(x)), np_(model(x)))
    if BACKEND != "tensorflow":
        with pytest.raises(ValueError, match="only supported with the TensorFlow backend"):
            keras.layers.BatchNormalization(synchronized=True)


# ------------------------------------------------------------------------------------------------ TensorFlow


@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs in the KERAS_BACKEND=tensorflow run")
def test_tensorflow_mirrored_strategy_two_replicas(tmp_path):
    """MirroredStrategy on two logical CPUs (a subprocess: logical devices are set before TensorFlow starts):
    float32 equal to keras.layers' synchronized layer; float64 on an uneven batch (4 and 3), two steps: outputs,
    input and weight gradients and moving statistics equal the NumPy reference on the whole batch."""
    code, log = run_bounded([sys.executable, str(HERE / "synchronized_replicas.py")],
                            {**os.environ, "KERAS_BACKEND": "tensorflow"}, HERE, tmp_path / "tf.log")
    assert code is not None, f"killed after {DEADLINE_S} s\n{log}"
    assert code == 0, log
    assert "OK 2" in log and log.strip().endswith("OK float64 2"), log


# ------------------------------------------------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def jax_two_devices(tmp_path_factory):
    """What synchronized_jax_worker.py saw on two host devices (one run for the module)."""
    out = tmp_path_factory.mktemp("jax") / "two_devices.npz"
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "OMP_NUM_THREADS": "1"}
    code, log = run_bounded([sys.executable, str(HERE / "synchronized_jax_worker.py"), str(out)], env, HERE,
                            out.with_suffix(".log"))
    assert code is not None, f"killed after {DEADLINE_S} s\n{log}"
    assert code == 0 and log.strip().endswith("OK 2"), log
    return dict(np.load(out))


def _jax_step(layer, x, g, mask=None):
    import jax

    import synchronized_jax_worker as jw

    y, stats, dx, dw = jax.jit(lambda a, b, m: jw.stateless_step(layer, a, b, m))(x, g, mask)
    return {"y": y, "moving_mean": stats[0], "moving_variance": stats[1], "dx": dx, "dgamma": dw[0], "dbeta": dw[1]}


@pytest.mark.skipif(BACKEND != "jax", reason="runs in the KERAS_BACKEND=jax run")
def test_jax_data_parallel_fit_equals_one_device(jax_two_devices, float64):
    """model.fit under keras.distribution.DataParallel on two devices: the weights and moving statistics after
    two SGD steps equal one device's fit on the same global batches."""
    import synchronized_jax_worker as jw

    seen = jax_two_devices
    assert int(seen["fit/weight_devices"]) == 2  # the distribution was in effect
    model = jw.make_model(nk)
    model.fit(*jw.fit_data(), batch_size=jw.FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    for i, (w, initial) in enumerate(zip(model.get_weights(), jw.model_weights())):
        # two steps changed every weight, moving statistics included, but the bias before the batch norm (whose
        # gradient is zero: the batch mean removes it)
        assert np.allclose(w, initial, rtol=0, atol=1e-12) if i == 1 else not np.allclose(w, initial), i
        np.testing.assert_allclose(seen[f"fit/w{i}"], w, **TIGHT, err_msg=f"weight {i}")


@pytest.mark.skipif(BACKEND != "jax", reason="runs in the KERAS_BACKEND=jax run")
def test_jax_sharded_batch_step_equals_one_device(jax_two_devices, float64):
    """A jitted stateless training step on a batch split 4 + 4 over two devices: output, input and weight
    gradients and moving statistics equal one device on the global batch and the float64 NumPy reference."""
    import synchronized_jax_worker as jw

    seen, data = jax_two_devices, jw.step_data()
    assert list(seen["step/input_shards"]) == list(seen["step/output_shards"]) == [4, 4]
    one = _jax_step(jw.make_layer(nk), data["x"], data["g"])
    gamma, beta, mean, var = data["weights"]
    want, want_mean, want_var = reference.batch_norm(data["x"], mean, var, gamma, beta, training=True, momentum=0.3,
                                                     eps=1e-3, axis=-1, correction=0)
    want_dx, want_dgamma, want_dbeta = reference.batch_norm_grad(data["x"], data["g"], gamma, axis=-1, eps=1e-3)
    expected = {"y": want, "moving_mean": want_mean, "moving_variance": want_var, "dx": want_dx,
                "dgamma": want_dgamma, "dbeta": want_dbeta}
    for key, value in expected.items():
        np.testing.assert_allclose(np_(one[key]), value, **TIGHT, err_msg=key)
        np.testing.assert_allclose(seen[f"step/{key}"], np_(one[key]), **TIGHT, err_msg=key)


@pytest.mark.skipif(BACKEND != "jax", reason="runs in the KERAS_BACKEND=jax run")
def test_jax_shard_map_gathers_over_the_manual_axis(jax_two_devices, float64):
    """Inside shard_map each device sees its half: synchronized=True merges both halves' (masked) statistics
    (outputs, gradients and moving statistics as one device on the whole batch); synchronized=False gives each
    half's own statistics, which differ."""
    import synchronized_jax_worker as jw

    seen, data = jax_two_devices, jw.step_data()
    one = _jax_step(jw.make_layer(nk), data["x"], data["g"], data["mask"])
    gamma, beta, mean, var = data["weights"]
    want, want_mean, want_var = reference.batch_norm(data["x"], mean, var, gamma, beta, training=True, momentum=0.3,
                                                     eps=1e-3, axis=-1, correction=0, mask=data["mask"])
    for key, value in {"y": want, "moving_mean": want_mean, "moving_variance": want_var}.items():
        np.testing.assert_allclose(np_(one[key]), value, **TIGHT, err_msg=key)
    for key in one:
        np.testing.assert_allclose(seen[f"smap/{key}"], np_(one[key]), **TIGHT, err_msg=key)
    halves = [reference.batch_norm(data["x"][s], mean, var, gamma, beta, training=True, momentum=0.3, eps=1e-3,
                                   axis=-1, correction=0, mask=data["mask"][s])[0] for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(seen["smap_local/y"], np.concatenate(halves), **TIGHT)
    assert np.abs(seen["smap_local/y"] - want).max() > 1e-2


@pytest.mark.skipif(BACKEND != "jax", reason="runs in the KERAS_BACKEND=jax run")
def test_jax_processes_without_a_distribution_raise(monkeypatch):
    """Several JAX processes and no keras.distribution: each process's batch is all the layer sees, so it refuses
    (named) instead of normalizing with a local statistic; a distribution (global arrays) lifts the error."""
    import jax

    layer = nk.BatchNormalization(synchronized=True, name="bn_multi")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(RuntimeError, match="bn_multi.*2 processes.*DataParallel"):
        layer(x, training=True)
    np_(layer(x, training=False))  # inference needs no batch statistics
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    try:
        y = np_(layer(x, training=True))
    finally:
        keras.distribution.set_distribution(None)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_ranks(tmp_path_factory):
    """What each of the two gloo ranks of synchronized_torch_worker.py saved (one pair of workers for the module)."""
    from normkit_torch.testing import run_gloo_workers

    return run_gloo_workers(HERE / "synchronized_torch_worker.py", tmp_path_factory.mktemp("gloo"),
                            deadline_s=DEADLINE_S, env={"KERAS_BACKEND": "torch"}, cwd=HERE)


def _numpy_step(case: dict, data: dict, before: dict) -> dict:
    """The float64 NumPy reference of one training step of a case without mask or renorm."""
    kw = case["kwargs"]
    axis, eps, momentum = kw.get("axis", -1), kw.get("epsilon", 1e-3), kw.get("momentum", 0.99)
    gamma = before.get("gamma")
    y, mean, var = reference.batch_norm(data["x"], before["moving_mean"], before["moving_variance"], gamma,
                                        before["beta"], training=True, momentum=1 - momentum, eps=eps, axis=axis,
                                        correction=0)
    dx, dgamma, dbeta = reference.batch_norm_grad(data["x"], data["g"], gamma, axis=axis, eps=eps)
    out = {"y": y, "moving_mean": mean, "moving_variance": var, "dx": dx, "dbeta": dbeta}
    return out if gamma is None else {**out, "dgamma": dgamma}


@pytest.mark.skipif(BACKEND != "torch", reason="runs in the KERAS_BACKEND=torch run")
@pytest.mark.parametrize("name", ["uneven", "empty_rank", "mask", "channels_first", "renorm"])
def test_torch_two_gloo_processes_equal_one_process(torch_ranks, name):
    """Two ranks (torch.distributed, gloo) over two training steps and inference: outputs and input gradients
    (concatenated), weight gradients (summed over ranks) and moving statistics (on each rank) equal ONE process on
    the concatenated batch; one all_gather per forward and one all_reduce per backward."""
    import synchronized_torch_worker as tw

    case = tw.CASES[name]
    one = tw.run_case(nk, case, seed=10 * list(tw.CASES).index(name), rank=None)  # no process group here
    layer = tw.make_layer(nk, case)
    before = {v.path.split("/")[-1]: np_(v) for v in layer.weights}
    for step, want in enumerate(one["steps"]):
        seen = [r[name]["steps"][step] for r in torch_ranks]
        for r, s in enumerate(seen):
            forward, backward = s["collectives"]
            # a layer's first forward also gathers the signatures alone (normkit_torch.distributed.agreed_moments)
            assert len(forward) == (2 if step == 0 else 1) and all(c.startswith("all_gather") for c in forward), (r, s)
            assert backward == ["all_reduce"], (r, s)
        for key, value in want.items():
            if key == "collectives":
                continue
            if key in ("y", "dx"):
                got = np.concatenate([np_(s[key]) for s in seen])
            elif key.startswith("d"):  # each rank's own sum, as any weight's gradient under DDP
                got = sum(np_(s[key]) for s in seen)
            else:
                for s in seen[1:]:
                    np.testing.assert_array_equal(np_(s[key]), np_(seen[0][key]), err_msg=key)
                got = np_(seen[0][key])
            np.testing.assert_allclose(got, np_(value), **TIGHT, err_msg=f"step {step}: {key}")
        if "mask" not in case and not case["kwargs"].get("renorm"):
            data = tw.global_batch(case, 10 * list(tw.CASES).index(name) + step)
            for key, value in _numpy_step(case, data, before).items():
                np.testing.assert_allclose(np_(want[key]), value, **TIGHT, err_msg=f"step {step}: {key} vs NumPy")
            before.update({k: np_(want[k]) for k in ("moving_mean", "moving_variance")})
    np.testing.assert_allclose(np.concatenate([np_(r[name]["eval"]) for r in torch_ranks]), np_(one["eval"]), **TIGHT)


@pytest.mark.skipif(BACKEND != "torch", reason="runs in the KERAS_BACKEND=torch run")
def test_torch_ddp_keras_model_equals_one_process(torch_ranks, float64):
    """A Keras model in DistributedDataParallel with a torch SGD (keras.io's torch guide), two steps on 4 + 4
    rows: every weight, moving statistics included, equals one process trained on the 8 rows.

    To float32 round-off: Keras's torch backend computes Dense in float32 even for float64 layers
    (``keras.backend.result_type("float64", "float64")`` is float32 there), and the ranks sum each kernel
    gradient over 4 + 4 rows where one process sums 8. Per-process statistics would be 1e-2 off."""
    import synchronized_torch_worker as tw

    model = tw.make_model(nk)
    initial = [w.copy() for w in model.get_weights()]
    tw.train_model(model, model.parameters(), lambda x: model(x, training=True), tw.DDP_SIZES, None)
    for i, w in enumerate(model.get_weights()):
        assert np.allclose(w, initial[i], rtol=0, atol=1e-12) if i == 1 else not np.allclose(w, initial[i]), i
        for r in torch_ranks:
            np.testing.assert_allclose(np_(r["ddp"]["weights"][i]), w, **f32_tol(8, 4.0), err_msg=f"weight {i}")


@pytest.mark.skipif(BACKEND != "torch", reason="runs in the KERAS_BACKEND=torch run")
def test_torch_process_group_without_normkit_torch_raises(torch_ranks):
    """With a process group of two, synchronized=True needs normkit_torch's collectives: without it, an error
    naming the layer and the reason (never per-process statistics in silence)."""
    for r in torch_ranks:
        message = r["without_normkit_torch"]
        assert "bn_without_normkit_torch" in message and "normkit-torch" in message and "world size 2" in message, message
