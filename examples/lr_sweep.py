"""Learning-rate sweep on scikit-learn's 8x8 digits: a deep MLP and a small CNN, with and without batch norm.

The seed article claims batch normalization between layers speeds training up and allows higher
learning rates. Two networks are trained with plain SGD at several learning rates, each once with
normkit_torch batch norm after every hidden layer and once with no normalization (the same initial
weights in both):

- a deep MLP (8 Linear layers of width 64, BatchNorm1d after each of the 7 hidden ones): deep enough
  that the plain network does not train at any of the learning rates, while with batch norm it
  trains over the whole range, lr 1 and 3 included;
- the shallow CNN (two convolutions, BatchNorm2d after each) as the contrast: shallow enough that it
  trains without normalization too, so there batch norm mainly trains faster.

Printed and plotted: test accuracy against the learning rate, and the training-loss curves.

    python examples/lr_sweep.py [--fast] [--out DIR] [--lrs 0.01,0.03,0.1,0.3,1,3] [--epochs 15]
"""

from __future__ import annotations

import math

import numpy as np

import _common

NETS = {"mlp": "deep MLP (8 Linear, width 64)", "cnn": "small CNN (2 conv)"}
TRAINS = 0.8  # test accuracy from which a run counts as trained (chance: 0.1)


def build_mlp(torch, batch_norm: bool, depth: int = 8, width: int = 64):
    """flatten, (linear [BN] relu) x (depth - 1) with width units, linear(width -> 10)."""
    from normkit_torch import BatchNorm1d

    nn = torch.nn
    layers, n_in = [nn.Flatten()], 64
    for _ in range(depth - 1):
        layers += [nn.Linear(n_in, width), BatchNorm1d(width) if batch_norm else nn.Identity(), nn.ReLU()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 10))


def build_cnn(torch, batch_norm: bool):
    """conv(1->16) [BN] relu, conv(16->32) [BN] relu, maxpool 2, linear(32*4*4 -> 10)."""
    from normkit_torch import BatchNorm2d

    nn = torch.nn

    def norm(c):
        return BatchNorm2d(c) if batch_norm else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}


