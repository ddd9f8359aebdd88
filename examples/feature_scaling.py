"""Feature scaling: rental-car price from car age (0-30 years) and mileage (up to ~400,000 km).

The seed article's first claim: features of very different ranges bias and slow a model; min-max
scaling and z-scores fix that. Here a linear model is trained with plain full-batch gradient
descent in PyTorch on GENERATED data, three times: on the raw features, min-max scaled
(normkit.min_max_scale) and z-scored (normkit.standardize). Each run gets the learning rate from a
grid (1e-12 ... 1) that gives it the lowest final loss, so the unscaled model is not handicapped by
a bad choice: it is slow because no single learning rate suits both a feature in years and a
feature in hundreds of thousands of km. The test set is scaled with statistics fitted on the
training set, through normkit_torch.Standardize / MinMaxScale (.fit), and checked against the
functional call with normkit.Moments.

    python examples/feature_scaling.py [--fast] [--out DIR]
"""

from __future__ import annotations

import math

import numpy as np

import _common

TRUE_PER_YEAR = -2.0  # $/day per year of age
TRUE_PER_10K_KM = -1.5  # $/day per 10,000 km
BASE_PRICE = 95.0  # $/day for a new car


def make_rental_cars(n: int, seed: int = 0):
    """Generated data: age in years (0-30), mileage in km (roughly 12,000 km/year), price in $/day."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(0.0, 30.0, n)
    mileage = np.clip(age * rng.normal(12_000, 2_500, n) + rng.normal(0, 15_000, n), 0.0, 400_000.0)
    price = BASE_PRICE + TRUE_PER_YEAR * age + TRUE_PER_10K_KM * mileage / 10_000 + rng.normal(0, 4.0, n)
    x = np.stack([age, mileage], axis=1).astype(np.float32)
    return x, price.astype(np.float32)


def gradient_descent(torch, x, y, lr: float, steps: int):
    """Full-batch gradient descent on mean squared error for ``y ~ x @ w + b``, from zeros."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    losses = []
    for _ in range(steps):
        loss = torch.mean((x @ w + b - y) ** 2)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] > 1e30:
            losses[-1] = math.inf
            break
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
    with torch.no_grad():
        final = float(torch.mean((x @ w + b - y) ** 2))
    losses.append(final if math.isfinite(final) else math.inf)
    return losses, w.detach(), b.detach()


