"""The same normkit calls on every array library: numpy, torch, jax (jitted), dask (lazy), TensorFlow.

normkit writes normalization once against the Python Array API. This script makes the same two calls
-- normkit.batch_norm on a (N, C, H, W) batch in training mode, and normkit.standardize on a table of
rental cars (GENERATED: age in years, mileage in km) -- on each library's own arrays, and prints how
far each result is from numpy's. Each result is an array of the input's library. On dask nothing is
computed during the calls (a scheduler that refuses to run is installed while they run); the graph
is computed afterwards. TensorFlow tensors work through the normkit-keras plugin.

    python examples/every_library.py [--fast] [--out DIR]
"""

from __future__ import annotations

import numpy as np

import _common

TOLERANCE = 1e-5


def inputs(fast: bool):
    """numpy float32: a conv batch and its parameters, and a table of (age, mileage) rows."""
    from feature_scaling import make_rental_cars

    rng = np.random.default_rng(0)
    n = 8 if fast else 32
    x = rng.normal(3.0, 2.0, (n, 16, 8, 8)).astype(np.float32)
    params = {
        "running_mean": np.zeros(16, np.float32),
        "running_var": np.ones(16, np.float32),
        "weight": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "bias": rng.normal(0, 0.1, 16).astype(np.float32),
    }
    table, _ = make_rental_cars(200 if fast else 5000)
    return x, params, table


def normkit_calls(nk, x, running_mean, running_var, weight, bias, table):
    """The two calls every library gets, exactly the same."""
    out, new_mean, new_var = nk.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                           momentum=0.1, eps=1e-5, axis=1)
    z = nk.standardize(table, axis=-1)
    return {"batch_norm output": out, "running_mean": new_mean, "running_var": new_var, "standardize": z}


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import dask
    import dask.array as da
    import jax
    import matplotlib.pyplot as plt
    import tensorflow as tf
    import torch

    import normkit as nk

    x, p, table = inputs(args.fast)
    order = ("running_mean", "running_var", "weight", "bias")

    def on(convert):
        return [convert(x)] + [convert(p[k]) for k in order] + [convert(table)]

    _common.heading("One normkit call, every array library")
    print(f"batch_norm(x {x.shape}, training=True, axis=1) and standardize(table {table.shape}, axis=-1), float32; "
          "the table is generated rental-car data (age, mileage)")
    reference = normkit_calls(nk, *on(np.asarray))

    results: dict = {"tolerance": TOLERANCE, "max_abs_diff": {}, "types": {}}

    def compare(lib: str, got: dict) -> None:
        diff = 0.0
        for key, ref in reference.items():
            value = np.asarray(got[key])
            if value.shape != ref.shape:
                raise AssertionError(f"{lib}: {key} has shape {value.shape}, numpy's is {ref.shape}")
            diff = max(diff, float(np.max(np.abs(value.astype(np.float64) - ref.astype(np.float64)))))
        results["max_abs_diff"][lib] = diff
        verdict = "agrees" if diff <= TOLERANCE else "DISAGREES"
        print(f"{lib:<18} {results['types'][lib]:<40} max abs diff vs numpy {diff:.1e}  {verdict}")

    # torch
    out = normkit_calls(nk, *on(torch.from_numpy))
    results["types"]["torch"] = type(out["batch_norm output"]).__module__ + "." + type(out["batch_norm output"]).__name__
    compare("torch", {k: v.numpy() for k, v in out.items()})

    # jax, the whole call under jax.jit
    jitted = jax.jit(lambda *arrays: normkit_calls(nk, *arrays))
    out = jitted(*on(jax.numpy.asarray))
    results["types"]["jax (jit)"] = type(out["batch_norm output"]).__module__ + "." + type(out["batch_norm output"]).__name__
    compare("jax (jit)", {k: np.asarray(v) for k, v in out.items()})

    # dask: lazy during the calls, computed afterwards
    def refuse(*a, **k):
        raise RuntimeError("dask computed something during the normkit call")

    chunked = [da.from_array(x, chunks=(max(1, x.shape[0] // 4), 16, 8, 8))] + \
              [da.from_array(p[k]) for k in order] + [da.from_array(table, chunks=(len(table) // 4, 2))]
    with dask.config.set(scheduler=refuse):
        lazy = normkit_calls(nk, *chunked)
    tasks = sum(len(v.__dask_graph__()) for v in lazy.values())
    results["dask_lazy"] = all(isinstance(v, da.Array) for v in lazy.values())
    results["dask_tasks"] = tasks
    results["types"]["dask (computed)"] = "dask.array.Array"
    print(f"dask: after the calls the results are still dask arrays ({tasks} tasks in their graphs, nothing computed)")
    compare("dask (computed)", dict(zip(lazy, dask.compute(*lazy.values()))))

    # TensorFlow, through the normkit-keras plugin's namespace
    out = normkit_calls(nk, *on(tf.constant))
    results["types"]["tensorflow"] = type(out["batch_norm output"]).__module__ + "." + type(out["batch_norm output"]).__name__
    compare("tensorflow", {k: v.numpy() for k, v in out.items()})

    worst = max(results["max_abs_diff"].values())
    results["all_agree"] = worst <= TOLERANCE
    print(f"all libraries agree with numpy within {TOLERANCE:g}: {results['all_agree']} (worst {worst:.1e})")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    libs = list(results["max_abs_diff"])
    floor = 1e-10
    ax.bar(libs, [max(results["max_abs_diff"][lib], floor) for lib in libs], color="C2")
    ax.axhline(TOLERANCE, color="C3", ls="--", label=f"tolerance {TOLERANCE:g}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 1e-3)
    ax.set_ylabel("max abs diff vs numpy (float32)")
    ax.set_title("normkit.batch_norm + normkit.standardize, same call per library")
    ax.legend()
    results["figures"] = [_common.save(fig, args.out, "every_library.png")]
    return results


if __name__ == "__main__":
    main()
