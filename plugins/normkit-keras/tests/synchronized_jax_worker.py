"""synchronized=True on JAX with two host devices, every case in one process: ``python ... OUTPUT.npz``.

Run by test_synchronized.py (KERAS_BACKEND=jax, XLA_FLAGS=--xla_force_host_platform_device_count=2,
float64). Cases, each saved under its prefix for the test to compare with ONE device on the global batch:

- ``fit/``: ``model.fit`` under ``keras.distribution.DataParallel`` (2 steps of SGD);
- ``step/``: a jitted stateless training step on a batch sharded over both devices (outputs, input and
  weight gradients, moving statistics) and where the arrays lived;
- ``smap/``: the layer inside ``jax.shard_map`` (each device sees its half) with a mask: statistics
  gathered over the manual axis; ``smap_local/``: the same with synchronized=False (per-device statistics).

The data builders are plain NumPy so the test imports them to build the one-device reference.
"""

from __future__ import annotations

import os
import sys

import numpy as np

FIT_BATCH, FIT_STEPS = 8, 2
STEP_SHAPE = (8, 5, 3)
LAYER = dict(momentum=0.7, epsilon=1e-3)
MODEL_BN = dict(momentum=0.8)


def fit_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(FIT_BATCH * FIT_STEPS, 4)) * np.array([1.0, 2.0, 0.5, 3.0]) + np.array([0.5, -1.0, 2.0, 0.0])
    return x, rng.normal(size=(FIT_BATCH * FIT_STEPS, 1))


def model_weights() -> list[np.ndarray]:
    """Dense(3) kernel, bias; BatchNormalization gamma, beta, moving mean, moving variance; Dense(1) kernel, bias."""
    rng = np.random.default_rng(2)
    return [rng.normal(size=(4, 3)), rng.normal(size=3) * 0.1, 1.0 + 0.3 * rng.normal(size=3), 0.2 * rng.normal(size=3),
            rng.normal(size=3), rng.uniform(0.5, 1.5, size=3), rng.normal(size=(3, 1)), np.zeros(1)]


def make_model(nk):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), nk.BatchNormalization(synchronized=True, **MODEL_BN),
                              keras.layers.Dense(1)])
    model.set_weights(model_weights())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def step_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    loc = np.linspace(-2.0, 3.0, STEP_SHAPE[-1])
    return {"x": loc + rng.normal(size=STEP_SHAPE) * np.linspace(0.5, 2.0, STEP_SHAPE[-1]),
            "g": rng.normal(size=STEP_SHAPE), "mask": rng.uniform(size=STEP_SHAPE[:-1]) > 0.3,
            "weights": [1.0 + 0.5 * rng.normal(size=3), 0.3 * rng.normal(size=3), rng.normal(size=3),
                        rng.uniform(0.5, 1.5, size=3)]}


def make_layer(nk, synchronized: bool = True):
    layer = nk.BatchNormalization(synchronized=synchronized, **LAYER)
    layer.build((None,) + STEP_SHAPE[1:])
    layer.set_weights(step_data()["weights"])
    return layer


def stateless_step(layer, x, g, mask=None):
    """(y, moving statistics, dx, dgamma, dbeta) of sum(y * g) in training, by jax.grad over ``stateless_call``."""
    import jax
    import jax.numpy as jnp

    kwargs = {} if mask is None else {"mask": mask}
    non_trainable = [v.value for v in layer.non_trainable_weights]

    def loss(trainable, xj):
        y, stats = layer.stateless_call(trainable, non_trainable, xj, training=True, **kwargs)
        return jnp.sum(y * g), (y, stats)

    (_, (y, stats)), (dw, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        [v.value for v in layer.trainable_weights], x)
    return y, stats, dx, dw


def _record(out: dict, prefix: str, y, stats, dx, dw) -> None:
    out[f"{prefix}/y"], out[f"{prefix}/dx"] = np.asarray(y), np.asarray(dx)
    out[f"{prefix}/dgamma"], out[f"{prefix}/dbeta"] = np.asarray(dw[0]), np.asarray(dw[1])
    out[f"{prefix}/moving_mean"], out[f"{prefix}/moving_variance"] = np.asarray(stats[0]), np.asarray(stats[1])


def main(path: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import keras
    from jax.sharding import NamedSharding, PartitionSpec as P

    import normkit_keras as nk

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    devices = jax.devices()
    assert len(devices) == 2, devices
    out: dict[str, np.ndarray] = {}
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)

    # fit: the user's path
    model = make_model(nk)
    x, y = fit_data()
    model.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    for i, w in enumerate(model.get_weights()):
        out[f"fit/w{i}"] = np.asarray(w)
    out["fit/weight_devices"] = np.asarray(len(model.layers[1].moving_mean.value.sharding.device_set))

    # one stateless training step on a batch sharded over both devices
    mesh = distribution.device_mesh.backend_mesh
    batch_axis = distribution.batch_dim_name
    data = step_data()
    sharded = NamedSharding(mesh, P(batch_axis))
    xs, gs = jax.device_put(jnp.asarray(data["x"]), sharded), jax.device_put(jnp.asarray(data["g"]), sharded)
    layer = make_layer(nk)
    y, stats, dx, dw = jax.jit(lambda a, b: stateless_step(layer, a, b))(xs, gs)
    _record(out, "step", y, stats, dx, dw)
    out["step/input_shards"] = np.asarray([s.data.shape[0] for s in xs.addressable_shards])
    out["step/output_shards"] = np.asarray([s.data.shape[0] for s in y.addressable_shards])

    # inside shard_map: each device calls the layer on its half; gradients taken outside, as one program
    ms = jax.device_put(jnp.asarray(data["mask"]), sharded)
    part = P(batch_axis)
    for prefix, synchronized in (("smap", True), ("smap_local", False)):
        layer = make_layer(nk, synchronized)
        non_trainable = [v.value for v in layer.non_trainable_weights]

        def per_device(trainable, xb, mb, layer=layer, non_trainable=non_trainable, synchronized=synchronized):
            y, stats = layer.stateless_call(trainable, non_trainable, xb, training=True, mask=mb)
            return (y, stats) if synchronized else (y, [])  # local statistics differ per device: not returned

        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), part, part), out_specs=(part, P()))

        def loss(trainable, xb, mapped=mapped):
            y, stats = mapped(trainable, xb, ms)
            return jnp.sum(y * gs), (y, stats)

        (_, (y, stats)), (dw, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            [v.value for v in layer.trainable_weights], xs)
        if synchronized:
            _record(out, prefix, y, stats, dx, dw)
        else:
            out[f"{prefix}/y"] = np.asarray(y)
    np.savez(path, **out)
    print("OK", len(devices))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1])
