"""A short tour of normkit: the core on two array libraries, then every example in a quick setting.

    python examples/tour.py [--fast] [--out DIR]        (make demo runs this)

The examples it runs, each also runnable alone with more steps:
  feature_scaling    rental-car price (generated data): unscaled vs min-max vs z-scored features
  per_feature_map    batch norm after a convolution: one statistic per feature map, not per pixel
  every_library      the same calls on numpy, torch, jax (jit), dask (lazy), TensorFlow
  lr_sweep           a deep MLP (BatchNorm1d) and a digits CNN (BatchNorm2d) vs none, over learning rates
  keras_seed_models  the article's Keras models with normkit_keras vs keras BatchNormalization
"""

from __future__ import annotations

import time

import numpy as np

import _common


def core_on_two_libraries() -> dict:
    """The core's functions on a numpy table and on a torch batch, with what came back."""
    import torch

    import normkit as nk
    from feature_scaling import make_rental_cars

    _common.heading("1. normkit's core on numpy and on torch")
    cars, price = make_rental_cars(6)
    print("numpy: 6 generated rental cars, columns (age in years, mileage in km):")
    print(np.array2string(cars, precision=1, suppress_small=True, floatmode="fixed"))
    z = nk.standardize(cars, axis=-1)
    mm = nk.min_max_scale(cars, axis=-1)
    print(f"nk.standardize(cars, axis=-1) -> {type(z).__name__} {z.dtype}, column means "
          f"{np.round(z.mean(0), 6) + 0.0}, stds {np.round(z.std(0), 6)}:")
    print(np.array2string(z, precision=2, floatmode="fixed"))
    print(f"nk.min_max_scale(cars, axis=-1) -> every column now spans [{mm.min():.0f}, {mm.max():.0f}]")

    torch.manual_seed(0)
    x = torch.randn(16, 4, 5, 5) * 3 + 7  # (N, C, H, W)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    y, new_mean, new_var = nk.batch_norm(x, running_mean, running_var, training=True, axis=1)
    print(f"\ntorch: a batch x of shape {tuple(x.shape)} (N, C, H, W), mean ~7, std ~3")
    print(f"nk.batch_norm(x, running_mean, running_var, training=True, axis=1) -> {type(y).__module__}."
          f"{type(y).__name__} {tuple(y.shape)}; per channel over (N, H, W): mean "
          f"{y.mean(dim=(0, 2, 3)).abs().max():.1e} (max abs), std {y.std(dim=(0, 2, 3), unbiased=False).numpy().round(4)}")
    print(f"new running_mean {new_mean.numpy().round(3)} (momentum 0.1 toward the batch mean), "
          f"running_var {new_var.numpy().round(3)}; the inputs were not modified: running_mean is still "
          f"{running_mean.numpy()}")
    return {"numpy_z_mean": float(np.abs(z.mean(0)).max()), "numpy_z_std": [float(s) for s in z.std(0)],
            "torch_y_std": [float(s) for s in y.std(dim=(0, 2, 3), unbiased=False)],
            "inputs_untouched": bool(torch.equal(running_mean, torch.zeros(4)))}


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import every_library
    import feature_scaling
    import keras_seed_models
    import lr_sweep
    import per_feature_map

    started = time.perf_counter()
    results: dict = {"core": core_on_two_libraries(), "seconds": {}}
    out = ["--out", str(args.out)]
    fast = ["--fast"] if args.fast else []
    steps = [
        ("feature_scaling", feature_scaling.main, fast),
        ("per_feature_map", per_feature_map.main, fast),
        ("every_library", every_library.main, fast),
        ("lr_sweep", lr_sweep.main, fast or ["--epochs", "6", "--lrs", "0.01,0.1,1.0"]),
        ("keras_seed_models", keras_seed_models.main, fast or ["--epochs", "3"]),
    ]
    for number, (name, run, extra) in enumerate(steps, start=2):
        _common.heading(f"{number}. examples/{name}.py {' '.join(extra)}".rstrip())
        t0 = time.perf_counter()
        results[name] = run(extra + out)
        results["seconds"][name] = time.perf_counter() - t0
    results["figures"] = [f for name, _, _ in steps for f in results[name]["figures"]]
    _common.heading("Tour done")
    print(f"{time.perf_counter() - started:.0f} s; figures in {args.out}:")
    for f in results["figures"]:
        print(f"  {f}")
    print("Run any example alone for the full version, e.g. python examples/lr_sweep.py")
    return results


if __name__ == "__main__":
    main()