def best_run(torch, x, y, steps: int, lrs):
    """The learning rate of ``lrs`` with the lowest final training loss, and its run."""
    best = None
    for lr in lrs:
        losses, w, b = gradient_descent(torch, x, y, lr, steps)
        if best is None or losses[-1] < best[1][-1]:
            best = (lr, losses, w, b)
    return best


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0])
    import matplotlib.pyplot as plt
    import torch

    import normkit as nk
    from normkit_torch import MinMaxScale, Standardize

    _common.torch_threads()
    torch.manual_seed(0)
    steps = 40 if args.fast else 300
    lrs = [10.0**k for k in range(-12, 1)]

    x_np, y_np = make_rental_cars(2000)
    train, test = _common.split(len(x_np))
    x_train, y_train = torch.from_numpy(x_np[train]), torch.from_numpy(y_np[train])
    x_test, y_test = torch.from_numpy(x_np[test]), torch.from_numpy(y_np[test])

    _common.heading("Rental-car price from car age and mileage (GENERATED data, not real prices)")
    print(f"{len(train)} training / {len(test)} test cars; price = {BASE_PRICE} {TRUE_PER_YEAR:+} $/year "
          f"{TRUE_PER_10K_KM:+} $/10,000 km + noise (std 4 $/day)")
    print(f"age:     {x_np[:, 0].min():8.1f} .. {x_np[:, 0].max():10.1f} years")
    print(f"mileage: {x_np[:, 1].min():8.1f} .. {x_np[:, 1].max():10.1f} km")

    # Training features: the core's functions straight on torch tensors, statistics from the batch.
    stats = nk.Moments.from_array(x_train, axis=-1)
    variants = {
        "unscaled": (x_train, x_test, np.ones(2, np.float32)),
        "min-max": (nk.min_max_scale(x_train, axis=-1), None, (stats.max - stats.min).numpy()),
        "z-score": (nk.standardize(x_train, axis=-1), None, stats.std.numpy()),
    }
    # Test features: scaled with what was fitted on the training set, through the torch modules.
    standardizer = Standardize(2).fit(x_train)  # (num_features)
    minmax = MinMaxScale(2).fit(x_train)
    z_test, mm_test = standardizer(x_test), minmax(x_test)
    z_check = nk.standardize(x_test, axis=-1, mean=stats.mean, std=stats.std)
    mm_check = nk.min_max_scale(x_test, axis=-1, data_min=stats.min, data_max=stats.max)
    module_diff = max(float(torch.max(torch.abs(z_test - z_check))), float(torch.max(torch.abs(mm_test - mm_check))))
    print(f"normkit_torch.Standardize / MinMaxScale fitted on the training cars: test features agree with "
          f"normkit.standardize / min_max_scale(mean=, std= / data_min=, data_max= from Moments) to {module_diff:.1e}")
    variants["min-max"] = (variants["min-max"][0], mm_test, variants["min-max"][2])
    variants["z-score"] = (variants["z-score"][0], z_test, variants["z-score"][2])

    _common.heading(f"Plain gradient descent, {steps} steps, best learning rate of 1e-12 .. 1 for each")
    results: dict = {"steps": steps, "module_vs_function_max_abs_diff": module_diff}
    curves = {}
    print(f"{'features':<10} {'best lr':>8} {'train MSE':>11} {'test MSE':>10} {'$/year':>8} {'$/10k km':>9} {'base $':>8}")
    print(f"{'(truth)':<10} {'':>8} {'':>11} {'~16':>10} {TRUE_PER_YEAR:>8.2f} {TRUE_PER_10K_KM:>9.2f} {BASE_PRICE:>8.2f}")
    for name, (xtr, xte, scale) in variants.items():
        lr, losses, w, b = best_run(torch, xtr, y_train, steps, lrs)
        test_mse = float(torch.mean((xte @ w + b - y_test) ** 2))
        # back to original units: a weight on scaled feature j is worth w_j / scale_j per unit of j
        per_unit = w.numpy() / scale
        offset = {"unscaled": 0.0, "min-max": float((w * stats.min / torch.from_numpy(scale)).sum()),
                  "z-score": float((w * stats.mean / torch.from_numpy(scale)).sum())}[name]
        base = float(b) - offset
        print(f"{name:<10} {lr:>8.0e} {losses[-1]:>11.2f} {test_mse:>10.2f} {per_unit[0]:>8.2f} "
              f"{per_unit[1] * 1e4:>9.2f} {base:>8.2f}")
        curves[name] = (lr, losses)
        results[name] = {"lr": lr, "final_loss": losses[-1], "test_mse": test_mse,
                         "per_year": float(per_unit[0]), "per_10k_km": float(per_unit[1] * 1e4), "base": base}
    noise = 16.0
    for name in variants:
        results[name]["steps_to_2x_noise"] = next(
            (i for i, v in enumerate(curves[name][1]) if v < 2 * noise), None)
    print("steps until the training MSE is under twice the noise (32): "
          + ", ".join(f"{n} {results[n]['steps_to_2x_noise']}" for n in variants))
    print("Unscaled, the step size is bounded by the mileage feature (values ~1e5, curvature ~1e10), so the "
          "age weight and the intercept hardly move: the model leans on mileage and misses age.")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (lr, losses) in curves.items():
        ax.plot(losses, label=f"{name} (lr {lr:.0e}): {losses[-1]:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("training MSE ($/day)^2")
    ax.set_title("Rental-car price (generated data)")
    ax.legend()
    names = list(variants)
    pos = np.arange(3)
    for k, (key, label) in enumerate([("per_year", "$/year"), ("per_10k_km", "$/10k km")]):
        bx.bar(pos + k * 0.4, [results[n][key] for n in names], width=0.4, label=label)
    bx.axhline(TRUE_PER_YEAR, color="C0", ls=":", label="true $/year")
    bx.axhline(TRUE_PER_10K_KM, color="C1", ls=":", label="true $/10k km")
    bx.set_xticks(pos + 0.2, names)
    bx.set_title(f"learned effect after {steps} steps")
    bx.legend(fontsize=8)
    results["figures"] = [_common.save(fig, args.out, "feature_scaling.png")]
    return results


if __name__ == "__main__":
    main()