def accuracy(torch, model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(torch, model, data, lr: float, epochs: int, batch: int, seed: int, bar) -> dict:
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, test_accs = [], []
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        epoch_loss = total / count
        diverged = diverged or not math.isfinite(epoch_loss)
        losses.append(epoch_loss)
        test_accs.append(accuracy(torch, model, x_test, y_test))
        bar.update(1)
    return {"loss": losses, "test_acc": test_accs, "train_acc": accuracy(torch, model, x_train, y_train),
            "final_test_acc": test_accs[-1], "diverged": diverged}


def sweep(torch, net: str, data, lrs: list, epochs: int, batch: int, bar) -> dict:
    """Every (lr, with/without BN) run of one network from the same initial weights (seed 0, shuffle seed 1)."""
    initial = {}
    for bn in (True, False):
        torch.manual_seed(0)  # the same weights with and without BN (BN's own start at 1 and 0)
        initial[bn] = BUILDERS[net](torch, bn).state_dict()
    runs = {}
    for lr in lrs:
        for bn in (True, False):
            bar.set_postfix_str(f"{net} lr {lr} {'BN' if bn else 'plain'}")
            model = BUILDERS[net](torch, bn)
            model.load_state_dict(initial[bn])
            runs[(lr, bn)] = train(torch, model, data, lr, epochs, batch, seed=1, bar=bar)
    return runs


def summarize(net: str, runs: dict, lrs: list, bn_name: str) -> dict:
    """Print the table and the claim lines of one network; return its results."""
    _common.heading(f"{NETS[net]}: test accuracy after the last epoch (train accuracy in brackets)")
    print(f"{'lr':>6}  {bn_name:>16}  {'no normalization':>18}")
    results: dict = {"bn": {}, "plain": {}}

    def cell(r):
        return "diverged" if r["diverged"] else f"{r['final_test_acc']:.3f} ({r['train_acc']:.3f})"

    for lr in lrs:
        b, p = runs[(lr, True)], runs[(lr, False)]
        print(f"{lr:>6}  {cell(b):>16}  {cell(p):>18}")
        for key, r in (("bn", b), ("plain", p)):
            results[key][lr] = {"test_acc": r["final_test_acc"], "train_acc": r["train_acc"],
                                "final_loss": r["loss"][-1], "diverged": r["diverged"], "loss": r["loss"],
                                "test_acc_per_epoch": r["test_acc"]}

    def first_epoch(r, level=0.95):
        return next((i + 1 for i, a in enumerate(r["test_acc"]) if a >= level), None)

    results["epochs_to_95"] = {key: {lr: first_epoch(runs[(lr, key == "bn")]) for lr in lrs} for key in ("bn", "plain")}
    results["best_lr"] = {key: max(lrs, key=lambda lr: results[key][lr]["test_acc"]) for key in ("bn", "plain")}
    results["trains_at"] = {key: [lr for lr in lrs if results[key][lr]["test_acc"] >= TRAINS] for key in ("bn", "plain")}
    best = results["best_lr"]
    print("epochs until test accuracy >= 0.95: "
          + "; ".join(f"lr {lr}: BN {results['epochs_to_95']['bn'][lr]}, plain {results['epochs_to_95']['plain'][lr]}"
                      for lr in lrs))
    print(f"best learning rate: with BN {best['bn']} ({results['bn'][best['bn']]['test_acc']:.3f}), "
          f"without {best['plain']} ({results['plain'][best['plain']]['test_acc']:.3f})")
    print(f"trains (test accuracy >= {TRAINS}) at learning rates: with BN {results['trains_at']['bn'] or 'none'}, "
          f"without {results['trains_at']['plain'] or 'none'}")
    return results


def plot(axes, net: str, results: dict, lrs: list, epochs: int, bn_name: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax, bx = axes
    for key, label, marker in (("bn", f"normkit {bn_name}", "o"), ("plain", "no normalization", "s")):
        ax.plot(lrs, [results[key][lr]["test_acc"] for lr in lrs], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD)")
    ax.set_ylabel(f"test accuracy after {epochs} epochs")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
    ax.set_title(f"Digits, {NETS[net]}: accuracy vs learning rate")
    ax.legend()
    for i, lr in enumerate(lrs):
        for key, ls in (("bn", "-"), ("plain", "--")):
            loss = np.array(results[key][lr]["loss"], dtype=float)
            loss[~np.isfinite(loss)] = np.nan
            bx.plot(range(1, epochs + 1), loss, ls=ls, color=f"C{i}",
                    label=f"lr {lr} {'BN' if key == 'bn' else 'plain'}")
    bx.set_yscale("log")
    bx.set_xlabel("epoch")
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.set_ylabel("training loss (cross-entropy)")
    bx.set_title(f"{NETS[net]}; solid: {bn_name}, dashed: no normalization")
    bx.legend(fontsize=7, ncol=2)


def add_arguments(parser) -> None:
    parser.add_argument("--lrs", default=None,
                        help="comma-separated learning rates (default 0.01,0.03,0.1,0.3,1,3; --fast 0.01,0.1,1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 15, --fast 2)")


def main(argv=None) -> dict:
    args = _common.parse_args(argv, __doc__.splitlines()[0], add_arguments)
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    _common.torch_threads()
    lrs = [float(v) for v in (args.lrs or ("0.01,0.1,1" if args.fast else "0.01,0.03,0.1,0.3,1,3")).split(",")]
    epochs = args.epochs or (2 if args.fast else 15)
    batch = 64

    images, labels = _common.load_digits_arrays()
    train_idx, test_idx = _common.split(len(images))
    x = torch.from_numpy(images[:, None])  # (N, 1, 8, 8); the MLP flattens it
    y = torch.from_numpy(labels)
    data = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])

    _common.heading("Digits (10 classes), a deep MLP and a small CNN: normkit_torch batch norm vs no normalization")
    print(f"{len(train_idx)} training / {len(test_idx)} test images, 8x8; plain SGD, batch {batch}, "
          f"{epochs} epochs, learning rates {lrs}; the same initial weights with and without batch norm")

    results: dict = {"epochs": epochs, "lrs": lrs}
    bn_names = {"mlp": "BatchNorm1d", "cnn": "BatchNorm2d"}
    with tqdm(total=2 * len(NETS) * len(lrs) * epochs, desc="training", unit="epoch", ncols=80) as bar:
        runs = {net: sweep(torch, net, data, lrs, epochs, batch, bar) for net in NETS}
    for net in NETS:
        results[net] = summarize(net, runs[net], lrs, bn_names[net])

    mlp = results["mlp"]
    high = [lr for lr in lrs if lr >= 0.1]
    _common.heading("Higher learning rates")
    def accs(key):
        return ", ".join(f"{mlp[key][lr]['test_acc']:.3f}" for lr in high)

    print(f"deep MLP at lr {high}: test accuracy with BatchNorm1d {accs('bn')}; without {accs('plain')}")
    print("the small CNN (contrast) trains without normalization too: "
          f"at lr {results['cnn']['trains_at']['plain'] or 'none'}")

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, net in zip(axes, NETS):
        plot(row, net, results[net], lrs, epochs, bn_names[net])
    fig.tight_layout()
    results["figures"] = [_common.save(fig, args.out, "lr_sweep.png")]
    return results


if __name__ == "__main__":
    main()
